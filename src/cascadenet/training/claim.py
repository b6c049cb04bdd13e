"""Taking a run directory for training, and checking that a resumed one still is the run it says it is.

A new run's directory must be free: absent, empty, or holding only the config.json of this very run, stopped
before its first checkpoint. ``check_target`` looks early, before the data is read; ``claim`` creates the
directory, takes its lock and looks again under the lock. A resumed run's config.json is read with ``read_run``,
and before anything is written its checkpoint and weights must hold the model config.json describes
(``check_model_files``) and the data must be what it was trained on (``check_same_data``).

The lock itself is ``cascadenet.runs.lock``'s, which knows nothing of training's options; these checks need the run's
configuration, its data and its model files, so they live here, below the training loop (``cascadenet.training.loop``),
whose set-up calls them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shlex
from pathlib import Path
from typing import Any

import torch

from ..data.datasets import ImageSet
from ..models.anytime import ModelConfig
from ..models.checkpoint import CHECKPOINT, WEIGHTS, CheckpointError, read_metadata
from ..models.pretrained import config_difference
from ..models.registry import config_from_dict
from ..runs.config import CONFIG, RESUMABLE, ConfigError, TrainConfig, changed_options
from ..runs.lock import LOCK, RunLock, RunLockedError, clean_temporaries, is_temporary
from ..utils.files import remove_empty

__all__ = [
    "TrainingError",
    "check_model_files",
    "check_same_data",
    "check_target",
    "claim",
    "data_shape",
    "describe_data",
    "described_model",
    "read_run",
]

log = logging.getLogger(__name__)


# The training loop's error (cascadenet.training.loop re-exports it, its public name), defined here: the lowest module
# that raises it.
class TrainingError(RuntimeError):
    """Training cannot go on (diverged loss, a run directory in the way or in use, an unusable checkpoint, a
    full disk)."""

    def __str__(self) -> str:  # one line, whatever the messages of other libraries it quotes hold
        return " ".join(line.strip() for line in super().__str__().splitlines())


def read_run(run_dir: Path) -> tuple[TrainConfig, dict[str, Any]]:
    """The stored configuration of a run directory, and config.json's whole content."""
    try:
        if not (run_dir / CONFIG).is_file():
            raise TrainingError(f"{run_dir}: no {CONFIG} here: not a run directory")
        payload = json.loads((run_dir / CONFIG).read_bytes())
    except OSError as e:
        raise TrainingError(f"{run_dir}: cannot read the run directory: {e.strerror or e}") from None
    except (ValueError, RecursionError):
        payload = None  # from_file names the problem
    stored = TrainConfig.from_file(run_dir / CONFIG)
    return stored, payload if isinstance(payload, dict) else {}


def _leftovers(run_dir: Path) -> set[str]:
    """What a run directory holds besides its lock and the temporaries of killed writes."""
    return {p.name for p in run_dir.iterdir() if p.name != LOCK and not is_temporary(p.name)}


def _unstarted_same(run_dir: Path, cfg: TrainConfig, leftovers: set[str]) -> bool:
    """The directory holds only the config.json of this very run, killed before its first checkpoint."""
    if leftovers != {CONFIG}:
        return False
    try:
        stored = TrainConfig.from_file(run_dir / CONFIG)
    except ConfigError:
        return False
    return not any(k not in RESUMABLE for k in changed_options(stored, cfg))


def check_target(run_dir: Path, cfg: TrainConfig) -> None:
    """Early, before the data is read: the new run's directory can be created and is free."""
    try:
        if run_dir.is_dir():
            leftovers = _leftovers(run_dir)
            if leftovers and not _unstarted_same(run_dir, cfg, leftovers):
                raise TrainingError(
                    f"{run_dir} already exists and is not empty: resume it with --resume {shlex.quote(str(run_dir))}, "
                    "or choose another --name or --out (nothing was overwritten)"
                )
            return
        if run_dir.exists() or run_dir.is_symlink():
            raise TrainingError(f"{run_dir} exists and is not a directory: choose another --name or --out")
        parent = run_dir.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise TrainingError(f"{parent} is a file, not a folder: --out must name a folder (it is {cfg.out})")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise TrainingError(f"{parent}: cannot create the run directory {run_dir} there (not writable)")
    except OSError as e:
        raise TrainingError(f"{run_dir}: {e.strerror or e}") from None


