"""A run's data: the split it was evaluated or trained on, its normalisation, and batches drawn as training drew
them.

- ``split_data(cfg, ...)``: the test split, or the run's held-out validation split or its training part (the same
  reader and ``train_val_split`` as training, so the same examples);
- ``normalization(run_dir, stored)``: the statistics training normalised with, from config.json;
- ``training_batches(...)``: batches drawn as training draws them (augmentation included) from a generator of
  their own, so that training's final recalibration and ``cascadenet recalibrate`` reproduce each other;
  ``run_training_batches(run_dir, ...)``: the same from a run directory (``cascadenet recalibrate``, and the EWS
  variants of ``cascadenet noise``).
"""

from __future__ import annotations

import itertools
import json
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..data import streaming
from ..data.datasets import DataError, ImageSet, load_dataset
from ..data.loader import iterate_batches, train_val_split
from ..models.checkpoint import CheckpointError
from .config import CONFIG, TrainConfig

__all__ = ["split_data", "normalization", "training_batches", "run_training_batches", "RECALIBRATION_SEED"]


def normalization(run_dir: Path, stored: Any) -> tuple[Tensor, Tensor]:
    """The per-channel mean and std that the run normalised its inputs with (``stored``: its config.json).

    Raises:
        CheckpointError: config.json holds no readable statistics.
    """
    norm = stored.get("normalization") if isinstance(stored, dict) else None
    if not (isinstance(norm, dict) and isinstance(norm.get("mean"), list) and isinstance(norm.get("std"), list)):
        raise CheckpointError(f"{run_dir / CONFIG}: no normalization statistics (not written by cascadenet train?)")
    try:
        return torch.tensor(norm["mean"], dtype=torch.float32), torch.tensor(norm["std"], dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{run_dir / CONFIG}: unreadable normalization statistics ({e})") from None


def split_data(cfg: TrainConfig, data_root: str | None, split: str, with_val: bool = True) -> tuple[Any, Any]:
    """The evaluated split and the run's validation split (None when it held none out, or, for the test split,
    when ``with_val`` is false).

    ``val`` and ``train`` are the two parts of the training set that training made: the same reader and
    ``train_val_split(full, cfg.val_fraction, seed=cfg.seed)`` as ``train._load_data``, so the same examples.
    """
    root = data_root or cfg.data_root
    options = {
        "image_size": cfg.image_size,
        "synthetic_size": cfg.synthetic_size,
        "seed": cfg.seed,
        "holdout_classes": cfg.holdout_classes,
        # an image folder read as the run read it: one channel when its model takes one
        "grayscale": cfg.grayscale
        if cfg.grayscale is not None or cfg.dataset != "imagefolder"
        else (cfg.model.in_channels == 1),
    }  # a held-out-classes run: its kept classes, renumbered
    held_out = 0 < cfg.val_fraction < 1
    if split == "val" and not held_out:
        raise ValueError(f"--split val: this run held out no validation split (val_fraction {cfg.val_fraction})")
    if split == "test":
        test = load_dataset(cfg.dataset, root, "test", **options)
        try:
            full = load_dataset(cfg.dataset, root, "train", **options) if held_out and with_val else None
        except DataError as e:  # the test split alone still evaluates; only the budgeted-batch curve needs this
            warnings.warn(f"no budgeted-batch curve: the run's validation split is unreadable ({e})", stacklevel=3)
            full = None
        return test, None if full is None else train_val_split(full, cfg.val_fraction, seed=cfg.seed)[1]
    full = load_dataset(cfg.dataset, root, "train", **options)
    trained, val_set = train_val_split(full, cfg.val_fraction, seed=cfg.seed) if held_out else (full, None)
    return (val_set if split == "val" else trained), val_set


# Added to the run's seed for the recalibration batches: a generator of their own, so that they neither depend on
# nor disturb the training generator's state (a resumed run draws the same ones).
RECALIBRATION_SEED = 0x5EED_BA7C


def training_batches(
    train_set: ImageSet | streaming.FolderIndex,
    cfg: TrainConfig,
    mean: Tensor,
    std: Tensor,
    device: torch.device,
    count: int,
    *,
    batch_size: int | None = None,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[tuple[Tensor, Tensor]]:
    """``count`` batches drawn as training draws them (shuffled, augmented per ``cfg.augment``, of
    ``cfg.batch_size`` unless given, the last incomplete batch of an epoch dropped), from a generator seeded with
    ``cfg.seed + RECALIBRATION_SEED``: the same batches every time, whatever training's position. A training set
    with fewer than ``count`` batches is drawn again (a new permutation) until there are enough."""
    size = cfg.batch_size if batch_size is None else batch_size
    generator = torch.Generator().manual_seed(cfg.seed + RECALIBRATION_SEED)
    done = 0
    while done < count:
        if isinstance(train_set, streaming.FolderIndex):
            epoch = streaming.stream_batches(
                train_set, size, train=cfg.augment, shuffle=True, mean=mean, std=std, device=device,
                generator=generator, drop_last=True, shard=shard, workers=cfg.workers,
            )  # fmt: skip
        else:
            epoch = iterate_batches(train_set, size, shuffle=True, augment=cfg.augment, mean=mean, std=std,
                                    generator=generator, drop_last=True, shard=shard)  # fmt: skip
        before = done
        for batch in itertools.islice(epoch, count - done):
            done += 1
            yield batch
        if done == before:
            raise ValueError(f"batch size {size} is larger than the training set ({len(train_set)} examples)")


def run_training_batches(
    run_dir: str | os.PathLike, count: int, *, data_root: str | None = None, device: str | torch.device = "cpu"
) -> Callable[[], Iterator[tuple[Tensor, Tensor]]]:
    """``count`` batches of a run's training part (never its validation or test split), normalised with the run's
    statistics and drawn as training's final recalibration draws them (``training_batches``): a function that
    returns a new iterator over the very same batches on every call. A run trained by several processes is
    drawn at its global batch (one process then sees the examples each batch-norm statistic saw).

    Raises:
        CheckpointError: no usable config.json.
        DataError: the dataset cannot be read (``data_root`` if it moved).
    """
    run_dir = Path(run_dir)
    cfg = TrainConfig.from_file(run_dir / CONFIG)
    stored = json.loads((run_dir / CONFIG).read_bytes())
    mean, std = normalization(run_dir, stored)
    processes = stored.get("processes", 1) if isinstance(stored.get("processes", 1), int) else 1
    dev = torch.device(device)
    root = data_root or cfg.data_root
    if cfg.stream == "on":
        if root is None:
            raise ValueError("the run streamed an image folder: pass --data-root with its files")
        gray = cfg.grayscale if cfg.grayscale is not None else cfg.model.in_channels == 1  # as the run read it
        full: Any = streaming.index_folder(root, "train", cfg.image_size or streaming.DEFAULT_SIZE, gray)
    else:
        full = load_dataset(cfg.dataset, root, "train", image_size=cfg.image_size, synthetic_size=cfg.synthetic_size,
                            seed=cfg.seed, holdout_classes=cfg.holdout_classes)  # fmt: skip
    train_set = train_val_split(full, cfg.val_fraction, seed=cfg.seed)[0]
    if isinstance(train_set, ImageSet):
        train_set = train_set.to(dev)
    return lambda: training_batches(train_set, cfg, mean, std, dev, count, batch_size=cfg.batch_size * processes)
