"""Loading a run: its trained model and a split of its data, checked against each other and against config.json.

Evaluation and the property analyses read runs through ``load_run``; nothing here depends on the training loop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data.datasets import DEFAULT_ROOTS, DataError, ImageSet
from ..data.loader import check_compatible
from ..data.user import as_image_set
from ..models.checkpoint import CHECKPOINT, WEIGHTS, CheckpointError, load_model
from ..models.registry import config_from_dict
from ..utils.device import resolve_device
from .config import CONFIG, TrainConfig
from .data import normalization, split_data
from .lock import RunLockedError, holder

__all__ = ["LoadedRun", "load_run", "check_run_dir", "check_not_training"]


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
    data_record: dict[str, Any] = dataclasses.field(default_factory=dict)  # what data this is (``describe``)


def load_run(
    run_dir: str | os.PathLike,
    *,
    split: str = "test",
    data_root: str | None = None,
    device: str = "auto",
    with_val: bool = False,
    weights: str | None = None,
    unfinished: bool = False,
    other_data: bool = False,
    data: Any = None,
) -> LoadedRun:
    """Load a run's model and a split of its dataset (checked against each other and the stored configuration).

    Args:
        split: ``test``, or the run's held-out ``val`` split or the ``train`` part it trained on.
        data_root: the dataset folder, if it moved since training.
        with_val: also load the run's validation split (``LoadedRun.val``) when ``split`` is ``test``.
        weights: a weights file of the run to load instead of its own (e.g. ``model-recalibrated.safetensors``).
        unfinished: accept a run that has not finished training (its last checkpoint; ``LoadedRun.finished`` is
            then false and the caller must say so). By default such a run is refused, and a run that a live
            process is training always is (its checkpoint changes under the reader).
        other_data: accept data that differs from the run's (another image size, other classes, other images);
            ``LoadedRun.data_record`` says so. By default it is refused.
        data: the split's examples given from Python instead of read from disk (a run trained by
            ``cascadenet.fit``): an ``ImageSet`` or any dataset ``cascadenet.data.user.as_image_set`` reads;
            ``with_val`` then loads nothing.

    Raises:
        CheckpointError, DataError, ValueError: one line naming the file.
    """
    run_dir = Path(run_dir)
    try:
        return _load_run(run_dir, split, data_root, device, with_val, weights, unfinished, other_data, data)
    except OSError as e:  # unreadable run directory or data: one line naming the file
        raise CheckpointError(f"{e.filename or run_dir}: {e.strerror or e}") from None


def check_run_dir(run_dir: Path) -> None:
    """Raise ``CheckpointError`` unless ``run_dir`` is a run directory (it holds a config.json)."""
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory")
    if not (run_dir / CONFIG).is_file():
        raise CheckpointError(f"{run_dir}: no {CONFIG} here: not a run directory")


def _load_run(
    run_dir: Path, split: str, data_root: str | None, device: str, with_val: bool, weights: str | None,
    unfinished: bool, other_data: bool, data: Any = None,
) -> LoadedRun:  # fmt: skip
    check_run_dir(run_dir)
    check_not_training(run_dir)
    cfg = TrainConfig.from_file(run_dir / CONFIG)
    stored = json.loads((run_dir / CONFIG).read_bytes())  # from_file read it: it is a JSON object
    finished = (run_dir / WEIGHTS).is_file()
    if not finished and weights is None and not unfinished:
        raise CheckpointError(
            f"{run_dir} has not finished training (no {WEIGHTS}, only its last checkpoint): finish it with "
            f"`cascadenet train --resume {shlex.quote(str(run_dir))}` first (`cascadenet eval` alone evaluates a "
            "checkpoint, and says so)"
        )
    mean, std = normalization(run_dir, stored)
    dev = resolve_device(device)
    model = load_model(run_dir if weights is None else run_dir / weights, map_location=dev)
    _check_model(run_dir, stored.get("model"), model.config)
    _check_finite(model, run_dir / (weights or (WEIGHTS if finished else CHECKPOINT)))

    if data is not None:
        ds, val_set = as_image_set(data, name=f"the {split} data"), None
    else:
        ds, val_set = split_data(cfg, data_root, split, with_val)
    check_compatible(ds, model.config.in_channels, model.config.num_classes)
    if mean.shape != (ds.num_channels,) or std.shape != (ds.num_channels,):
        raise CheckpointError(f"{run_dir / CONFIG}: normalization statistics for {mean.numel()} channel(s) (mean) "
                              f"and {std.numel()} (std), but the data has {ds.num_channels}")  # fmt: skip
    if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(std).all()) and bool((std > 0).all())):
        raise CheckpointError(f"{run_dir / CONFIG}: damaged normalization statistics (mean {mean.tolist()}, std "
                              f"{std.tolist()}: finite numbers and a std > 0 are needed)")  # fmt: skip
    record = _check_data(run_dir, cfg, stored, ds, data_root, split, other_data, mean, std, given=data is not None)
    amp = dev.type == "cuda" if cfg.amp is None else cfg.amp
    val = None if val_set is None else val_set.to(dev)
    return LoadedRun(model, ds.to(dev), mean, std, amp, finished, val, record)


def _check_finite(model: nn.Module, source: Path) -> None:
    """Weights holding NaN or infinity would give NaN logits everywhere: named here, with the file."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{source}: {name} holds NaN or infinite values (training diverged, or the file "
                                  "is damaged): nothing meaningful to evaluate")  # fmt: skip