def claim(run_dir: Path, cfg: TrainConfig, resuming: bool) -> tuple[RunLock, tuple[Path, ...]]:
    """Take the run directory: create it (a new run), lock it, and check (under the lock) that a new run's is
    free. Returns the lock and the folders this process created (the run directory and the missing folders of
    --out, deepest first; empty when it created none), for a failed start to remove again."""
    created: tuple[Path, ...] = ()
    try:
        if not resuming:
            created = tuple(p for p in (run_dir, *run_dir.parents) if not p.exists())
            run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock.acquire(run_dir)
    except RunLockedError as e:
        raise TrainingError(str(e)) from None
    except OSError as e:  # a full or read-only disk: what this process made goes again, the message says why
        if created:
            with contextlib.suppress(OSError):
                (run_dir / LOCK).unlink(missing_ok=True)  # an empty lock file of our own new folder
            remove_empty(created)
        what = "lock" if resuming else "create"
        reason = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror or str(e)
        raise TrainingError(f"cannot {what} the run directory {run_dir}: {reason}") from None
    try:
        if not resuming:
            leftovers = _leftovers(run_dir)
            if leftovers and not _unstarted_same(run_dir, cfg, leftovers):
                raise TrainingError(
                    f"{run_dir} already exists and is not empty: resume it with --resume {shlex.quote(str(run_dir))}, "
                    "or choose another --name or --out (nothing was overwritten)"
                )
            if leftovers:
                log.info("%s holds only the configuration of this run, stopped before its first checkpoint: "
                         "starting it again", run_dir)  # fmt: skip
        clean_temporaries(run_dir)
    except BaseException:
        lock.release()
        raise
    return lock, created


def data_shape(ds: Any) -> list[int]:
    """(C, H, W) of the images of an in-memory set or a streamed folder."""
    return list(ds.images.shape[1:]) if isinstance(ds, ImageSet) else ds.shape


def describe_data(ds: Any) -> str:
    c, h, w = data_shape(ds)
    return f"{len(ds)} images of {c}x{h}x{w} in {ds.num_classes} classes"


def check_same_data(run_dir: Path, payload: dict[str, Any], full: ImageSet, mean: torch.Tensor,
                     std: torch.Tensor, data_root: str | None) -> None:  # fmt: skip
    """A resumed run reads the data it was trained on (what config.json recorded of it)."""
    data = payload.get("data")
    stored_model = payload.get("model")
    found = {"examples": len(full), "shape": data_shape(full), "classes": full.num_classes}
    why = []  # what differs, in words: two sets can have the same size and shape and still differ
    if isinstance(data, dict) and any(data.get(k) != v for k, v in found.items()):
        why += [f"{k} {data.get(k)} vs {v}" for k, v in found.items() if data.get(k) != v]
    if isinstance(stored_model, dict):
        if stored_model.get("num_classes", full.num_classes) != full.num_classes:
            why.append(f"the model has {stored_model['num_classes']} classes")
        if stored_model.get("in_channels", full.num_channels) != full.num_channels:
            why.append(f"the model takes {stored_model['in_channels']} channels")
    if isinstance(payload.get("classes"), list) and payload["classes"] != full.classes:
        why.append("other class names")
    norm = payload.get("normalization")
    if isinstance(norm, dict) and (norm.get("mean") != mean.tolist() or norm.get("std") != std.tolist()):
        why.append("other images (their mean and std differ from those training recorded)")
    if why:
        was = "other data"
        if isinstance(data, dict) and {"examples", "shape", "classes"} <= set(data):
            was = f"{data['examples']} images of {'x'.join(map(str, data['shape']))} in {data['classes']} classes"
        where = f"--data-root {data_root}" if data_root else "the dataset"
        raise TrainingError(
            f"{where} holds {describe_data(full)}, but {run_dir} was trained on {was} ({'; '.join(dict.fromkeys(why))}"
            "): resume with the data it was trained on (pass its --data-root)"
        )


def described_model(payload: dict[str, Any], fallback: ModelConfig) -> ModelConfig:
    """The model config.json describes: its "model" record (as the first release wrote it, num_steps resolved),
    else the training options' model."""
    try:
        return config_from_dict(payload["model"])
    except (KeyError, TypeError, ValueError):
        return fallback


def check_model_files(run_dir: Path, model_cfg: ModelConfig, ckpt: dict[str, Any] | None) -> None:
    """The checkpoint and the final weights in a run directory hold the model its config.json describes."""
    found = []
    if ckpt is not None:
        found.append((run_dir / CHECKPOINT, ckpt["model_config"]))
    if (run_dir / WEIGHTS).is_file():
        found.append((run_dir / WEIGHTS, read_metadata(run_dir / WEIGHTS).get("model_config")))
    for path, raw in found:
        try:
            stored = config_from_dict(raw)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable model configuration: {e}") from None
        if stored != model_cfg:
            raise TrainingError(
                f"{path} holds another model than {run_dir / CONFIG} describes ({path.name} vs {CONFIG}: "
                f"{config_difference(stored, model_cfg)}); nothing was changed"
            )
