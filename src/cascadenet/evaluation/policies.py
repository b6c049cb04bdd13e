"""Stopping policies of anytime prediction: when to stop, from the softmax outputs seen so far.

A policy looks at an example's trace of softmax outputs ``p_0 .. p_t`` and says whether it stops at step ``t``.
One object serves both ways:

- online, ``policy.stop(trace, first_step)``: ``trace`` holds the softmax outputs of steps ``0..t`` of the
  examples still running (a ``(t + 1, N, C)`` array or a list of ``(N, C)`` arrays); the answer is ``(N,)``
  booleans: stop now or go on;
- offline, ``policy.stopping_steps(probs, first_step)``: ``probs`` is a whole trajectory ``(T, N, C)``; the answer
  is each example's stopping step: the first step at which ``stop`` would have said yes, or the last step if it
  never does. Offline is the online rule applied at every step (tested), so a batched early exit and a
  replay of a stored trajectory stop at the same steps.

No policy stops before ``first_step`` (pass the model's ``first_informative_exit``: a step whose output cannot
depend on the input gives every example the same answer), and the steps before it are not part of the evidence
(``StableArgmax`` counts agreement from ``first_step`` on). Inputs may be torch tensors or numpy arrays; the
answers are torch tensors on the input's device.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Policy", "Confidence", "Margin", "StableArgmax", "budget_steps"]


def _as_trace(trace: Any, tail: int | None = None) -> tuple[Tensor, int]:
    """``trace`` as a ``(steps, N, C)`` tensor (only its last ``tail`` steps when given), and its full length."""
    if isinstance(trace, list | tuple):
        if not trace:
            raise ValueError("the trace of softmax outputs is empty (it needs at least one step)")
        n = len(trace)
        trace = torch.stack([torch.as_tensor(p) for p in (trace if tail is None else trace[-tail:])])
    else:
        trace = torch.as_tensor(trace)
        if trace.ndim != 3 or trace.shape[0] == 0:
            raise ValueError(f"a trace of softmax outputs has shape (steps, N, classes), got {tuple(trace.shape)}")
        n = trace.shape[0]
        if tail is not None:
            trace = trace[-tail:]
    if trace.ndim != 3:
        raise ValueError(f"a trace of softmax outputs has shape (steps, N, classes), got {tuple(trace.shape)}")
    if not trace.dtype.is_floating_point:
        raise ValueError(f"a trace of softmax outputs holds probabilities (floats), got {trace.dtype}")
    return trace, n


def _first_step(first_step: Any) -> int:
    if isinstance(first_step, bool) or not isinstance(first_step, numbers.Integral) or first_step < 0:
        raise ValueError(f"first_step must be an integer >= 0, got {first_step!r}")
    return int(first_step)


def _fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


class Policy:
    """Base of the stopping policies. A subclass sets ``window`` (how many of the latest steps its rule reads) and
    implements ``rule``; ``stop`` and ``stopping_steps`` come from here."""

    window: int = 1

    def rule(self, probs: Tensor) -> Tensor:
        """``probs``: ``(S, N, C)``, the steps from ``first_step`` on. Returns ``(S, N)``: whether the rule holds at
        each step, reading only that step and the ``window - 1`` before it (and none before the first)."""
        raise NotImplementedError

    def stop(self, trace: Any, first_step: int = 0) -> Tensor:
        """Online: whether each running example stops at the latest step of ``trace`` (see the module docstring).

        Args:
            trace: softmax outputs of steps ``0..t``, ``(t + 1, N, C)`` or a list of ``(N, C)``.
            first_step: never stop before this step.

        Returns:
            ``(N,)`` booleans.
        """
        first_step = _first_step(first_step)
        tail, steps = _as_trace(trace, self.window)
        t = steps - 1
        if t < first_step:
            return torch.zeros(tail.shape[1], dtype=torch.bool, device=tail.device)
        informative = min(self.window, steps - first_step)  # the rule never reads steps before first_step
        return self.rule(tail[tail.shape[0] - informative :])[-1]

    def stopping_steps(self, probs: Any, first_step: int = 0) -> Tensor:
        """Offline: each example's stopping step in a whole trajectory of softmax outputs.

        Args:
            probs: ``(T, N, C)`` softmax outputs.
            first_step: never stop before this step; must be < T.

        Returns:
            ``(N,)`` int64: the first step ``t >= first_step`` at which ``stop`` holds, else ``T - 1``.
        """
        first_step = _first_step(first_step)
        probs, T = _as_trace(probs)
        if first_step >= T:
            raise ValueError(f"first_step must be < the number of steps ({T}), got {first_step}")
        holds = self.rule(probs[first_step:]).clone()  # (T - first_step, N)
        holds[-1] = True  # an example that no step stops leaves at the last one
        return first_step + holds.int().argmax(dim=0).long()  # argmax: the first True


@dataclass(frozen=True)
class Confidence(Policy):
    """Stop at the first step whose largest softmax probability is ``>= threshold`` (the policy of
    ``metrics.threshold_curve``)."""

    threshold: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", _fraction("threshold", self.threshold))

    def rule(self, probs: Tensor) -> Tensor:
        return probs.amax(dim=-1) >= self.threshold


@dataclass(frozen=True)
class Margin(Policy):
    """Stop at the first step whose two largest softmax probabilities differ by ``>= margin`` (with one class,
    the margin is the probability itself)."""

    margin: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "margin", _fraction("margin", self.margin))

    def rule(self, probs: Tensor) -> Tensor:
        if probs.shape[-1] == 1:
            return probs[..., 0] >= self.margin
        top = probs.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1] >= self.margin


@dataclass(frozen=True)
class StableArgmax(Policy):
    """Stop at the first step ``t`` whose predicted class is the same as at each of the ``steps`` steps before it
    (steps ``t - steps .. t`` agree, all of them at or after ``first_step``)."""

    steps: int

    def __post_init__(self) -> None:
        k = self.steps
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"steps (of an unchanged prediction) must be an integer >= 1, got {k!r}")
        object.__setattr__(self, "steps", int(k))

    @property
    def window(self) -> int:  # type: ignore[override]
        return self.steps + 1

    def rule(self, probs: Tensor) -> Tensor:
        pred = probs.argmax(dim=-1)  # (S, N)
        same = torch.zeros_like(pred, dtype=torch.bool)
        k = self.steps
        if pred.shape[0] > k:
            agree = torch.ones_like(pred[k:], dtype=torch.bool)
            for j in range(1, k + 1):
                agree &= pred[k:] == pred[k - j : pred.shape[0] - j]
            same[k:] = agree
        return same


def budget_steps(macs: Sequence[int], budget: float, first_step: int = 0) -> int:
    """The last step whose cumulative cost per example is within ``budget`` MACs (``ValueError`` naming the
    cheapest allowed cost when even ``first_step`` is over it)."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or math.isnan(budget) or budget < 0:
        raise ValueError(f"budget must be a number of MACs >= 0, got {budget!r}")
    within = [t for t, m in enumerate(macs) if m <= budget]
    if not within or within[-1] < first_step:
        raise ValueError(
            f"budget {budget:g} MACs is below the cost of the first informative step (step {first_step}: "
            f"{macs[first_step]} MACs per example)"
        )
    return within[-1]
