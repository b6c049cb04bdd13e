"""Cascaded ResNets: every residual block runs at every step, from the previous step's state.

Notation (see docs/semantics.md): stem s(x), blocks k = 0..D-1 with residual branch F_k and shortcut S_k,
y_k(t) the output of block k at step t, y_{-1} the (optionally delayed) stem output.

- Stem delay: y_{-1}(0) = 0 and y_{-1}(t) = s(x) computed at step t-1; without it y_{-1}(t) = s(x).
- OSD (one-step delay): y_k(t) = relu(S_k(y_{k-1}(t)) + m_k(t) * F_k(y_{k-1}(t-1))), the branch value of step
  t-1 (computed with step t-1's normalisation) held in a delay buffer; zero at t = 0.
- EWS (exponential smoothing): e_t = alpha * e_{t-1} + (1 - alpha) * F_k(y_{k-1}(t)), y_k(t) = relu(S_k(..) + e_t).
- Parallel scheme: m_k(t) = 1. Serial scheme: block k passes its residual from step tau0 + k + 1 on, the first
  step whose delayed branch value comes from a settled input, so functional depth grows by one block per
  step; before that only its shortcut acts and its residual branch is not computed.
- Skip connections are instantaneous, so at step t the classifier sees a network of functional depth ~t.

The default number of steps is the settling time: the first step at which the OSD parallel cascade's output
equals the ordinary feed-forward network's (D + 2 steps with the stem delayed, D + 1 without). The
published code stops one step short of that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import engine
from .blocks import BasicBlock, Bottleneck, make_stem
from .engine import ews_update
from .norm import TemporalBatchNorm2d

__all__ = ["CascadedResNet", "CascadeState", "SCHEMES", "DELAYS"]

SCHEMES = ("parallel", "serial")
DELAYS = ("osd", "ews")
METHODS = ("engine", "loop")


@dataclass(frozen=True)
class CascadeState:
    """Everything a cascade carries from one step to the next (the model itself holds no state).

    Attributes:
        t: index of the next step.
        scheme: execution scheme fixed at the first step.
        stem: stem output waiting in the stem's delay buffer (None before the first step or without delay).
        branches: per block, the delayed branch value (OSD) or the smoothed value (EWS); None = zero.
    """

    t: int
    scheme: str
    stem: Tensor | None
    branches: tuple[Tensor | None, ...]


class CascadedResNet(nn.Module):
    """A residual network run as a parallel (or serial) cascade. Build it with ``cascadenet.create_model``.

    Calls:
        ``model(x)``: logits at every step for a constant input, ``(T, B, num_classes)``; a time-varying
        input ``(T, B, C, H, W)`` is streamed through the step loop.
        ``model.step(x_t, state)``: one step of the streaming form.
        ``model.feedforward(x)``: the ordinary ResNet with the same weights, ``(B, num_classes)``.
    """

    def __init__(
        self,
        *,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, ...],
        num_classes: int,
        in_channels: int = 3,
        width: int = 64,
        stem: str = "cifar",
        scheme: str = "parallel",
        delay: str = "osd",
        alpha: float = 0.0,
        stem_delay: bool = True,
        temporal_bn: bool = True,
        temporal_affine: bool = False,
        multi_head: bool = False,
        num_steps: int | None = None,
    ) -> None:
        super().__init__()
        self.config: dict | None = None  # create_model's arguments, set by the registry (needed to save weights)
        self.num_blocks = sum(layers)
        self.stem_delay = stem_delay
        self.settle_steps = self.num_blocks + (2 if stem_delay else 1)
        self.num_steps = self.settle_steps if num_steps is None else num_steps
        self.scheme = scheme
        self.delay = delay
        self.alpha = float(alpha)
        self.in_channels = in_channels
        self.num_classes = num_classes
        T = self.num_steps

        def norm(c: int) -> TemporalBatchNorm2d:
            return TemporalBatchNorm2d(c, T if temporal_bn else 1, T if temporal_affine else 1)

        self.stem = make_stem(stem, in_channels, width, norm)
        blocks: list[nn.Module] = []
        cin = width
        for stage, n in enumerate(layers):
            planes = width * 2**stage
            for i in range(n):
                blocks.append(block(cin, planes, 2 if stage > 0 and i == 0 else 1, norm))
                cin = planes * block.expansion
        self.blocks = nn.ModuleList(blocks)
        self.features = cin
        self.heads = nn.ModuleList([nn.Linear(cin, num_classes) for _ in range(T if multi_head else 1)])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    # ---- the schedule -----------------------------------------------------------------------------------
    def active(self, k: int, t: int, scheme: str) -> bool:
        """Whether block k passes its residual at step t."""
        return scheme == "parallel" or t >= int(self.stem_delay) + k + 1

    def computes_residual(self, k: int, t: int, scheme: str) -> bool:
        """Whether block k evaluates its residual branch at step t (OSD: for use at t + 1)."""
        return self.active(k, t + 1 if self.delay == "osd" else t, scheme)

    @property
    def first_informative_step(self) -> int:
        """The first step whose output can depend on the input (1 with the stem delayed, else 0)."""
        return int(self.stem_delay)

    def head(self, t: int) -> nn.Linear:
        return self.heads[min(t, len(self.heads) - 1)]

    def classify(self, y: Tensor, t: int | None) -> Tensor:
        pooled = y.mean(dim=(-2, -1))
        return (self.heads[-1] if t is None else self.head(t))(pooled)

    def norms(self) -> list[TemporalBatchNorm2d]:
        return [m for m in self.modules() if isinstance(m, TemporalBatchNorm2d)]

    # ---- validation -------------------------------------------------------------------------------------
    def _check_input(self, x: Tensor, ndim: int = 4) -> None:
        if not isinstance(x, Tensor) or x.ndim != ndim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            want = "(B, C, H, W)" if ndim == 4 else "(T, B, C, H, W)"
            raise ValueError(f"expected an input of shape {want}, got {shape}")
        if x.shape[-3] != self.in_channels:
            raise ValueError(f"the model takes {self.in_channels} input channels, the input has {x.shape[-3]}")

    def _resolve(self, scheme: str | None, num_steps: int | None) -> tuple[str, int]:
        scheme = self.scheme if scheme is None else scheme
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; valid choices: {', '.join(SCHEMES)}")
        T = self.num_steps if num_steps is None else num_steps
        if not isinstance(T, int) or T < 1:
            raise ValueError(f"num_steps must be a positive integer, got {T!r}")
        return scheme, T

    # ---- execution --------------------------------------------------------------------------------------
    def forward(
        self, x: Tensor, *, num_steps: int | None = None, scheme: str | None = None, method: str = "engine"
    ) -> Tensor:
        """Logits at every step, ``(T, B, num_classes)``.

        Args:
            x: a constant input ``(B, C, H, W)``, or a sequence ``(T, B, C, H, W)`` (one frame per step).
            num_steps: steps to run (default ``self.num_steps``); ignored for a sequence.
            scheme: ``"parallel"`` or ``"serial"`` (default: the model's); any weights run in either.
            method: ``"engine"`` (default, exact and fast) or ``"loop"`` (the step loop, for reference).
        """
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; valid choices: {', '.join(METHODS)}")
        if isinstance(x, Tensor) and x.ndim == 5:
            self._check_input(x, 5)
            scheme, _ = self._resolve(scheme, None)
            return self._loop(list(x), scheme)
        self._check_input(x)
        scheme, T = self._resolve(scheme, num_steps)
        if method == "loop":
            return self._loop([x] * T, scheme)
        return engine.trajectory(self, x, T, scheme)

    def _loop(self, frames: list[Tensor], scheme: str) -> Tensor:
        state = None
        out = []
        for x_t in frames:
            logits, state = self.step(x_t, state, scheme=scheme)
            out.append(logits)
        return torch.stack(out)

    def step(
        self, x: Tensor, state: CascadeState | None = None, *, scheme: str | None = None
    ) -> tuple[Tensor, CascadeState]:
        """Advance the cascade one step.

        Args:
            x: this step's input ``(B, C, H, W)``; it may change from step to step.
            state: the state returned by the previous call, or None to start a new sequence.
            scheme: execution scheme for a new sequence (default: the model's).

        Returns:
            this step's logits ``(B, num_classes)`` and the new state.
        """
        self._check_input(x)
        if state is None:
            scheme, _ = self._resolve(scheme, None)
            state = CascadeState(0, scheme, None, (None,) * self.num_blocks)
        t, scheme = state.t, state.scheme
        h = self.stem(x, t)
        if self.stem_delay:
            y = torch.zeros_like(h) if state.stem is None else state.stem
            stem_buffer = h
        else:
            y, stem_buffer = h, None
        branches: list[Tensor | None] = []
        for k, block in enumerate(self.blocks):
            short = y if block.shortcut is None else block.shortcut(y, t)
            held = state.branches[k]
            if self.delay == "osd":
                delayed = held if self.active(k, t, scheme) else None
                new = block.residual(y, t) if self.computes_residual(k, t, scheme) else None
            elif self.active(k, t, scheme):
                new = delayed = ews_update(held, block.residual(y, t), self.alpha)
            else:
                new = delayed = None
            branches.append(new)
            y = F.relu(short if delayed is None else short + delayed)
        return self.classify(y, t), CascadeState(t + 1, scheme, stem_buffer, tuple(branches))

    def feedforward(self, x: Tensor, num_blocks: int | None = None) -> Tensor:
        """The ordinary (non-cascaded) ResNet with the same weights: ``(B, num_classes)``.

        Uses the last step's normalisation statistics and head; in training mode it writes its batch
        statistics to every step's slot (an ordinary ResNet has the same statistics at every step).

        Args:
            num_blocks: keep only the first ``num_blocks`` residual branches (the rest pass their shortcut),
                which is what the serial scheme computes at intermediate steps.
        """
        self._check_input(x)
        n = self.num_blocks if num_blocks is None else num_blocks
        y = self.stem(x, None)
        for k, block in enumerate(self.blocks):
            short = y if block.shortcut is None else block.shortcut(y, None)
            y = F.relu(short + block.residual(y, None) if k < n else short)
        return self.classify(y, None)

    # ---- cost -------------------------------------------------------------------------------------------
    def macs_per_step(
        self, input_size: tuple[int, int, int], *, num_steps: int | None = None, scheme: str | None = None
    ) -> dict[str, list[int] | int]:
        """Multiply-accumulates per example, for serial and parallel hardware.

        Returns a dict with ``serial_cumulative`` (MACs a sequential processor must spend to produce the
        outputs of steps 0..t with the exact engine, i.e. computing each distinct state once; states that do
        not depend on the input are constants and are not counted), ``parallel_latency_blocks`` (one step =
        one block of latency on parallel hardware) and ``feedforward`` (one ordinary forward pass).
        """
        scheme, T = self._resolve(scheme, num_steps)
        return engine.macs_per_step(self, input_size, T, scheme)

    def feedforward_macs(self, input_size: tuple[int, int, int]) -> int:
        return engine.feedforward_macs(self, input_size)
