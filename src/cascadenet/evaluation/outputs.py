"""Which outputs of the exits the metrics, the stopping policies and early exit read: raw, calibrated, product of
experts. Chosen here, in one place, so ``eval``, ``predict`` and ``policy`` transform the exits the same way.

- raw: the model's logits;
- calibrated (``--calibrated``): exit t's logits divided by its temperature T_t (``cascadenet calibrate``); the
  argmax of every exit is unchanged;
- product of experts (``--poe``; Jazbec et al., "Towards Anytime Classification in Early-Exit Architectures by
  Enforcing Conditional Monotonicity", NeurIPS 2023): from the first informative exit f on, the prediction at exit
  l is the normalised product over exits f <= i <= l of ``(max(z_i, 0) + floor) ** w_i`` with z_i exit i's
  (calibrated, if asked) logits and w_i = (i - f + 1) / (E - f) (later exits weigh more, the last 1). The ReLU makes
  a class with a negative logit at some exit (nearly) impossible from then on, so the support only shrinks and
  the true class's probability rarely drops; ``floor`` (1e-6) keeps a class that every exit zeroes defined.
  Exits before f (a stem-delayed cascade's step 0, the same for every input) keep their own outputs.

The transformed outputs are returned as log-probabilities or logits, ``(E, N, C)``: anything that takes a softmax
or an argmax of logits reads them unchanged. ``Outputs.step`` does the same one exit at a time for early exit,
carrying the running product for the examples still running.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["POE_FLOOR", "Outputs", "outputs_for"]

POE_FLOOR = 1e-6


@dataclass(frozen=True)
class Outputs:
    """How the exit logits are transformed (see the module docstring).

    Attributes:
        temperatures: one per exit (calibrated), or None (raw).
        poe: the product-of-experts transform.
        first_exit: the model's first informative exit (the product starts there).
    """

    temperatures: tuple[float, ...] | None = None
    poe: bool = False
    first_exit: int = 0

    def __post_init__(self) -> None:
        if self.temperatures is not None and not all(t > 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be positive, got {self.temperatures}")
        if self.first_exit < 0:
            raise ValueError(f"first_exit must be >= 0, got {self.first_exit}")

    @property
    def name(self) -> str | None:
        """``calibrated``, ``poe``, ``calibrated-poe``, or None for the raw outputs (the part of an eval file's
        name)."""
        parts = [p for p, on in (("calibrated", self.temperatures is not None), ("poe", self.poe)) if on]
        return "-".join(parts) or None

    def step(self, t: int, logits: Tensor, num_exits: int, state: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Exit ``t``'s transformed ``(N, C)`` outputs from its ``logits`` and the running ``state`` of exits
        before it (None at the start); returns them with the new state (for the same rows)."""
        z = logits
        if self.temperatures is not None:
            if len(self.temperatures) != num_exits:
                raise ValueError(f"{len(self.temperatures)} temperatures for {num_exits} exits")
            z = z / self.temperatures[t]
        if not self.poe or t < self.first_exit:
            return z, state
        weight = (t - self.first_exit + 1) / (num_exits - self.first_exit)
        dtype = torch.promote_types(z.dtype, torch.float32)
        term = weight * (z.to(dtype).clamp(min=0) + POE_FLOOR).log()
        state = term if state is None else state + term
        return state - state.logsumexp(-1, keepdim=True), state

    def transform(self, logits: Any) -> Tensor:
        """The transformed outputs of every exit of ``(E, N, C)`` logits."""
        logits = torch.as_tensor(logits)
        if logits.dim() != 3:
            raise ValueError(f"logits must be (E, N, C), got shape {tuple(logits.shape)}")
        if self.temperatures is None and not self.poe:
            return logits
        out, state = [], None
        for t, z in enumerate(logits):
            o, state = self.step(t, z, logits.shape[0], state)
            out.append(o)
        return torch.stack(out)


def outputs_for(run_dir: Any, model: Any, num_exits: int, *, calibrated: bool = False, poe: bool = False) -> Outputs:
    """The ``Outputs`` of a run's model: its stored temperatures when ``calibrated`` (``CheckpointError`` when
    ``cascadenet calibrate`` has not stored them), the product of experts when ``poe``."""
    from ..models.checkpoint import CheckpointError
    from .calibration import TEMPERATURES, read_temperatures

    temps: Sequence[float] | None = None
    if calibrated is None or calibrated:
        temps = read_temperatures(run_dir, num_exits)
        if temps is None and calibrated:
            raise CheckpointError(f"{run_dir}: no {TEMPERATURES}; run `cascadenet calibrate {run_dir}` first")
    return Outputs(tuple(temps) if temps is not None else None, poe, int(model.first_informative_exit))
