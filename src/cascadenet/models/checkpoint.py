"""A model's files: resumable checkpoints, and weights in safetensors with the configuration that rebuilds them.

Both are written atomically (``cascadenet.utils.files.atomic_write``): a kill at any moment leaves the previous
file or the new one, never a torn one.

Loading is weights-only: a checkpoint that holds anything but tensors and plain data is refused unread (a planted
pickle never runs), with one line saying that the file is not a cascadenet checkpoint.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn

from ..utils.files import atomic_write, first_sentence
from .anytime import ModelConfig
from .footprint import check_model_fits
from .registry import config_from_dict

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "save_weights",
    "load_model",
    "CHECKPOINT",
    "WEIGHTS",
]

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.safetensors"
# 1: the first release (model_config: flat create_model arguments); 2: model_config is ModelConfig.to_dict().
FORMAT = 2
READABLE_FORMATS = (1, 2)


class CheckpointError(ValueError):
    """A missing, truncated or mismatched checkpoint or weights file; the message names the path."""

    def __str__(self) -> str:  # one line, whatever the messages of other libraries it quotes hold
        return " ".join(line.strip() for line in super().__str__().splitlines())


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Save a training state (tensors, numbers, strings and containers of them) atomically."""
    buffer = io.BytesIO()
    try:
        torch.save({"format": FORMAT, **state}, buffer)
    except RuntimeError as e:  # the serialiser's own failure to grow its buffer: memory ran out
        raise OSError(errno.ENOMEM, f"not enough memory to serialise the checkpoint ({first_sentence(e)})",
                      str(path)) from None  # fmt: skip
    atomic_write(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint``; only plain data is unpickled (``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint here")
    try:
        with warnings.catch_warnings():  # torch warns about unusual pickle protocols on stderr: not the user's news
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # weights-only loading met something other than tensors and plain data
        if not _looks_pickled(path):  # random or damaged bytes: no pickle to speak of
            raise CheckpointError(
                f"{path}: not a readable checkpoint (neither a PyTorch archive nor a pickle: damaged or not a "
                "checkpoint at all)"
            ) from None
        raise CheckpointError(
            f"{path}: not a cascadenet checkpoint (it holds objects other than tensors and plain data; it was not "
            "loaded and nothing in it was run)"
        ) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    except Exception as e:  # torch raises several types for truncated or foreign files
        detail = first_sentence(e)
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {detail}") from None
    if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"{path}: not a cascadenet checkpoint (formats {READABLE_FORMATS})")
    missing = [k for k in ("model_config", "model") if not isinstance(state.get(k), dict)]
    if missing:
        raise CheckpointError(f"{path}: not a cascadenet checkpoint (no {' or '.join(missing)} in it)")
    return state


def _looks_pickled(path: Path) -> bool:
    """The file starts as torch.save's zip archive or a pickle (protocol 2 to 5) does."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def save_weights(
    path: str | os.PathLike, model: nn.Module, extra: dict[str, Any] | None = None, *, overwrite: bool = True
) -> None:
    """Save the model's weights and buffers as safetensors, with its configuration (``model.config``) as
    metadata, so that ``load_model`` rebuilds it, and the input normalisation its weights expect when it has one
    (``model.normalization``, unless ``extra`` gives one). With ``overwrite=False`` an existing file is never
    replaced (``FileExistsError``)."""
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise ValueError("the model has no ModelConfig in .config: it cannot be rebuilt, so it is not saved")
    extra = dict(extra or {})
    if isinstance(getattr(model, "normalization", None), dict):
        extra.setdefault("normalization", model.normalization)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"model_config": json.dumps(config.to_dict()), **{k: json.dumps(v) for k, v in extra.items()}}
    atomic_write(path, save(tensors, metadata=metadata), overwrite=overwrite)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a weights file written by ``save_weights``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {first_sentence(e)}"
        ) from None
    try:
        return {k: json.loads(v) for k, v in raw.items()}
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: unreadable metadata: {e}") from None


def build_and_load(
    config: ModelConfig | dict[str, Any], state: dict[str, torch.Tensor], source: str | os.PathLike
) -> nn.Module:
    """Rebuild a model from its configuration (or a stored dict of one) and load a state dict, with a clear
    error when the state belongs to another architecture."""
    try:
        if not isinstance(config, ModelConfig):
            config = config_from_dict(config)
        check_model_fits(config, 2, f"loading {source}")  # before allocating it (a damaged or hostile config)
        model = config.build()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: cannot rebuild the model from its stored configuration: {e}") from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines() or [type(e).__name__]
        detail = first[1].strip() if len(first) > 1 else first[0]
        label = getattr(config, "arch", config.family)
        raise CheckpointError(f"{source}: the weights do not fit a {label} model: {detail}") from None
    return model


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a trained model from a run directory, a ``model.safetensors`` file or a ``checkpoint.pt``.

    A run directory gives its final weights when training finished, else its latest checkpoint.
    The model is returned in evaluation mode.
    """
    path = Path(path)
    try:
        return _load_model(path, map_location)
    except OSError as e:  # unreadable (permissions, I/O errors): one line naming the file
        raise CheckpointError(f"{e.filename or path}: cannot read: {e.strerror or e}") from None


def _load_model(path: Path, map_location: str | torch.device) -> nn.Module:
    if path.is_dir():
        if (path / WEIGHTS).is_file():
            path = path / WEIGHTS
        elif (path / CHECKPOINT).is_file():
            path = path / CHECKPOINT
        else:
            raise CheckpointError(f"{path}: no {WEIGHTS} or {CHECKPOINT} in this directory (not a finished run?)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        meta = read_metadata(path)
        if "model_config" not in meta:
            raise CheckpointError(f"{path}: no model configuration in the metadata (not written by cascadenet?)")
        try:
            state = load_file(str(path), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"{path}: not a readable safetensors file (truncated or corrupt?): {first_sentence(e)}"
            ) from None
        model = build_and_load(meta["model_config"], state, path)
    else:
        ckpt = load_checkpoint(path, map_location)
        model = build_and_load(ckpt["model_config"], ckpt["model"], path)
    return model.to(map_location).eval()
