"""The trajectory engine: the whole cascade over T steps, each distinct state computed once.

The step loop re-runs every block at every step. For a constant input most of that work repeats: the input
of block k stops changing after a fixed step (it *settles*), and a block fed the same state with the same
parameters produces the same output. The engine therefore works depth by depth. For each branch (stem,
residual, projection shortcut) it lists, for every step, a key: the identity of the branch's input state and
of the normalisation it uses at that step. Steps with equal keys share one computation. The distinct inputs
are stacked along a group axis, ``(B, G, C, H, W)``, so that a convolution sees one large batch
``(B*G, C, H, W)`` and batch norm one call with G*C channels (``TemporalBatchNorm2d.forward_groups``), each
group keeping its own statistics, exactly as if every step were its own forward pass.

Two kinds of states are kept apart: states that depend on the input (``(B, ...)``) and states that do not
(``(1, ...)``, stored once for the whole batch: with the stem delayed, everything at step 0 is such a state).

When are keys equal?
- In training, a batch norm normalises with the batch statistics of its input, so the key is the input state
  plus the scale/shift slot. Running statistics are updated afterwards, once per step in step order, from the
  statistics of the computation that step maps to: the same updates the step loop makes.
- In evaluation the key also holds the statistics slot, canonicalised: slots whose running statistics are
  bit-identical (every slot of a settled layer, after training) count as one. Slots that differ are computed
  separately, so the result is exact whatever the statistics are.
- Per-step scale/shift (``temporal_affine``), exponential smoothing (EWS, whose state changes at every step)
  and time-varying inputs leave few or no equal keys. The engine is then still exact (it is the step loop
  batched over time), just without the savings; time-varying inputs go through the step loop itself.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .blocks import Branch, ews_update
from .norm import _tracing

if TYPE_CHECKING:
    from .cascade import CascadedResNet
    from .norm import TemporalBatchNorm2d

__all__ = ["trajectory", "cumulative_macs", "feedforward_macs"]


# A state to add into a level: the state itself (a view), and the stack it is a view of with its position there
# (so that consecutive states of one stack can be added with one operation on a slice).
Term = tuple[Tensor, Tensor, int]


def _alone(x: Tensor) -> Term:
    """A state that is not part of a stack, as a term."""
    return x, x.unsqueeze(1), 0


@dataclass
class _Level:
    """The distinct states of one activation across the steps of a trajectory."""

    tensors: list[Tensor]  # class -> (B, C, H, W) if it depends on the input, else (1, C, H, W)
    const: list[bool]  # class -> does not depend on the input
    of_step: dict[int, int]  # step -> class
    stacks: dict[bool, tuple[Tensor, list[int]]] = field(default_factory=dict)  # const flag -> (stack, classes)
    where: dict[int, tuple[Tensor, int]] = field(default_factory=dict)  # class -> (its stack, position in it)

    def term(self, c: int) -> Term:
        return (self.tensors[c], *self.where[c])

    def stack(self, classes: list[int], const: bool) -> Tensor:
        """The given classes stacked on a group axis ``(B, G, ...)``; free when they are a stack already."""
        held = self.stacks.get(const)
        if held is not None and held[1] == classes:
            return held[0]
        return torch.stack([self.tensors[c] for c in classes], dim=1)


@dataclass
class _Run:
    """What one trajectory computation shares: the batch, the mode, and deferred statistics updates."""

    batch: int
    training: bool
    stat_classes: dict[int, list[int]]  # id(bn) -> canonical slot of each slot (evaluation)
    updates: list[tuple[int, TemporalBatchNorm2d, int, Tensor, Tensor]] = field(default_factory=list)
    costs: list[tuple[int, int]] | None = None  # (step first needed at, MACs per example), when counting
    # the input-independent branch outputs, in the order the engine makes them: recorded (a list to append to)
    # or replayed (``constants``, read in order) instead of recomputed; see ``constant_states``
    recorded: list[Tensor] | None = None
    constants: Sequence[Tensor] | None = None
    cursor: int = 0

    def norm_key(self, bn: TemporalBatchNorm2d, t: int) -> Hashable:
        if self.training:  # batch statistics: only the scale/shift slot matters
            return bn.affine_slot(t)
        return self.stat_classes[id(bn)][bn.stat_slot(t)], bn.affine_slot(t)

    def apply_updates(self) -> None:
        # The step loop updates each layer once per step, in step order; sorting by step (stable) replays it.
        # A layer whose steps all have slots of their own (temporal batch norm) takes them in one call.
        per_layer: dict[int, tuple[TemporalBatchNorm2d, list[tuple[int, Tensor, Tensor]]]] = {}
        for _, bn, slot, mean, var in sorted(self.updates, key=lambda u: u[0]):
            per_layer.setdefault(id(bn), (bn, []))[1].append((slot, mean, var))
        for bn, updates in per_layer.values():
            slots = [u[0] for u in updates]
            if len(set(slots)) == len(slots):
                bn.update_slots(slots, torch.stack([u[1] for u in updates]), torch.stack([u[2] for u in updates]))
            else:
                for slot, mean, var in updates:
                    bn.update(slot, mean, var)


def _combine(
    steps: Sequence[int],
    key_of: Callable[[int], Hashable],
    make: Callable[[Hashable], tuple[tuple[Term, ...], bool]],
    relu: bool,
    batch: int,
) -> _Level:
    """Build a level from per-step keys: ``make(key)`` gives each distinct state once, as the one or two terms
    whose sum it is, and whether it is input-independent. The states are stacked, with an optional ReLU applied
    to the stacks in place (so autograd saves one stacked activation, not a copy per state). Without autograd
    the sums are written straight into the stack, one operation for each run of states whose terms are
    consecutive in their own stacks (in a parallel cascade, two per block: no temporary per state, no copy)."""
    keys: dict[Hashable, int] = {}
    made: list[tuple[tuple[Term, ...], bool]] = []
    of_step = {}
    for t in steps:
        key = key_of(t)
        if key not in keys:
            keys[key] = len(made)
            made.append(make(key))
        of_step[t] = keys[key]
    level = _Level([None] * len(made), [c for _, c in made], of_step)  # type: ignore[list-item]
    grad = torch.is_grad_enabled() or _tracing()  # compilers cannot trace add(out=) into a strided view
    for const in (False, True):
        classes = [i for i, (_, c) in enumerate(made) if c == const]
        if not classes:
            continue
        if grad:
            stacked = torch.stack([_sum(made[i][0]) for i in classes], dim=1)
        else:
            first = made[classes[0]][0][0][0]
            stacked = first.new_empty((1 if const else batch, len(classes), *first.shape[1:]))
            for j, k in _runs([made[i][0] for i in classes]):
                terms = [base[:, pos : pos + k - j] for _, base, pos in made[classes[j]][0]]
                if len(terms) == 1:
                    stacked[:, j:k].copy_(terms[0])
                else:
                    torch.add(*terms, out=stacked[:, j:k])
        if relu:
            stacked.relu_()
        level.stacks[const] = (stacked, classes)
        for j, (i, piece) in enumerate(zip(classes, _split(stacked))):
            level.tensors[i] = piece
            level.where[i] = (stacked, j)
    return level


def _runs(states: list[tuple[Term, ...]]) -> list[tuple[int, int]]:
    """Split a list of states into runs ``[j, k)`` in which each term comes from the same stack as in the state
    before, one position further."""
    runs, start = [], 0
    for j in range(1, len(states) + 1):
        if j == len(states) or not _follows(states[j - 1], states[j]):
            runs.append((start, j))
            start = j
    return runs


def _follows(a: tuple[Term, ...], b: tuple[Term, ...]) -> bool:
    return len(a) == len(b) and all(x[1] is y[1] and x[2] + 1 == y[2] for x, y in zip(a, b))


def _split(stacked: Tensor) -> tuple[Tensor, ...]:
    """The states of a stack ``(B, G, ...)`` as views. One ``unbind``, not a ``select`` per state: in the backward
    pass each select would spread its gradient over a zero tensor the size of the whole stack (G states: G^2
    state-sized fills and adds), while unbind stacks the G gradients once."""
    return stacked.unbind(1)


def _sum(terms: tuple[Term, ...]) -> Tensor:
    return terms[0][0] if len(terms) == 1 else terms[0][0] + terms[1][0]


def _run_branch(branch: Branch, level: _Level, steps: Sequence[int], run: _Run, lag: int) -> _Level:
    """Evaluate ``branch`` at the given steps on the states of ``level``, once per distinct key.

    ``lag``: how many steps after its computation a result reaches the output (1 for delayed values), for
    cost accounting.
    """
    norms = branch.norms()
    units: dict[Hashable, list[int]] = {}  # key -> steps, in order of first appearance
    for t in steps:
        key = (level.of_step[t], tuple(run.norm_key(bn, t) for bn in norms))
        units.setdefault(key, []).append(t)
    unit_steps = list(units.values())
    out = _Level([None] * len(unit_steps), [level.const[level.of_step[s[0]]] for s in unit_steps], {})  # type: ignore[list-item]
    for u, ts in enumerate(unit_steps):
        for t in ts:
            out.of_step[t] = u
    for const in (False, True):
        members = [u for u in range(len(unit_steps)) if out.const[u] == const]
        if not members:
            continue
        first = [unit_steps[u][0] for u in members]  # a representative step of each computation
        x = level.stack([level.of_step[t] for t in first], const)  # (B, G, C, H, W)
        macs = branch.macs(x.shape[-2:])[0] if run.costs is not None else 0
        if const and run.constants is not None:  # recorded before: not recomputed (see constant_states)
            x, stats = run.constants[run.cursor], [None] * len(norms)
            run.cursor += 1
        else:
            x, stats = branch.forward_groups(x, first, count=run.batch if const else None)
            if const and run.recorded is not None:
                run.recorded.append(x)
        for bn, s in zip(norms, stats):
            if s is not None:
                for j, u in enumerate(members):
                    for t in unit_steps[u]:
                        run.updates.append((t, bn, bn.stat_slot(t), s[0][j], s[1][j]))
        out.stacks[const] = (x, members)
        for j, (u, piece) in enumerate(zip(members, _split(x))):
            out.tensors[u] = piece
            out.where[u] = (x, j)
            if run.costs is not None and not const:
                run.costs.append((unit_steps[u][0] + lag, macs))
    return out


def _block(model: CascadedResNet, k: int, level: _Level, T: int, scheme: str, run: _Run) -> _Level:
    block = model.blocks[k]
    osd = model.delay == "osd"
    steps = [t for t in range(T) if model.computes_residual(k, t, scheme)]
    res = _run_branch(block.residual, level, steps, run, lag=1 if osd else 0)
    short = level if block.shortcut is None else _run_branch(block.shortcut, level, range(T), run, lag=0)

    # The value added to the shortcut at each step, by key: the delayed residual (OSD) or the smoothed
    # residual (EWS, whose key chains the previous step's key, so it is new at every step unless alpha = 0).
    added: dict[Hashable, tuple[Term, bool]] = {}
    added_key: list[Hashable] = []
    prev: Hashable = None
    for t in range(T):
        key: Hashable = None
        if osd and t >= 1 and model.active(k, t, scheme):
            c = res.of_step[t - 1]
            key = ("res", c)
            added.setdefault(key, (res.term(c), res.const[c]))
        elif not osd and model.active(k, t, scheme):
            c = res.of_step[t]
            key = ("res", c) if model.alpha == 0 else ("ews", prev, c)
            if key not in added:
                held = None if prev is None else added[prev]
                value = ews_update(None if held is None else held[0][0], res.tensors[c], model.alpha)
                term = res.term(c) if value is res.tensors[c] else _alone(value)
                added[key] = (term, res.const[c] and (held is None or held[1]))
        prev = key
        added_key.append(key)

    def make(key: Hashable) -> tuple[tuple[Term, ...], bool]:
        s, a = key  # type: ignore[misc]
        x, const = short.term(s), short.const[s]
        if a is None:
            return (x,), const
        value, vconst = added[a]
        return (x, value), const and vconst

    return _combine(range(T), lambda t: (short.of_step[t], added_key[t]), make, relu=True, batch=run.batch)


def _trajectory(model: CascadedResNet, x: Tensor, T: int, scheme: str, run: _Run) -> Tensor:
    B = x.shape[0]
    inp = _Level([x], [False], dict.fromkeys(range(T), 0), {False: (x.unsqueeze(1), [0])}, {0: (x.unsqueeze(1), 0)})
    stem = _run_branch(model.stem, inp, range(T), run, lag=1 if model.stem_delay else 0)
    if model.stem_delay:
        zero = torch.zeros_like(stem.tensors[0][:1])

        def make_stem(key: Hashable) -> tuple[tuple[Term, ...], bool]:
            return ((_alone(zero),), True) if key is None else ((stem.term(key),), stem.const[key])  # type: ignore[arg-type]

        level = _combine(range(T), lambda t: None if t == 0 else stem.of_step[t - 1], make_stem, False, B)
    else:
        level = stem
    for k in range(model.num_blocks):
        level = _block(model, k, level, T, scheme, run)

    pooled = {c: model.pool(level.tensors[c]) for c in set(level.of_step.values())}
    logits: dict[tuple[int, int], Tensor] = {}
    out = []
    for t in range(T):
        c, h = level.of_step[t], min(t, len(model.heads) - 1)
        if (c, h) not in logits:
            logits[(c, h)] = model.heads[h](pooled[c])
            if run.costs is not None and not level.const[c]:
                run.costs.append((t, model.features * model.num_classes))
        out.append(logits[(c, h)].expand(B, -1))
    return torch.stack(out)  # (T, B, num_classes)


Classes = dict[int, list[int]]


def stat_classes(model: CascadedResNet) -> Classes:
    """Per batch norm (by id), the canonical slot of each statistics slot: the plan's part that depends on the
    statistics' values (``TemporalBatchNorm2d.stat_classes``)."""
    return {id(bn): bn.stat_classes() for bn in model.norms()}


