"""Real anytime inference for cascaded ResNets: the trajectory one step at a time, each distinct state computed
once and only when a step first needs it, with examples leaving the batch between steps.

``model(x)`` (the trajectory engine) computes every step before returning; the step loop (``model.step``)
recomputes every block at every step. ``model.anytime(x)`` returns an :class:`AnytimeRun`, an iterator whose
``next()`` computes one more step and whose ``keep(...)`` drops the examples that are done, so that a caller who
stops early (for all examples, or for some of them) does not pay for the steps it does not use.

What a step computes is decided by the same keys as the engine's (``engine.py``): a branch (stem, residual,
projection shortcut) is evaluated on a state with a normalisation only if that pair has not been evaluated
before, and a block output is formed only if its shortcut value and added branch value are new. For a constant
input, a block whose input has settled keeps its output. Each computation is made at the first step that needs
its result, which is the step the engine charges it to, so running to the end costs exactly
``exit_costs(...).macs[-1]`` per example and step ``t`` costs ``macs[t] - macs[t-1]`` (tested, by counting the
convolutions actually run). States that do not depend on the input (step 0 with the stem delayed) are computed
once for the whole batch and cost nothing per example, as in the engine.

The schedule is planned symbolically when the run starts (which computation at which step, and the last step
that reads each state), so that a state is freed as soon as no later step can read it: the run holds a few
states per block, not the whole trajectory.

Only evaluation mode: in training, batch norm would normalise with the statistics of a batch that shrinks as
examples leave, and update the running statistics.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .blocks import Branch, ews_update

if TYPE_CHECKING:
    from .cascade import CascadedResNet

__all__ = ["AnytimeRun", "AnytimeStep"]


class AnytimeStep(NamedTuple):
    """One step of an :class:`AnytimeRun`.

    Attributes:
        step: the step index t.
        logits: ``(B_t, num_classes)``, the logits of the examples still in the run, in the order of ``indices``.
        macs: cumulative multiply-accumulates per example to produce steps 0..t (``exit_costs(...).macs[t]``).
        indices: ``(B_t,)`` int64, the position of each row in the batch the run started with.
    """

    step: int
    logits: Tensor
    macs: int
    indices: Tensor


@dataclass(frozen=True)
class _Op:
    """One computation of the plan: ``out = kind(args)``; ``macs`` per example (0 for input-independent ones)."""

    kind: str  # "zero", "branch", "ews", "sum", "head"
    out: int
    args: tuple[Any, ...]
    macs: int


class _Planner:
    """Symbolic run of the cascade over T steps: which distinct states each step creates, keyed as the engine
    keys them (the identity of a branch's input state and its normalisation; a block output by its shortcut
    value and its added branch value). Values are numbered; value 0 is the input."""

    def __init__(self, model: CascadedResNet, hw: tuple[int, int], scheme: str) -> None:
        self.model = model
        self.scheme = scheme
        self.const = [False]  # value -> does not depend on the input
        self.hw = [hw]  # value -> spatial size (for MACs)
        self.memo: dict[Hashable, int] = {}
        # slots with bit-identical running statistics count as one, as in the engine's evaluation keys
        self.stat_classes = {id(bn): bn.stat_classes() for bn in model.norms()}
        self.ops: list[_Op] = []
        k = model.num_blocks
        self.prev_in: list[int | None] = [None] * k  # per block: its input value at the previous step
        self.prev_added: list[tuple[Hashable, int | None]] = [(None, None)] * k  # EWS: previous key and value
        self.zero: int | None = None

    def _new(self, const: bool, hw: tuple[int, int]) -> int:
        self.const.append(const)
        self.hw.append(hw)
        return len(self.const) - 1

    def _norm_key(self, branch: Branch, t: int) -> tuple[Hashable, ...]:
        return tuple((self.stat_classes[id(bn)][bn.stat_slot(t)], bn.affine_slot(t)) for bn in branch.norms())

    def _branch(self, name: Hashable, branch: Branch, v: int, t: int) -> int:
        """``branch`` on value ``v`` normalised as at step ``t``: a new computation unless made before."""
        key = (name, v, self._norm_key(branch, t))
        if key not in self.memo:
            macs, hw = branch.macs(self.hw[v])
            out = self._new(self.const[v], hw)
            self.ops.append(_Op("branch", out, (branch, v, t), 0 if self.const[v] else macs))
            self.memo[key] = out
        return self.memo[key]

    def _made(self, key: Hashable, kind: str, args: tuple[Any, ...], const: bool, hw: tuple[int, int]) -> int:
        if key not in self.memo:
            out = self._new(const, hw)
            self.ops.append(_Op(kind, out, args, 0))
            self.memo[key] = out
        return self.memo[key]

    def step(self, t: int) -> tuple[list[_Op], int]:
        """The new computations of step ``t`` and the value holding its logits."""
        model, scheme = self.model, self.scheme
        self.ops = []
        if model.stem_delay:
            if t == 0:
                _, hw = model.stem.macs(self.hw[0])
                self.zero = self._new(True, hw)
                self.ops.append(_Op("zero", self.zero, (model.stem.out_channels(self.hw[0]), hw), 0))
                y = self.zero
            else:
                y = self._branch("stem", model.stem, 0, t - 1)  # computed as at step t-1, delayed one step
        else:
            y = self._branch("stem", model.stem, 0, t)
        osd = model.delay == "osd"
        for k, block in enumerate(model.blocks):
            inp, added = y, None
            added_key: Hashable = None
            if osd:
                prev = self.prev_in[k]
                if t >= 1 and model.active(k, t, scheme) and prev is not None:
                    added = self._branch(("res", k), block.residual, prev, t - 1)
                    added_key = ("res", added)
            elif model.active(k, t, scheme):
                c = self._branch(("res", k), block.residual, inp, t)
                if model.alpha == 0:  # ews_update returns the branch value itself
                    added, added_key = c, ("res", c)
                else:  # the smoothed state chains the previous one
                    prev_key, prev_value = self.prev_added[k]
                    added_key = ("ews", k, prev_key, c)
                    const = self.const[c] and (prev_value is None or self.const[prev_value])
                    added = self._made(added_key, "ews", (prev_value, c), const, self.hw[c])
            self.prev_added[k] = (added_key, added)
            short = inp if block.shortcut is None else self._branch(("short", k), block.shortcut, inp, t)
            const = self.const[short] and (added is None or self.const[added])
            y = self._made(("out", k, short, added_key), "sum", (short, added), const, self.hw[short])
            self.prev_in[k] = inp
        h = min(t, len(model.heads) - 1)
        key = ("head", y, h)
        if key not in self.memo:
            out = self._new(self.const[y], (1, 1))
            macs = 0 if self.const[y] else model.features * model.num_classes
            self.ops.append(_Op("head", out, (h, y), macs))
            self.memo[key] = out
        return self.ops, self.memo[key]


Plan = tuple[list[tuple[list[_Op], int]], list[bool], dict[int, int], list[int]]


def _plan(model: CascadedResNet, hw: tuple[int, int], num_steps: int, scheme: str) -> Plan:
    """Per step its computations and logits value, whether each value is input-independent, the last step that
    reads each value (as an operand or as a step's logits: it is freed after it), and each step's MACs.

    Cached on the model (a batched early exit starts one run per batch): the plan depends only on the input size,
    the run's length and scheme, and which statistics slots are identical, which is part of the key.
    """
    key = (hw, num_steps, scheme, tuple(tuple(bn.stat_classes()) for bn in model.norms()))
    cache = model.__dict__.setdefault("_anytime_plans", {})
    if key in cache:
        return cache[key]
    planner = _Planner(model, hw, scheme)
    steps = [planner.step(t) for t in range(num_steps)]
    last_use: dict[int, int] = {}
    for t, (ops, logits) in enumerate(steps):
        for op in ops:
            for v in _operands(op):
                last_use[v] = t
        last_use[logits] = t
    plan = (steps, planner.const, last_use, [sum(op.macs for op in ops) for ops, _ in steps])
    if len(cache) >= 8:  # a few input sizes and schemes; not an unbounded store
        cache.clear()
    cache[key] = plan
    return plan


def _operands(op: _Op) -> list[int]:
    if op.kind == "branch":
        return [op.args[1]]
    if op.kind in ("sum", "ews"):
        return [v for v in op.args if v is not None]
    if op.kind == "head":
        return [op.args[1]]
    return []


class AnytimeRun(Iterator[AnytimeStep]):
    """The steps of a cascade on a constant input, computed one ``next()`` at a time; see the module docstring.
    Made by ``CascadedResNet.anytime(x)``.

    Usage::

        run = model.eval().anytime(x)
        for s in run:                                  # s.step, s.logits (B_t, C), s.macs, s.indices
            done = s.logits.softmax(-1).amax(-1) >= 0.9
            record(s.indices[done], s.logits[done])
            run.keep(~done)                            # the next step computes only the others

    Attributes:
        indices: ``(B_t,)`` int64 on the input's device: each remaining row's position in the original batch.
        macs_spent: multiply-accumulates spent so far on the whole batch (the per-step cost times the rows that
            were still in the run at that step).
    """

    def __init__(self, model: CascadedResNet, x: Tensor, num_steps: int, scheme: str) -> None:
        self._model = model
        self._num_steps = num_steps
        self._plan, self._const, self._last_use, self._step_macs = _plan(model, tuple(x.shape[-2:]), num_steps, scheme)
        self._values: dict[int, Tensor] = {0: x}
        self._t = 0
        self._macs = 0
        self._pending: Tensor | None = None  # rows to keep, relative to the current rows, applied at the next step
        self.indices = torch.arange(x.shape[0], device=x.device)
        self.macs_spent = 0

    @property
    def step(self) -> int:
        """The index of the next step (the number of steps computed so far)."""
        return self._t

    @property
    def num_steps(self) -> int:
        return self._num_steps

    def step_macs(self) -> list[int]:
        """Per step, the multiply-accumulates per example that step computes (the plan's, known in advance)."""
        return list(self._step_macs)

    def __iter__(self) -> AnytimeRun:
        return self

    def keep(self, which: Tensor | Any) -> None:
        """Keep only some of the remaining examples for the next steps.

        Args:
            which: a boolean mask over the current rows (``len == B_t``), or the integer positions of the rows
                to keep (distinct; the rows then follow that order). Relative to the rows of the step just
                yielded; several calls between two steps compose.
        """
        n = self.indices.shape[0]
        which = torch.as_tensor(which, device=self.indices.device)
        if which.numel() == 0 and which.ndim == 1 and which.dtype != torch.bool:
            which = which.long()  # an empty list: keep nothing
        if which.dtype == torch.bool:
            if which.shape != (n,):
                raise ValueError(f"keep: a boolean mask must have one entry per remaining example ({n}), "
                                 f"got shape {tuple(which.shape)}")  # fmt: skip
            rows = which.nonzero().flatten()
        elif not which.dtype.is_floating_point and not which.dtype.is_complex and which.ndim <= 1:
            rows = which.flatten().long()
            if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
                raise ValueError(f"keep: positions must be in [0, {n}), got {rows.tolist()}")
            if rows.unique().numel() != rows.numel():
                raise ValueError("keep: positions must be distinct")
        else:
            raise ValueError(f"keep takes a boolean mask or integer positions, got {which.dtype} {tuple(which.shape)}")
        self.indices = self.indices[rows]
        self._pending = rows if self._pending is None else self._pending[rows]

    @torch.no_grad()
    def __next__(self) -> AnytimeStep:
        t = self._t
        if t >= self._num_steps or self.indices.numel() == 0:
            raise StopIteration
        values, model = self._values, self._model
        if self._pending is not None:  # examples left: only the remaining rows of the held states go on
            for v, tensor in values.items():
                if not self._const[v]:
                    values[v] = tensor.index_select(0, self._pending)
            self._pending = None
        ops, out = self._plan[t]
        for op in ops:
            if op.kind == "branch":
                branch, v, step = op.args
                values[op.out] = branch(values[v], step)
            elif op.kind == "sum":
                short, added = (values[v] if v is not None else None for v in op.args)
                values[op.out] = F.relu(short if added is None else short + added)
            elif op.kind == "ews":
                prev, c = op.args
                values[op.out] = ews_update(None if prev is None else values[prev], values[c], model.alpha)
            elif op.kind == "head":
                h, v = op.args
                values[op.out] = model.heads[h](model.pool(values[v]))
            else:  # "zero": the delayed stem's first output, one copy for the whole batch
                channels, hw = op.args
                x = values[0]
                values[op.out] = x.new_zeros((1, channels, *hw))
        rows = self.indices.shape[0]
        logits = values[out].expand(rows, -1) if self._const[out] else values[out]
        for v in [v for v in values if self._last_use.get(v, -1) <= t]:
            del values[v]  # no later step reads it (the input itself goes once the stem has settled)
        self._macs += self._step_macs[t]
        self.macs_spent += self._step_macs[t] * rows
        self._t = t + 1
        return AnytimeStep(t, logits, self._macs, self.indices)
