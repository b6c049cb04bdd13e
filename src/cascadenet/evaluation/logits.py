"""The exit logits of a whole dataset.

Shared by training (validation), evaluation and the property analyses, so that all compute the same numbers the
same way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.datasets import ImageSet
from ..data.loader import iterate_batches, num_batches
from ..utils.device import autocast
from ..utils.memory import check_fits

__all__ = ["dataset_logits", "check_logits_memory"]


def check_logits_memory(model: nn.Module, n: int, **run_options: Any) -> None:
    """Refuse, before computing any of it, an ``(E, N, C)`` logit trajectory larger than the memory available
    (``--num-steps 100000000``)."""
    exits = run_options.get("num_steps") or getattr(model, "num_steps", None)
    classes = getattr(getattr(model, "config", None), "num_classes", None)
    if isinstance(exits, int) and isinstance(classes, int):
        check_fits(4.0 * exits * n * classes, f"the logits of {exits} exits for {n} examples", "use fewer --num-steps")


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
    check_logits_memory(model, len(ds), **run_options)
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
