"""Running a model on a device: device choice, mixed precision, and the exit logits of a whole dataset.

Shared by training (validation) and evaluation, so that both compute the same numbers the same way.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.datasets import ImageSet
from ..data.loader import iterate_batches, num_batches

__all__ = ["resolve_device", "autocast", "dataset_logits"]


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; ``ValueError`` otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    return device


def autocast(device_type: str, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device_type`` when enabled, else nothing."""
    return torch.autocast(device_type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


@torch.no_grad()
def dataset_logits(
    model: nn.Module,
    ds: ImageSet,
    mean: Tensor,
    std: Tensor,
    *,
    batch_size: int = 500,
    amp: bool = False,
    progress: bool = False,
    desc: str = "eval",
    **run_options: Any,
) -> Tensor:
    """The logits of every exit for a whole dataset, ``(E, N, C)`` float32 on the CPU, in evaluation mode.

    ``run_options`` are passed to every ``model(x, ...)`` call (for a cascade: ``scheme``, ``num_steps``).
    """
    was_training = model.training
    model.eval()
    out = []
    batches = iterate_batches(ds, batch_size, shuffle=False, augment=False, mean=mean, std=std)
    n = num_batches(len(ds), batch_size, False)
    try:
        for x, _ in tqdm(batches, total=n, desc=desc, disable=not progress, leave=False):
            with autocast(ds.images.device.type, amp):
                out.append(model(x, **run_options).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out, dim=1)
