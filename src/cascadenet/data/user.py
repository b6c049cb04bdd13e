"""A user's own data from Python: any map-style ``Dataset`` (or a ``DataLoader`` over one) of ``(image, label)``
pairs, read once into an in-memory :class:`~cascadenet.data.datasets.ImageSet`.

Training batches an ``ImageSet`` by index from a seeded generator (``cascadenet.data.loader``), so a user's data
gets what the on-disk formats get: the seeded validation split, augmentation, and a resume that ends with the same
weights as an uninterrupted run. Images are stored as 8-bit pixels, as the on-disk formats are:

- a uint8 tensor or array is taken as it is;
- a float tensor or array must hold pixels in ``[0, 1]`` (what ``torchvision.transforms.ToTensor`` gives); it is
  stored as ``round(255 * x)``, which is exact for images decoded from 8-bit files (a warning says when it is not);
  cascadenet normalises with the training set's own statistics, so give images *before* normalisation;
- a PIL image is decoded (mode ``L`` is one channel, others RGB).

A tensor of three dimensions is ``(C, H, W)``; of two, ``(H, W)``, one channel. Every image must have the same
shape (resize them in the dataset's transform). Labels are ints (or 0-d tensors) in ``[0, classes)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .datasets import DataError, ImageSet

__all__ = ["PYTHON_DATA", "as_image_set"]

# The dataset name a run trained on data given from Python records (config.json): it cannot be read from disk.
PYTHON_DATA = "python"


def as_image_set(
    data: Any, *, classes: Sequence[str] | int | None = None, hflip: bool = True, name: str = "data"
) -> ImageSet:
    """Read a dataset given from Python into an in-memory :class:`ImageSet` (uint8 images on the CPU).

    Args:
        data: an ``ImageSet`` (returned as it is), a map-style dataset (``len(data)`` and ``data[i]`` giving
            ``(image, label)``), or a ``torch.utils.data.DataLoader`` (its dataset when it is map-style, else
            every batch it yields, in order).
        classes: the class names, or their number; default: the dataset's ``classes`` attribute (torchvision's
            datasets have one), else ``0 .. max label``.
        hflip: whether a horizontal flip keeps the class (training's augmentation flips only then).
        name: what error messages call the data (``train_set``, ``val_set``, ...).

    Raises:
        DataError: an item that is not an ``(image, label)`` pair, an image of another shape than the first, float
            pixels outside [0, 1], a label outside the classes, or an empty dataset.
    """
    if isinstance(data, ImageSet):
        return data
    images, labels = _read(data, name)
    if not images:
        raise DataError(f"{name} is empty")
    shape = images[0].shape
    for i, image in enumerate(images):
        if image.shape != shape:
            raise DataError(
                f"{name}: image {i} has shape {tuple(image.shape)} but image 0 has {tuple(shape)}: every image must "
                "have the same shape (resize them in the dataset's transform)"
            )
    y = torch.tensor(labels, dtype=torch.int64)
    names = _class_names(data, classes, y, name)
    bad = (y < 0) | (y >= len(names))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise DataError(f"{name}: label {int(y[i])} of item {i} is outside the {len(names)} classes")
    return ImageSet(torch.stack(images), y, names, PYTHON_DATA, hflip=hflip, source=name)


def _read(data: Any, name: str) -> tuple[list[Tensor], list[int]]:
    """Every item's image (uint8 ``(C, H, W)``) and label."""
    loader = data if isinstance(data, torch.utils.data.DataLoader) else None
    if loader is not None and _map_style(loader.dataset):
        data, loader = loader.dataset, None
    images: list[Tensor] = []
    labels: list[int] = []
    lossy = False
    if loader is not None:  # an iterable dataset: its batches as the loader yields them
        for batch in loader:
            x, y = _pair(batch, f"{name} batch {len(images)}")
            for image, label in zip(x, y):
                img, rounded = _image(image, f"{name} item {len(images)}")
                images.append(img)
                labels.append(_label(label, f"{name} item {len(labels)}"))
                lossy |= rounded
    else:
        if not _map_style(data):
            raise DataError(
                f"{name} must be a map-style dataset (len() and [i] giving (image, label)), a DataLoader or an "
                f"ImageSet, got {type(data).__name__}"
            )
        for i in range(len(data)):
            image, label = _pair(data[i], f"{name} item {i}")
            img, rounded = _image(image, f"{name} item {i}")
            images.append(img)
            labels.append(_label(label, f"{name} item {i}"))
            lossy |= rounded
    if lossy:
        warnings.warn(
            f"{name}: float pixels that are not multiples of 1/255 were rounded to 8 bits (cascadenet stores images "
            "as 8-bit pixels)",
            stacklevel=4,
        )
    return images, labels


def _map_style(data: Any) -> bool:
    return hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(data, (str, bytes))


def _pair(item: Any, where: str) -> tuple[Any, Any]:
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise DataError(f"{where} is not an (image, label) pair (got {type(item).__name__})")
    return item[0], item[1]


def _image(image: Any, where: str) -> tuple[Tensor, bool]:
    """A uint8 ``(C, H, W)`` tensor, and whether float pixels had to be rounded."""
    if not isinstance(image, (Tensor, np.ndarray)):
        if hasattr(image, "mode") and hasattr(image, "convert"):  # a PIL image
            image = np.asarray(image if image.mode in ("L", "RGB") else image.convert("RGB"))
            image = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
        else:
            raise DataError(f"{where}: the image is a {type(image).__name__}, not a tensor, array or PIL image")
    x = torch.as_tensor(np.ascontiguousarray(image) if isinstance(image, np.ndarray) else image).detach().cpu()
    if x.dim() == 2:
        x = x[None]
    if x.dim() != 3 or 0 in x.shape:
        raise DataError(f"{where}: an image must be (C, H, W) or (H, W), got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.contiguous(), False
    if x.dtype == torch.bool or not (x.is_floating_point() or x.dtype in (torch.int16, torch.int32, torch.int64)):
        raise DataError(f"{where}: images must be uint8 or float in [0, 1], got {x.dtype}")
    if not x.is_floating_point():
        if int(x.min()) < 0 or int(x.max()) > 255:
            raise DataError(f"{where}: integer pixels must be in [0, 255], got [{int(x.min())}, {int(x.max())}]")
        return x.to(torch.uint8), False
    x = x.double()
    if not bool(torch.isfinite(x).all()) or float(x.min()) < 0 or float(x.max()) > 1:
        raise DataError(
            f"{where}: float pixels must be in [0, 1], got [{float(x.min()):.4g}, {float(x.max()):.4g}] (give "
            "images before normalisation: cascadenet normalises with the training set's statistics)"
        )
    scaled = x * 255
    rounded = scaled.round()
    return rounded.to(torch.uint8), bool(((scaled - rounded).abs() > 1e-3).any())


def _label(label: Any, where: str) -> int:
    if isinstance(label, Tensor) and label.numel() == 1 and not label.is_floating_point():
        return int(label.item())
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        return int(label)
    raise DataError(f"{where}: the label must be an int, got {label!r:.60}")


def _class_names(data: Any, classes: Sequence[str] | int | None, labels: Tensor, name: str) -> list[str]:
    if classes is None:
        found = getattr(data, "classes", None)
        if isinstance(found, (list, tuple)) and found and all(isinstance(c, str) for c in found):
            return list(found)
        return [str(i) for i in range(max(int(labels.max()) + 1, 2))]
    if isinstance(classes, int) and not isinstance(classes, bool):
        if classes < 2:
            raise DataError(f"{name}: classes must be at least 2, got {classes}")
        return [str(i) for i in range(classes)]
    names = [str(c) for c in classes]
    if len(names) < 2:
        raise DataError(f"{name}: classes must name at least 2 classes, got {names}")
    return names
