"""A model's size estimated before it is built: ``--width 1000000``, ``--num-steps 10**12`` or an MSDNet of 100
blocks would otherwise allocate until the machine gives up.

The estimate builds the model at a small size of the options that make it large (width, steps, blocks), which
costs milliseconds, and extrapolates: conv weights grow with the square of the width, per-step tables
(temporal batch norm, one classifier per step) with the steps, an MSDNet's dense connections with the square of
its blocks.

The activations a batch needs are measured, not extrapolated: the model is built on PyTorch's ``meta`` device
(shapes only: no memory, no arithmetic) and run on batches of one and two examples; every tensor the forward
keeps for the backward pass is counted once (a tensor saved by several operations, or a view of one, counts
once; the weights not at all), and a batch of B keeps B times what one example adds. For inference nothing is
kept for a backward pass, but the largest activation and the one it is computed from coexist: twice the
largest saved tensor, a lower bound.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..utils.memory import check_fits, format_bytes
from .anytime import ModelConfig

__all__ = ["activation_bytes", "check_model_fits", "check_training_fits", "estimate_elements"]

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


def activation_bytes(config: ModelConfig, input_shape: tuple[int, ...]) -> tuple[float, float] | None:
    """Bytes each example of a batch adds to what its forward pass holds at once: while training, the tensors
    kept for the backward pass (each counted once; the weights, counted elsewhere, not); for inference, twice
    the largest of them. Measured on the ``meta`` device at batches of 1 and 2 (what does not grow with the
    batch, such as a cascade's input-independent states, is not per example); no memory is allocated (~0.1 s;
    the first call of a process loads PyTorch's meta kernels). None where the model cannot run there (then
    nothing is estimated)."""
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = config.build()
        model.train()
        one, two = (_kept(model, torch.empty(b, *input_shape, device="meta")) for b in (1, 2))
    except Exception:  # an unusual model (a user's modules, an op without a meta kernel): no estimate
        return None
    if not two:
        return None
    # inference, per example: twice the largest tensor of the batch of two, halved
    return max(sum(two) - sum(one), 0.0), float(max(two))


def _kept(model: torch.nn.Module, x: torch.Tensor) -> list[int]:
    """The sizes of the tensors the forward pass of ``x`` keeps for the backward pass, each once, weights not."""
    weights = {id(t) for t in (*model.parameters(), *model.buffers())}
    kept: dict[int, tuple[torch.Tensor, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in weights:  # the tensor itself is kept in ``kept``, so its id stays unique
            kept[id(base)] = (base, base.numel() * base.element_size())
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return [size for _, size in kept.values()]


def check_training_fits(config: ModelConfig, input_shape: tuple[int, ...], batch_size: int,
                        eval_batch_size: int | None = None) -> None:  # fmt: skip
    """Refuse (``MemoryEstimateError``, one line) training that would not fit: the weights, their gradients, the
    optimizer's state and the checkpoint's copy (six float32 copies), plus the activations of a training batch
    of ``batch_size`` (or of an evaluation batch of ``eval_batch_size``, if more)."""
    elements = estimate_elements(config)
    if elements is None:
        return
    weights = elements * 4 * 6
    per_train, per_infer = activation_bytes(config, input_shape) or (0.0, 0.0)
    activations, flag, batch, per = max(
        (per_train * batch_size, "--batch-size", batch_size, per_train),
        (per_infer * (eval_batch_size or 0), "--eval-batch-size", eval_batch_size, per_infer),
        key=lambda c: c[0],
    )
    what = f"training this model ({elements:.3g} parameters)"
    if activations > weights / 6:  # the batch is what makes it large: say so, and what to change
        check_fits(weights + activations, f"{what} with {flag} {batch} ({format_bytes(per)} of activations per "
                   "example)", f"choose a smaller {flag} (or a smaller model)")  # fmt: skip
    else:
        check_fits(weights + activations, what, "choose a smaller model (--width, --num-steps, --num-blocks, ...)")
