"""Latency on parallel hardware from a model's structure: the critical path to each exit, in two units.

Every family is a graph of layers; with unlimited parallel hardware an exit is ready after the longest path
from the input to it. Two ways of weighing that path's layers:

- ``"layers"``: every convolution one unit, shortcut projections (1x1 conv + batch norm) included, parallel
  paths the max (a residual block's 3x3 pair against its projection; MSDNet's same-scale and strided convs),
  batch norm, ReLU, pooling, additions and concatenations free. An exit's classifier layer (the linear read-out
  every exit of every family ends in) is not counted: it adds the same unit to every exit. MSDNet's classifier
  convolutions are counted (they are convolutions on the path).
- ``"blocks"``: the paper's block units: the stem one unit, each residual block's branch (an MSDNet dense layer)
  one unit, shortcuts and transitions none, MSDNet's classifier one unit (two 3x3 convs, as deep as a layer).
  This is what ``exit_costs(...).latency`` reports, here derived from the same graph.

A cascade is unrolled over its steps: block k's output at step t is
``relu(S_k(y_{k-1}(t)) + F_k(y_{k-1}(t-1)))`` (one-step delay; EWS smooths ``F_k(y_{k-1}(t))``), so the skip chain
is crossed within a step and the delayed branch adds its depth to the previous step's input. Values that do not
depend on the input (step 0 with the stem delayed, branches whose input is such a value) are constants, ready at
0. ResNet-10's parallel cascade with the stem delayed: steps 1..5 at 4, 6, 7, 8, 9 layers (block units 1..5);
SDN on ResNet-10 with ICs after blocks 1, 2, 3: 3, 5, 7 and the final exit 9 layers.
"""

from __future__ import annotations

import math
from typing import Any, Literal

__all__ = ["UNITS", "critical_path"]

Unit = Literal["layers", "blocks"]
UNITS = ("layers", "blocks")
_CONST = -math.inf  # the depth of a value that does not depend on the input


def critical_path(model: Any, input_size: tuple[int, int, int] | None = None, unit: Unit = "layers",
                  **run_options: Any) -> list[float] | None:  # fmt: skip
    """Per exit, the length of the longest path from the input to the exit's output (see the module docstring).

    Args:
        model: a cascaded ResNet, an SDN or an MSDNet (another family: its own ``critical_path(unit, ...)``
            method if it has one, else None).
        input_size: ``(C, H, W)``; the depth does not depend on it, it is accepted for symmetry with exit_costs.
        unit: ``"layers"`` or ``"blocks"``.
        run_options: a cascade's ``scheme`` and ``num_steps``.

    Returns:
        one float per exit, or None for a family whose structure is unknown here.
    """
    if unit not in UNITS:
        raise ValueError(f"unknown latency unit {unit!r}; valid choices: {', '.join(UNITS)}")
    from .cascade import CascadedResNet
    from .msdnet import MSDNet
    from .sdn import SDN

    if isinstance(model, CascadedResNet):
        scheme, steps = model._resolve(run_options.get("scheme"), run_options.get("num_steps"))
        return _cascade(model, steps, scheme, unit)
    if isinstance(model, SDN):
        return _sdn(model, unit)
    if isinstance(model, MSDNet):
        return _msdnet(model, unit)
    own = getattr(model, "critical_path", None)
    return own(unit, **run_options) if callable(own) else None


def _length(branch: Any, unit: Unit, block_units: int = 1) -> float:
    """A branch's depth: its convolutions (layers) or ``block_units`` (blocks); an absent branch (identity) 0."""
    if branch is None:
        return 0.0
    return float(len(branch.units)) if unit == "layers" else float(block_units)


def _ready(depth: float) -> float:
    return 0.0 if depth == _CONST else float(depth)


def _cascade(model: Any, steps: int, scheme: str, unit: Unit) -> list[float]:
    stem = _length(model.stem, unit)
    shortcut = [_length(b.shortcut, unit, 0) for b in model.blocks]
    residual = [_length(b.residual, unit) for b in model.blocks]
    held: list[float | None] = [None] * len(model.blocks)  # depth of each block's delay buffer (None: zero)
    out = []
    for t in range(steps):
        y = (_CONST if t == 0 else stem) if model.stem_delay else stem
        new_held: list[float | None] = []
        for k in range(len(model.blocks)):
            short = y + shortcut[k]
            if model.delay == "osd":
                delayed = held[k] if model.active(k, t, scheme) else None
                new = y + residual[k] if model.computes_residual(k, t, scheme) else None
            elif model.active(k, t, scheme):  # EWS: this step's branch value, smoothed with the previous one
                prev = _CONST if held[k] is None else held[k]
                new = delayed = max(prev, y + residual[k])
            else:
                new = delayed = None
            new_held.append(new)
            y = short if delayed is None else max(short, delayed)
        held = new_held
        out.append(_ready(y))
    return out


def _sdn(model: Any, unit: Unit) -> list[float]:
    y = _length(model.stem, unit)
    depth = [y]  # after the stem, then after each block
    for b in model.blocks:
        y += max(_length(b.shortcut, unit, 0), _length(b.residual, unit))
        depth.append(y)
    return [depth[k] for k in model.ic_after] + [depth[-1]]


def _msdnet(model: Any, unit: Unit) -> list[float]:
    from .msdnet import _DenseLayer

    S = model.config.num_scales
    # the stem: a conv to the finest scale, then one per coarser scale (layers); one unit (blocks)
    d = [float(s + 1) for s in range(S)] if unit == "layers" else [1.0] * S
    out = []
    for block in model.blocks:
        for layer in block:
            if isinstance(layer, _DenseLayer):
                new = list(d)
                first = S - layer.out_scales
                for a, u in zip(range(first, S), layer.updates):
                    if unit == "layers":
                        same = d[a] + len(u.same)
                        down = d[a - 1] + len(u.down) if u.down is not None else _CONST
                    else:
                        same = d[a] + 1
                        down = d[a - 1] + 1 if u.down is not None else _CONST
                    new[a] = max(d[a], same, down)
                d = new
            elif unit == "layers":  # a transition: one 1x1 conv per kept scale
                d = [x + 1 for x in d]
        out.append(d[-1] + (2.0 if unit == "layers" else 1.0))  # the classifier's two convs on the coarsest map
    return out
