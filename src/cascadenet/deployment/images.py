"""Images from outside the project's datasets: files, folders and glob patterns read with Pillow, and the input
transform a trained model carries (``Preprocess``: channels, size and normalisation as in training).
"""

from __future__ import annotations

import glob
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data.datasets import DataError, resize_crop

__all__ = ["IMAGE_SUFFIXES", "Preprocess", "expand_paths", "read_image"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def expand_paths(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files named by ``paths``: files as given, folders searched recursively for image files (sorted),
    glob patterns (``*``, ``?``, ``[``, ``**``) expanded. ``DataError`` for a path that names nothing."""
    files: list[Path] = []
    for given in paths:
        text = str(given)
        if not Path(text).exists() and any(ch in text for ch in "*?["):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise DataError(f"{text}: the pattern matches no file")
            files += [Path(m) for m in matches if Path(m).is_file()]
            continue
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"{path}: no image files in this folder ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    return files


def read_image(source: str | os.PathLike | bytes, channels: int) -> np.ndarray:
    """One image as ``(H, W, channels)`` uint8: a file path or the bytes of an encoded image, converted to RGB
    (3 channels) or luminance (1). ``DataError`` naming the source when Pillow cannot decode it."""
    from PIL import Image

    name = "the image" if isinstance(source, bytes) else str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{name}: cannot read image ({' '.join(str(e).split()) or type(e).__name__})") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


@dataclass(frozen=True)
class Preprocess:
    """The input transform of a trained model: images to the normalised float batch it was trained on.

    ``preprocess(images)`` takes a path, the bytes of an encoded image, a PIL image, a uint8 array ``(H, W)`` /
    ``(H, W, C)``, a uint8 tensor ``(C, H, W)`` / ``(N, C, H, W)``, or a list of any of these, and returns a float32
    ``(N, channels, H, W)`` batch: converted to the model's channels (RGB to luminance for one channel, grey
    repeated for three), scaled to cover ``size`` and centre-cropped (antialiased bilinear, as training's
    ``--image-size``), then ``(x / 255 - mean) / std``.

    Attributes:
        mean, std: per-channel statistics in [0, 1] pixel units (the run's); None when the file has none
            (calling the transform then raises ``ValueError``; ``to_uint8`` still works).
        channels: the model's input channels.
        size: ``(H, W)`` the model was trained at, or None (unknown: images keep their size, which must then be
            the same across a batch).
        source: the model's file, for messages.
    """

    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    channels: int
    size: tuple[int, int] | None = None
    source: str = ""

    def __call__(self, images: Any) -> Tensor:
        if self.mean is None or self.std is None:
            where = self.source or "this model"
            raise ValueError(f"{where}: no normalisation statistics recorded with the weights (not written by "
                             "cascadenet train): normalise the images as it was trained")  # fmt: skip
        x = self.to_uint8(images).float()
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return (x / 255 - mean) / std

    def to_uint8(self, images: Any) -> Tensor:
        """The images as a uint8 ``(N, channels, H, W)`` tensor at the model's size, before normalisation."""
        if isinstance(images, Tensor) and images.dim() == 4:
            return torch.stack([self._one(im) for im in images]) if len(images) else self._empty()
        if isinstance(images, (list, tuple)):
            if not images:
                return self._empty()
            parts = [self._one(im) for im in images]
            shapes = {tuple(p.shape) for p in parts}
            if len(shapes) > 1:
                raise DataError(f"images of different sizes {sorted(shapes)} and no training size to resize them to")
            return torch.stack(parts)
        return self._one(images)[None]

    def _empty(self) -> Tensor:
        h, w = self.size or (0, 0)
        return torch.empty((0, self.channels, h, w), dtype=torch.uint8)

    def _one(self, image: Any) -> Tensor:
        """One image as uint8 ``(channels, H, W)``."""
        if isinstance(image, (str, os.PathLike, bytes)):
            chw = torch.from_numpy(read_image(image, self.channels).transpose(2, 0, 1).copy())
        elif isinstance(image, Tensor):
            if image.dtype != torch.uint8 or image.dim() != 3:
                raise DataError(f"an image tensor must be uint8 (C, H, W), got {image.dtype} {tuple(image.shape)}")
            chw = image.cpu()
        elif isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3):
                raise DataError(f"an image array must be uint8 (H, W) or (H, W, C), got {image.dtype} {image.shape}")
            hwc = image[:, :, None] if image.ndim == 2 else image
            chw = torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))
        elif hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
            arr = np.asarray(image.convert("L" if self.channels == 1 else "RGB"), dtype=np.uint8)
            chw = torch.from_numpy(np.ascontiguousarray((arr[:, :, None] if arr.ndim == 2 else arr).transpose(2, 0, 1)))
        else:
            raise DataError(f"cannot read an image from a {type(image).__name__}")
        chw = self._channels(chw)
        if self.size is not None:
            chw = resize_crop(chw[None], self.size)[0]
        return chw

    def _channels(self, chw: Tensor) -> Tensor:
        c = chw.shape[0]
        if c == 4:  # RGBA: the alpha channel is not an input
            chw, c = chw[:3], 3
        if c == self.channels:
            return chw
        if c == 1:
            return chw.expand(self.channels, -1, -1).contiguous()
        if c == 3 and self.channels == 1:  # ITU-R 601-2 luma in Pillow's fixed point: the same as convert("L")
            weights = torch.tensor([19595, 38470, 7471], dtype=torch.int64).view(3, 1, 1)
            return ((chw.long() * weights).sum(0, keepdim=True) + 0x8000).bitwise_right_shift(16).to(torch.uint8)
        raise DataError(f"an image with {c} channels cannot be given to a model of {self.channels}")
