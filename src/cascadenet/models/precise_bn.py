"""Batch-norm statistics that match the weights ("precise BN"): ``recalibrate_bn``, an operation on any model.

Training keeps each batch norm's running statistics as an exponential moving average of batch statistics taken
while the weights moved, so at the end they describe weights a few hundred steps old. Usually the lag does not
matter. In a cascade with the stem delayed it does: the early steps' states do not depend on the input (nearly
constant fields whose variance is far below eps), and evaluation divides their deviation from a lagging running
mean by ``sqrt(running_var + eps)``, amplifying the lag by up to ``1/sqrt(eps)``: the early steps' softmax
saturates on one class for every input. ``recalibrate_bn`` recomputes every layer's statistics (every slot of a
temporal batch norm) as the plain average over a few batches at the final weights, as
``torch.optim.swa_utils.update_bn`` and fvcore's precise BN do; see docs/semantics.md. The training loop, the
``cascadenet recalibrate`` verb and the noise analysis's EWS variants all call it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .norm import TemporalBatchNorm2d

__all__ = ["recalibrate_bn"]


def _norm_layers(model: nn.Module) -> list[nn.Module]:
    """Every batch norm with running statistics: temporal ones (each slot) and PyTorch's (other families)."""
    return [
        m
        for m in model.modules()
        if isinstance(m, TemporalBatchNorm2d) or (isinstance(m, _BatchNorm) and m.track_running_stats)
    ]


def _first(batch: Any) -> Tensor:
    """The input of a batch given as ``x`` or as ``(x, y, ...)``."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, Tensor):
        raise TypeError(f"recalibrate_bn takes batches of tensors (or (x, y) pairs), got {type(x).__name__}")
    return x


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward: Callable[[nn.Module, Tensor], Any] | None = None,
) -> dict[str, int]:
    """Recompute the running statistics of every batch norm of ``model`` at its current weights.

    Each layer's statistics (each slot of a ``TemporalBatchNorm2d``, whose updates the step loop and the trajectory
    engine both make) are reset and replaced by the exact average of the batch statistics that the forward passes
    over ``batches`` fold into it: the mean of the batch means and of the unbiased batch variances (a cumulative
    average, ``momentum=None``, as ``torch.optim.swa_utils.update_bn``). A slot that several steps of one forward
    pass update (steps past the last slot, or a feed-forward pass that writes every slot) averages all of those
    updates equally. Statistics that no forward pass reaches keep their values. The passes run in training mode
    without gradients; afterwards every module's mode and every layer's momentum are as before. If the passes are
    interrupted (an error, Ctrl-C), the statistics are put back as they were.

    Args:
        model: any module; its batch norms are ``TemporalBatchNorm2d`` and ``nn.BatchNorm*`` (tracking statistics).
        batches: inputs ``x``, or ``(x, y)`` pairs (the labels are not used); moved to the model's device.
        forward: how to run the model on a batch (default ``model(x)``): e.g. the feed-forward pass for a model
            trained with ``--loss final``, or a pass under autocast.

    Returns:
        ``{"batches": n, "examples": m}``: what the statistics were computed from.

    Raises:
        ValueError: ``batches`` is empty.
    """
    layers = _norm_layers(model)
    param = next(itertools.chain(model.parameters(), model.buffers()), None)
    device = param.device if param is not None else None
    modes = [(m, m.training) for m in model.modules()]
    saved = [(m, m.momentum, {k: v.clone() for k, v in m.named_buffers(recurse=False)}) for m in layers]
    counts_before = [getattr(m, "slot_updates", None) for m in layers]
    try:
        n_batches, n_examples = _average_passes(model, layers, batches, forward or (lambda m, x: m(x)), device)
        for m, _, before in saved:
            _keep_unreached(m, before)
    except BaseException:
        _put_back(layers, saved, counts_before)  # the statistics as they were: no half-recalibrated model
        raise
    finally:
        for m, momentum, _ in saved:
            m.momentum = momentum
        for m, training in modes:
            m.training = training
    return {"batches": n_batches, "examples": n_examples}


def _average_passes(
    model: nn.Module, layers: list[nn.Module], batches: Iterable[Any], run: Callable[[nn.Module, Tensor], Any],
    device: torch.device | None,
) -> tuple[int, int]:  # fmt: skip
    """The forward passes over ``batches`` in training mode, every layer's statistics reset and set to average
    them (``momentum=None``); returns the numbers of batches and examples."""
    n_batches = n_examples = 0
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for batch in batches:
        x = _first(batch)
        if device is not None:
            x = x.to(device, non_blocking=True)
        run(model, x)
        n_batches += 1
        n_examples += len(x)
    if n_batches == 0:
        raise ValueError("recalibrate_bn: no batches to compute the statistics from")
    return n_batches, n_examples


def _put_back(layers: list[nn.Module], saved: list[tuple[nn.Module, Any, dict[str, Tensor]]],
              counts_before: list[Any]) -> None:  # fmt: skip
    """Every layer's statistics (and slot update counts) as they were before the passes."""
    for m, _, before in saved:
        for k, v in m.named_buffers(recurse=False):
            v.copy_(before[k])
    for m, counts in zip(layers, counts_before):
        if counts is not None:
            m.slot_updates = counts


def _keep_unreached(m: nn.Module, before: dict[str, Tensor]) -> None:
    """Statistics that no forward pass updated keep their old values (not the reset's 0 and 1): e.g. the slots of
    residual branches that the serial scheme never computes, or a layer the forward pass does not use."""
    if isinstance(m, TemporalBatchNorm2d):
        for slot, n in enumerate(m.slot_updates):
            if n == 0:
                m.running_mean[slot] = before["running_mean"][slot]
                m.running_var[slot] = before["running_var"][slot]
    elif int(m.num_batches_tracked) == 0:
        for k, v in m.named_buffers(recurse=False):
            v.copy_(before[k])
