"""A cascade as programs that export: the whole trajectory, and one step with the step index as a tensor.

``model.step(x, state)`` carries a ``CascadeState`` (a dataclass with Python ints and ``None``s) and branches on
the step in Python, so a traced step is one program per step. :class:`StepProgram` is the same step with

- the step index ``t`` a 0-d int64 tensor: temporal batch norm gathers its slot by index, a multi-head model its
  head, and the serial scheme's schedule is a mask computed from ``t``;
- the state a flat tuple of tensors of fixed shapes (the delayed stem output, then one value per residual
  block), zeros where ``model.step``'s state holds ``None``: adding a zero branch value, and a branch value
  multiplied by the schedule's 0 or 1, are exact, so the program gives ``model.step``'s numbers at every step.

``program(x, t, *state) -> (logits, *new_state)``; ``program.initial_state(x)`` is the state before step 0.
:class:`TrajectoryProgram` is ``x -> model(x)``, ``(T, B, C)``, as a module with a plain tensor signature.
Both are for evaluation mode (running statistics, no updates).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import engine
from .blocks import ews_update
from .cascade import CascadedResNet

__all__ = ["StepProgram", "TrajectoryProgram"]


class TrajectoryProgram(nn.Module):
    """``x (B, C, H, W) -> (T, B, num_classes)``: the model's trajectory (its engine) for a fixed scheme, length and
    input size, with the input-independent states recorded as constants at construction (the weights must not
    change afterwards)."""

    def __init__(
        self,
        model: CascadedResNet,
        input_size: tuple[int, int, int],
        *,
        num_steps: int | None = None,
        scheme: str | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.scheme, self.num_steps = model._resolve(scheme, num_steps)
        self.input_size = tuple(input_size)
        # the input-independent states as recorded constants, not recomputed (engine.constant_states says why)
        # the plan as the statistics make it now (slots with identical statistics computed once), fixed
        self._classes = engine.stat_classes(model)
        constants = engine.constant_states(model, self.input_size, self.num_steps, self.scheme, self._classes)
        self._constants = [f"const_{i}" for i in range(len(constants))]
        for name, value in zip(self._constants, constants):
            self.register_buffer(name, value)

    def forward(self, x: Tensor) -> Tensor:
        constants = [getattr(self, name) for name in self._constants]
        return engine.trajectory(self.model, x, self.num_steps, self.scheme, constants=constants, classes=self._classes)


class StepProgram(nn.Module):
    """One step of a cascade for every step: ``(x, t, *state) -> (logits, *new_state)`` (see the module docstring).

    Args:
        model: a cascaded ResNet (in evaluation mode when called).
        input_size: ``(C, H, W)`` of its inputs (fixes the shapes of the state).
        scheme: ``parallel`` or ``serial`` (default: the model's).
    """

    def __init__(self, model: CascadedResNet, input_size: tuple[int, int, int], *, scheme: str | None = None) -> None:
        super().__init__()
        if not isinstance(model, CascadedResNet):
            raise ValueError(f"a step program needs a cascaded ResNet, got a {type(model).__name__}")
        if len(model.heads) > 1 and not all(isinstance(h, nn.Linear) for h in model.heads):
            raise ValueError("a step program of a multi-head cascade needs linear heads (it gathers the step's head "
                             "by index)")  # fmt: skip
        self.model = model
        self.scheme, _ = model._resolve(scheme, None)
        self.input_size = tuple(input_size)
        self.state_shapes = self._state_shapes()
        self.state_names = (["stem"] if model.stem_delay else []) + [f"block{k}" for k in range(model.num_blocks)]
        self._record_step0()

    @torch.no_grad()
    def _state_shapes(self) -> list[tuple[int, ...]]:
        """Per state tensor, its shape without the batch dimension (from one step of the model on a probe)."""
        m = self.model
        was = m.training
        m.eval()
        try:
            probe = torch.zeros((1, *self.input_size), dtype=next(m.parameters()).dtype,
                                device=next(m.parameters()).device)  # fmt: skip
            y = m.stem(probe, 0)
            shapes = [tuple(y.shape[1:])] if m.stem_delay else []
            for block in m.blocks:
                c = block.residual(y, 0)
                shapes.append(tuple(c.shape[1:]))
                y = F.relu((y if block.shortcut is None else block.shortcut(y, 0)) + c)
        finally:
            m.train(was)
        return shapes

    @torch.no_grad()
    def _record_step0(self) -> None:
        """With the stem delayed, step 0 does not depend on the input: its logits and the blocks' branch values
        are constants, recorded here from ``model.step`` and returned by the program at ``t == 0``.

        Recomputing them with another runtime's kernels is ill-conditioned: the step-0 statistics slots were
        estimated on these very constant fields, so their variances are 0 or nearly, and batch norm multiplies
        the last-bit differences between two convolution implementations by ``weight / sqrt(eps)`` (~300) at each
        layer (ONNX Runtime's step 0 differed from PyTorch's by up to 4e-4 on a model with recalibrated
        statistics, every later step by < 1e-6). The constants are PyTorch's, with which the statistics were made.
        """
        m = self.model
        self._step0: list[str] = []
        if not m.stem_delay:
            return
        was = m.training
        m.eval()
        try:
            param = next(m.parameters())
            logits, state = m.step(torch.zeros((1, *self.input_size), dtype=param.dtype, device=param.device))
        finally:
            m.train(was)
        values = [logits[0]] + [torch.zeros(shape, dtype=param.dtype, device=param.device) if v is None else v[0]
                                for v, shape in zip(state.branches, self.state_shapes[1:])]  # fmt: skip
        for i, value in enumerate(values):
            self.register_buffer(f"step0_{i}", value.clone())
            self._step0.append(f"step0_{i}")

    def initial_state(self, x: Tensor) -> tuple[Tensor, ...]:
        """The state before step 0 for a batch like ``x``: zeros."""
        return tuple(x.new_zeros((x.shape[0], *shape)) for shape in self.state_shapes)

    def _active(self, k: int, t: Tensor) -> Tensor | None:
        """Whether block k passes its residual at step t, as a 0/1 factor (None: always, the parallel scheme)."""
        if self.scheme == "parallel":
            return None
        return (t >= int(self.model.stem_delay) + k + 1).to(torch.get_default_dtype())

    def forward(self, x: Tensor, t: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        m = self.model
        h = m.stem(x, t)
        if m.stem_delay:
            y, held_values = state[0], state[1:]
            new_state = [h]
        else:
            y, held_values = h, state
            new_state = []
        for k, block in enumerate(m.blocks):
            short = y if block.shortcut is None else block.shortcut(y, t)
            held = held_values[k]
            c = block.residual(y, t)
            now = self._active(k, t)
            if m.delay == "osd":  # held: the branch value of step t-1 (zero at t = 0 and while inactive)
                delayed = held if now is None else held * now.to(held.dtype)
                new = c
            else:  # EWS from a zero state: alpha * 0 + (1 - alpha) * c is the first value, exactly
                new = ews_update(held, c, m.alpha)
                if now is not None:
                    new = new * now.to(new.dtype)
                delayed = new
            new_state.append(new)
            y = F.relu(short + delayed)
        pooled = m.pool(y)
        if len(m.heads) == 1:
            logits = m.heads[0](pooled)
        else:
            index = t.reshape(1).clamp(max=len(m.heads) - 1)
            weight = torch.stack([head.weight for head in m.heads]).index_select(0, index)[0]
            bias = torch.stack([head.bias for head in m.heads]).index_select(0, index)[0]
            logits = F.linear(pooled, weight, bias)
        if self._step0:  # step 0 is input-independent: the recorded constants (see _record_step0)
            first = t == 0
            logits = torch.where(first, getattr(self, self._step0[0]), logits)
            new_state[1:] = [
                torch.where(first, getattr(self, name), v) for name, v in zip(self._step0[1:], new_state[1:])
            ]
        return (logits, *new_state)