def _new_run(model: CascadedResNet, batch: int, classes: Classes | None = None) -> _Run:
    training = model.training
    if training:
        classes = {}
    elif classes is None:
        classes = stat_classes(model)
    return _Run(batch, training, classes)


def trajectory(
    model: CascadedResNet,
    x: Tensor,
    T: int,
    scheme: str,
    constants: Sequence[Tensor] | None = None,
    classes: Classes | None = None,
) -> Tensor:
    """Logits of every step for a constant input ``x``: ``(T, B, num_classes)``, equal to the step loop's
    (and, in training, with the same running-statistics updates). ``constants`` and ``classes``: the
    input-independent branch outputs recorded by ``constant_states`` and the slot classes it recorded them
    with (evaluation; exported programs, whose plan is fixed when they are made)."""
    run = _new_run(model, x.shape[0], classes)
    run.constants = constants
    out = _trajectory(model, x, T, scheme, run)
    if constants is not None and run.cursor != len(constants):
        raise ValueError(f"{len(constants)} recorded constant states, the trajectory used {run.cursor}")
    run.apply_updates()
    return out


@torch.no_grad()
def constant_states(
    model: CascadedResNet, input_size: tuple[int, int, int], T: int, scheme: str, classes: Classes
) -> list[Tensor]:
    """The branch outputs of a trajectory that do not depend on the input (with the stem delayed: all of step 0,
    and the deep blocks' states before the input reaches them), in the order the engine makes them, with every
    statistics slot distinct; ``trajectory(..., constants=...)`` uses them instead of recomputing them.

    Exported programs carry them as constants: their statistics slots were estimated on these constant fields,
    so their variances are 0 or nearly and batch norm multiplies the last-bit differences between two
    convolution implementations by ``weight / sqrt(eps)`` (~300) per layer; another runtime recomputing them
    (ONNX Runtime) differed from PyTorch by up to 8e-5 at step 0 on a model with recalibrated statistics."""
    param = next(model.parameters())
    x = torch.zeros(1, *input_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        run = _new_run(model, 1, classes)
        run.recorded = []
        _trajectory(model, x, T, scheme, run)
    finally:
        model.train(was_training)
    return [t.clone() for t in run.recorded]


@torch.no_grad()
def cumulative_macs(model: CascadedResNet, input_size: tuple[int, int, int], T: int, scheme: str) -> list[int]:
    """Per step, the multiply-accumulates per example that serial hardware spends to produce steps 0..t with
    this engine (see ``CascadedResNet.exit_costs``): the engine is run once on one example and every computation
    it makes is charged to the first step that needs its result."""
    param = next(model.parameters())
    x = torch.zeros(1, *input_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        run = _new_run(model, 1)
        run.costs = []
        _trajectory(model, x, T, scheme, run)
    finally:
        model.train(was_training)
    per_step = [0] * T
    for t, macs in run.costs:
        if t < T:
            per_step[t] += macs
    return list(itertools.accumulate(per_step))


def feedforward_macs(model: CascadedResNet, input_size: tuple[int, int, int]) -> int:
    """MACs of one ordinary forward pass for one example (convolutions and the classifier)."""
    total, hw = model.stem.macs(tuple(input_size[1:]))
    for block in model.blocks:
        if block.shortcut is not None:
            total += block.shortcut.macs(hw)[0]
        macs, hw = block.residual.macs(hw)
        total += macs
    return total + model.features * model.num_classes
