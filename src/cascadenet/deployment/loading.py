"""A trained model that carries what it needs outside its run: class names and the input transform.

``load_model(run or file)`` (``cascadenet.load_model``) loads the weights as ``models.checkpoint.load_model`` does and
attaches, from the weights file's metadata (or the run's config.json, for checkpoints and older files):

- ``model.classes``: the class names, in label order (``None`` when the file does not record them);
- ``model.preprocess``: a :class:`~cascadenet.deployment.images.Preprocess` (normalisation, channels and size as
  trained), so that ``model(model.preprocess(["a.png", "b.png"]))`` works on new images.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.checkpoint import CHECKPOINT, WEIGHTS, CheckpointError, read_metadata
from ..models.checkpoint import load_model as load_weights
from ..runs.config import CONFIG
from .images import Preprocess

__all__ = ["load_model", "model_metadata"]


def load_model(source: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a trained model from a run directory, a ``model.safetensors`` or a ``checkpoint.pt``, in evaluation
    mode, with ``model.classes`` and ``model.preprocess`` (see the module docstring).

    A weights file saved without normalisation statistics (``save_weights`` from Python) loads too; its
    ``preprocess`` then refuses to guess them (``ValueError`` when called).

    Raises:
        CheckpointError: one line naming the file (missing or corrupt).
    """
    model = load_weights(source, map_location)
    meta = model_metadata(source)
    config = model.config
    channels = int(getattr(config, "in_channels", len(meta["mean"] or [])))
    if meta["mean"] is not None and (len(meta["mean"]) != channels or len(meta["std"]) != channels):
        raise CheckpointError(f"{source}: normalisation statistics for {len(meta['mean'])} channels, but the model "
                              f"takes {channels}")  # fmt: skip
    model.classes = meta["classes"]
    stats = (None, None) if meta["mean"] is None else (tuple(meta["mean"]), tuple(meta["std"]))
    model.preprocess = Preprocess(*stats, channels, meta["size"], source=str(source))
    return model


def model_metadata(source: str | os.PathLike) -> dict[str, Any]:
    """What a model's files record about its inputs and outputs: ``mean``, ``std`` (lists, or None for a file
    saved without them, e.g. by ``save_weights`` from Python), ``classes`` (list of
    names or None), ``size`` ((H, W) or None). The weights file's metadata first, then the run's config.json."""
    path = Path(source)
    if path.is_dir():
        path = path / WEIGHTS if (path / WEIGHTS).is_file() else path / CHECKPOINT
    meta: dict[str, Any] = read_metadata(path) if path.suffix == ".safetensors" else {}
    config_file = path.parent / CONFIG
    if config_file.is_file():
        try:
            stored = json.loads(config_file.read_text())
        except (OSError, ValueError):
            stored = {}
        if isinstance(stored, dict):
            data = stored.get("data")
            shape = data.get("shape") if isinstance(data, dict) else None
            meta = {"normalization": stored.get("normalization"), "classes": stored.get("classes"),
                    "input_shape": shape, **{k: v for k, v in meta.items() if v is not None}}  # fmt: skip
    norm = meta.get("normalization")
    known = isinstance(norm, dict) and _numbers(norm.get("mean")) and _numbers(norm.get("std"))
    classes = meta.get("classes")
    shape = meta.get("input_shape")
    size = (int(shape[1]), int(shape[2])) if _numbers(shape) and len(shape) == 3 else None
    return {
        "mean": [float(v) for v in norm["mean"]] if known else None,
        "std": [float(v) for v in norm["std"]] if known else None,
        "classes": [str(c) for c in classes] if isinstance(classes, list) else None,
        "size": size,
    }


def _numbers(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, (int, float)) for v in value)
