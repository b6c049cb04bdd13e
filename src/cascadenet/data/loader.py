"""In-memory batching of an :class:`~cascadenet.data.datasets.ImageSet`: splitting, statistics, augmented batches.

The whole (small) dataset lives in one uint8 tensor, on the GPU when training there, so that batching is an
index slice of a random permutation and augmentation (random crop, horizontal flip) is a handful of tensor ops
on the whole batch: no DataLoader, no worker processes, no per-sample Python loop (the airbench approach).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .datasets import DataError, ImageSet

__all__ = [
    "check_compatible",
    "iterate_batches",
    "normalization",
    "num_batches",
    "train_val_indices",
    "train_val_split",
]


def train_val_split(ds: ImageSet, val_fraction: float = 0.1, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Splits a train set into (train, validation) with a seeded random permutation.

    The same seed gives the same split on any machine (a seeded CPU ``torch.Generator``). Both parts keep the
    original sample order. Not stratified.

    Raises:
        ValueError: ``val_fraction`` is not in (0, 1) or ``ds`` has fewer than two samples.
    """
    train_idx, val_idx = train_val_indices(len(ds), val_fraction, seed)
    return ds.subset(train_idx), ds.subset(val_idx)


def train_val_indices(n: int, val_fraction: float = 0.1, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The positions in the original order (sorted int64 tensors) of the two parts that :func:`train_val_split`
    makes of ``n`` samples: what maps a run's validation example to per-example data of the whole training set
    (e.g. published consistency scores, indexed in the dataset's original order).

    Raises:
        ValueError: ``val_fraction`` is not in (0, 1) or ``n`` < 2.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if n < 2:
        raise ValueError(f"cannot split a dataset of {n} sample(s)")
    n_val = min(max(round(n * val_fraction), 1), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def normalization(ds: ImageSet) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (population) std of ``ds`` in [0, 1] pixel units, as float32 tensors of shape (C,).

    Computed exactly with integer sums in chunks (no float copy of the whole set), on the images' device.
    A constant channel gets std 1 so that normalising never divides by zero.
    """
    if len(ds) == 0:
        raise ValueError("cannot compute normalization statistics of an empty dataset")
    total = torch.zeros(ds.num_channels, dtype=torch.int64, device=ds.images.device)
    squares = torch.zeros_like(total)
    for chunk in ds.images.split(4096):
        wide = chunk.to(torch.int32)
        total += wide.sum(dim=(0, 2, 3), dtype=torch.int64)
        squares += (wide * wide).sum(dim=(0, 2, 3), dtype=torch.int64)
    count = ds.images.numel() // ds.num_channels
    mean = total.double() / count
    var = (squares.double() / count - mean**2).clamp_min(0)
    std = var.sqrt() / 255
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (mean / 255).float(), std.float()


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    """Number of batches :func:`iterate_batches` yields for ``n`` samples."""
    return n // batch_size if drop_last else -(-n // batch_size)


def iterate_batches(
    ds: ImageSet,
    batch_size: int,
    *,
    shuffle: bool,
    augment: bool,
    mean: Tensor,
    std: Tensor,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    crop_padding: int | None = None,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yields one epoch of normalized batches ``(x, y)`` on the device of ``ds.images``.

    All random draws of the epoch (the permutation, crop offsets, flips) are made from ``generator`` (a CPU
    generator; ``None`` uses torch's global one) when this function is called, not lazily: restoring the
    generator state saved before the call reproduces the epoch exactly, however many batches were consumed.

    Args:
        ds: the dataset.
        batch_size: samples per batch (the last one may be smaller unless ``drop_last``).
        shuffle: visit the samples in a random permutation (else in order).
        augment: random crop with zero padding, plus a random horizontal flip when ``ds.hflip``.
        mean: per-channel mean, shape (C,), in [0, 1] units (see :func:`normalization`).
        std: per-channel std, shape (C,).
        generator: source of randomness.
        drop_last: drop the last incomplete batch.
        crop_padding: padding of the random crop; default 4 for images of 32 px or more, else 2. 0 disables it.
        shard: ``(rank, processes)``: the epoch is cut into global batches of ``processes * batch_size`` (with the
            same draws as one process at that batch size) and this process gets part ``rank`` of each, so the
            processes' parts are disjoint and together are the epoch.

    Returns:
        An iterator of ``x`` float32 (the default dtype) (B, C, H, W) and ``y`` int64 (B,).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rank, processes = shard
    if not 0 <= rank < processes:
        raise ValueError(f"shard must be (rank, processes) with 0 <= rank < processes, got {shard}")
    c, h, w = ds.images.shape[1:]
    if mean.shape != (c,) or std.shape != (c,):
        raise ValueError(f"mean and std must have shape ({c},), got {tuple(mean.shape)} and {tuple(std.shape)}")
    device, n = ds.images.device, len(ds)
    pad = (4 if min(h, w) >= 32 else 2) if crop_padding is None else crop_padding
    if pad < 0:
        raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
    order, shifts, flips = _epoch_draws(n, shuffle, pad if augment else 0, augment and ds.hflip, generator, device)
    # (x / 255 - mean) / std, folded into one multiply-add, in the default dtype (float32 unless the user made it
    # float64, whose models then get float64 inputs)
    dtype = torch.get_default_dtype()
    scale = (1 / (255 * std.to(dtype))).to(device).view(1, c, 1, 1)
    offset = (mean.to(dtype) / std.to(dtype)).to(device).view(1, c, 1, 1)

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        step = batch_size * processes
        for start in range(0, num_batches(n, step, drop_last) * step, step):
            window = slice(start + rank * batch_size, min(start + (rank + 1) * batch_size, n))
            x = ds.images[order[window]]
            if augment:
                x = _crop_flip(
                    x, pad, None if shifts is None else shifts[window], None if flips is None else flips[window]
                )
            yield x.to(dtype).mul_(scale).sub_(offset), ds.labels[order[window]]

    return batches()


def _epoch_draws(
    n: int, shuffle: bool, pad: int, flip: bool, generator: torch.Generator | None, device: torch.device
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Every random draw of an epoch of ``n`` samples, made now and in this order: the visiting order (a
    permutation when ``shuffle``), the crop shifts in ``[0, 2 * pad]`` (None when ``pad`` is 0) and the flips
    (None unless ``flip``), on ``device``."""
    draw_on = generator.device if generator is not None else torch.device("cpu")  # a CUDA generator works too
    order = (torch.randperm(n, generator=generator, device=draw_on) if shuffle else torch.arange(n)).to(device)
    shifts = flips = None
    if pad > 0:
        shifts = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator, device=draw_on).to(device)
    if flip:
        flips = (torch.rand(n, generator=generator, device=draw_on) < 0.5).to(device)
    return order, shifts, flips


def _crop_flip(x: Tensor, pad: int, shifts: Tensor | None, flips: Tensor | None) -> Tensor:
    """Per-sample random crop of the zero-padded batch and horizontal flip, as two gathers for the whole batch.

    Sample i takes rows ``dy_i + arange(H)`` and columns ``dx_i + arange(W)`` of the padded image; a flip just
    reverses the column indices (torch.where), so crop and flip cost one gather each along H and W.
    """
    if shifts is None and flips is None:
        return x
    b, c, h, w = x.shape
    rows = torch.arange(h, device=x.device).expand(b, h)
    cols = torch.arange(w, device=x.device).expand(b, w)
    if flips is not None:
        cols = torch.where(flips[:, None], w - 1 - cols, cols)
    if shifts is not None:
        x = F.pad(x, (pad, pad, pad, pad))
        rows, cols = rows + shifts[:, :1], cols + shifts[:, 1:]
        x = x.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, x.shape[3]))
    return x.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))


def check_compatible(ds: ImageSet, in_channels: int, num_classes: int) -> None:
    """Checks that a model with ``in_channels`` inputs and ``num_classes`` outputs can be trained on ``ds``.

    Raises:
        DataError: the channel count differs, or a label is outside [0, num_classes).
    """
    where = f"{ds.source}: " if ds.source else ""
    if ds.num_channels != in_channels:
        raise DataError(
            f"{where}dataset {ds.name!r} has {ds.num_channels}-channel images but the model expects "
            f"in_channels={in_channels}"
        )
    if len(ds) and (int(ds.labels.min()) < 0 or int(ds.labels.max()) >= num_classes):
        raise DataError(
            f"{where}dataset {ds.name!r} has labels in [{int(ds.labels.min())}, {int(ds.labels.max())}] but the "
            f"model has num_classes={num_classes}"
        )
