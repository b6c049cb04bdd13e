"""A model's size estimated before it is built: ``--width 1000000``, ``--num-steps 10**12`` or an MSDNet of 100
blocks would otherwise allocate until the machine gives up.

The estimate builds the model at a small size of the options that make it large (width, steps, blocks), which
costs milliseconds, and extrapolates: conv weights grow with the square of the width, per-step tables
(temporal batch norm, one classifier per step) with the steps, an MSDNet's dense connections with the square of
its blocks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..utils.memory import check_fits
from .anytime import ModelConfig

__all__ = ["estimate_elements", "check_model_fits"]

_WIDTH, _STEPS, _BLOCKS = 8, 32, 6  # the probes' sizes


def _count(config: ModelConfig, **changes: Any) -> float:
    with torch.random.fork_rng(devices=[]):  # the probe's initialisation leaves the caller's random state alone
        model = dataclasses.replace(config, **changes).build()
    return float(sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers()))


def estimate_elements(config: ModelConfig) -> float | None:
    """The number of parameter and buffer elements of ``config``'s model, estimated from small builds; None
    where the probes cannot be built (an unusual configuration: then nothing is estimated)."""
    names = {f.name for f in dataclasses.fields(config)}
    width = getattr(config, "width", None) if "width" in names else None
    steps = getattr(config, "num_steps", None) if "num_steps" in names else None
    blocks = getattr(config, "num_blocks", None) if "num_blocks" in names else None
    probe: dict[str, Any] = {}
    scale = 1.0
    if isinstance(width, int) and not isinstance(width, bool) and width > _WIDTH:
        probe["width"], scale = _WIDTH, (width / _WIDTH) ** 2
    elif isinstance(width, float) and width > 1.0:
        probe["width"], scale = 1.0, width**2
    big_steps = isinstance(steps, int) and steps > 2 * _STEPS
    big_blocks = isinstance(blocks, int) and blocks > _BLOCKS + 2
    try:
        if big_steps:
            a = _count(config, **probe, num_steps=_STEPS)
            b = _count(config, **probe, num_steps=2 * _STEPS)
            return scale * (b + (steps - 2 * _STEPS) * max(b - a, 0.0) / _STEPS)
        if big_blocks:  # a quadratic through three small sizes
            n0 = _BLOCKS - 2
            y = [_count(config, **probe, num_blocks=n0 + 2 * k) for k in range(3)]
            x = (blocks - n0) / 2
            second = y[2] - 2 * y[1] + y[0]
            return scale * max(y[0] + x * (y[1] - y[0]) + x * (x - 1) / 2 * second, y[2])
        return scale * _count(config, **probe) if probe else _count(config)
    except (TypeError, ValueError, RuntimeError, MemoryError):
        return None


def check_model_fits(config: ModelConfig, copies: int, what: str) -> None:
    """Refuse (``MemoryEstimateError``, one line) a model whose ``copies`` float32 copies of its parameters and
    buffers (weights; gradients and optimizer state when training) exceed the memory available."""
    elements = estimate_elements(config)
    if elements is not None:
        check_fits(elements * 4 * copies, f"{what} ({elements:.3g} parameters)",
                   "choose a smaller model (--width, --num-steps, --num-blocks, ...)")  # fmt: skip