def check_not_training(run_dir: Path) -> None:
    """Refuse a run directory that a live process holds (training it): its files change under the reader, and
    what it reported would describe weights that are gone when training ends."""
    owner = holder(run_dir)
    if owner is not None:
        raise RunLockedError(
            f"{run_dir} is being trained by {owner}: what it holds now is a checkpoint that training replaces; "
            "evaluate or analyse it once training has ended"
        )


def _check_data(
    run_dir: Path, cfg: TrainConfig, stored: dict[str, Any], ds: ImageSet, data_root: str | None, split: str,
    other_data: bool, mean: Tensor, std: Tensor, given: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """The data is the run's (image shape, classes and, for a --data-root other than the run's, the training
    images' statistics), unless ``other_data``; returns what it is, for eval.json and the reports. Data
    ``given`` from Python is checked by its shape alone (it has no folder, and its class names are its own)."""
    recorded = stored.get("data") if isinstance(stored.get("data"), dict) else {}
    shape = list(ds.images.shape[1:])
    why = []
    if isinstance(recorded.get("shape"), list) and recorded["shape"] != shape:
        why.append(f"images of {'x'.join(map(str, shape))}, the run's are {'x'.join(map(str, recorded['shape']))}")
    if not given and isinstance(stored.get("classes"), list) and stored["classes"] != ds.classes:
        why.append("other class names")
    root = None if given else data_root or cfg.data_root or DEFAULT_ROOTS.get(cfg.dataset)
    trained_root = cfg.data_root or DEFAULT_ROOTS.get(cfg.dataset)
    moved = (
        not given and data_root is not None and cfg.dataset != "synthetic" and _where(data_root) != _where(trained_root)
    )
    if moved and not why:  # the same shape and classes in another folder: the same images?
        from ..data.datasets import load_dataset
        from ..data.loader import normalization as statistics
        from ..data.loader import train_val_split

        full = load_dataset(cfg.dataset, data_root, "train", image_size=cfg.image_size, seed=cfg.seed,
                            holdout_classes=cfg.holdout_classes)  # fmt: skip
        part = train_val_split(full, cfg.val_fraction, seed=cfg.seed)[0] if 0 < cfg.val_fraction < 1 else full
        m, s = statistics(part)
        if m.shape != mean.shape or not (torch.allclose(m, mean, atol=1e-5) and torch.allclose(s, std, atol=1e-5)):
            why.append("other training images (their mean and std differ from those the run recorded)")
    if why and not other_data:
        raise DataError(
            f"{'--data-root ' + str(data_root) if data_root else 'the dataset'} is not the data {run_dir} was "
            f"trained on ({'; '.join(why)}): pass the run's data, or --other-data to use this data anyway (then "
            "recorded as such)"
        )
    labels = ds.labels.cpu().contiguous().numpy().tobytes()
    return {
        "dataset": "given from Python" if given else cfg.dataset, "root": None if root is None else str(root),
        "split": split, "shape": shape,
        "examples": len(ds), "labels_sha256": hashlib.sha256(labels).hexdigest()[:16],
        "other_data": bool(why), **({"differs": "; ".join(why)} if why else {}),
    }  # fmt: skip


def _where(root: str | os.PathLike | None) -> str | None:
    return None if root is None else os.path.realpath(root)


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
