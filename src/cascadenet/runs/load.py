"""Loading a run: its trained model and a split of its data, checked against each other and against config.json.

Evaluation and the property analyses read runs through ``load_run``; nothing here depends on the training loop.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..data.datasets import ImageSet
from ..data.loader import check_compatible
from ..data.user import as_image_set
from ..models.checkpoint import CHECKPOINT, WEIGHTS, CheckpointError, load_model
from ..models.registry import config_from_dict
from ..utils.device import resolve_device
from .config import CONFIG, TrainConfig
from .data import normalization, split_data

__all__ = ["LoadedRun", "load_run", "check_run_dir"]


@dataclasses.dataclass
class LoadedRun:
    """A run directory's trained model (on the device) and one split of its data (on the device), with the
    run's normalisation statistics and mixed-precision choice."""

    model: nn.Module
    data: ImageSet
    mean: Tensor
    std: Tensor
    amp: bool
    finished: bool  # the run finished training (model.safetensors), else the last checkpoint
    val: ImageSet | None = None  # the run's validation split (on the device) when the split asked is not it


def load_run(
    run_dir: str | os.PathLike,
    *,
    split: str = "test",
    data_root: str | None = None,
    device: str = "auto",
    with_val: bool = False,
    weights: str | None = None,
    data: Any = None,
) -> LoadedRun:
    """Load a run's model and a split of its dataset (checked against each other and the stored configuration).

    Args:
        split: ``test``, or the run's held-out ``val`` split or the ``train`` part it trained on.
        data_root: the dataset folder, if it moved since training.
        with_val: also load the run's validation split (``LoadedRun.val``) when ``split`` is ``test``.
        weights: a weights file of the run to load instead of its own (e.g. ``model-recalibrated.safetensors``).
        data: the split's examples given from Python instead of read from disk (a run trained by
            ``cascadenet.fit``): an ``ImageSet`` or any dataset ``cascadenet.data.user.as_image_set`` reads;
            ``with_val`` then loads nothing.

    Raises:
        CheckpointError, DataError, ValueError: one line naming the file.
    """
    run_dir = Path(run_dir)
    try:
        return _load_run(run_dir, split, data_root, device, with_val, weights, data)
    except OSError as e:  # unreadable run directory or data: one line naming the file
        raise CheckpointError(f"{e.filename or run_dir}: {e.strerror or e}") from None


def check_run_dir(run_dir: Path) -> None:
    """Raise ``CheckpointError`` unless ``run_dir`` is a run directory (it holds a config.json)."""
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory")
    if not (run_dir / CONFIG).is_file():
        raise CheckpointError(f"{run_dir}: no {CONFIG} here: not a run directory")


def _load_run(
    run_dir: Path, split: str, data_root: str | None, device: str, with_val: bool, weights: str | None, data: Any = None
) -> LoadedRun:
    check_run_dir(run_dir)
    cfg = TrainConfig.from_file(run_dir / CONFIG)
    stored = json.loads((run_dir / CONFIG).read_bytes())  # from_file read it: it is a JSON object
    mean, std = normalization(run_dir, stored)
    dev = resolve_device(device)
    model = load_model(run_dir if weights is None else run_dir / weights, map_location=dev)
    _check_model(run_dir, stored.get("model"), model.config)
    finished = (run_dir / WEIGHTS).is_file()

    if data is not None:
        ds, val_set = as_image_set(data, name=f"the {split} data"), None
    else:
        ds, val_set = split_data(cfg, data_root, split, with_val)
    check_compatible(ds, model.config.in_channels, model.config.num_classes)
    if mean.shape != (ds.num_channels,) or std.shape != (ds.num_channels,):
        raise CheckpointError(f"{run_dir / CONFIG}: normalization statistics for {mean.numel()} channels, but the "
                              f"data has {ds.num_channels}")  # fmt: skip
    amp = dev.type == "cuda" if cfg.amp is None else cfg.amp
    return LoadedRun(model, ds.to(dev), mean, std, amp, finished, None if val_set is None else val_set.to(dev))


def _check_model(run_dir: Path, stored: Any, found: Any) -> None:
    """The weights in a run directory are those of the model its config.json describes."""
    if not isinstance(stored, dict):
        return  # no model record to compare with (a hand-made run directory)
    try:
        described = config_from_dict(stored)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{run_dir / CONFIG}: unreadable model configuration: {e}") from None
    if described != found:
        source = WEIGHTS if (run_dir / WEIGHTS).is_file() else CHECKPOINT
        diff = (
            "; ".join(
                f"{f.name} {getattr(found, f.name)} vs {getattr(described, f.name)}"
                for f in dataclasses.fields(found)
                if type(found) is type(described) and getattr(found, f.name) != getattr(described, f.name)
            )
            or f"a {found.family} model vs a {described.family} model"
        )
        raise CheckpointError(
            f"{run_dir / source} holds another model than {run_dir / CONFIG} describes ({source} vs {CONFIG}: {diff})"
        )
