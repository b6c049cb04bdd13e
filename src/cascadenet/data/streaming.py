"""Image folders too large for memory (ImageNet-sized): decoded on the fly by DataLoader workers.

Small datasets stay device-resident (:mod:`cascadenet.data.loader`); an image folder whose decoded images would not
fit comfortably in memory streams instead (``--stream auto``, the default, decides from the folder's size; ``on``
and ``off`` force it). Workers decode with PIL (JPEG draft mode: the decoder itself downscales when the crop
allows) and apply the standard ImageNet transforms, written here with PIL (torchvision is not needed):

- training: random resized crop (area 8%-100% of the image, aspect ratio 3/4-4/3, 10 tries then a centre
  crop) and a horizontal flip with probability 1/2;
- evaluation: the centre crop of side 87.5% of the shorter side (= resize to size / 0.875, centre crop), resized.

Batches come back as uint8 in pinned memory, are copied to the device asynchronously and normalised there.
Every random draw of an epoch (the order, and one seed per sample for its crop and flip) is made from the
trainer's generator when the epoch starts, so an epoch is reproducible and a resumed one skips exactly the
batches already done, without decoding them. Normalisation uses the ImageNet statistics (what pretrained
ResNets expect); computing a folder's own would mean decoding it.

Grayscale folders are read as in memory (``cascadenet.data.datasets``): one channel when every image is grayscale
(``grayscale=None``, read from the headers when the folder is indexed) or when asked (``True``), RGB otherwise; one
channel is normalised with the mean of ImageNet's three channel means and standard deviations.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .datasets import DataError, all_gray, image_folder_files, to_mode

__all__ = ["FolderIndex", "StreamingImages", "index_folder", "stream_batches", "estimated_bytes", "IMAGENET_MEAN",
           "IMAGENET_STD", "DEFAULT_SIZE"]  # fmt: skip

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SIZE = 224
CROP_FRACTION = 0.875  # evaluation: the centre crop covers this much of the shorter side


@dataclass
class FolderIndex:
    """The files of an image folder split (or part of one) and their labels: what streaming needs, nothing
    decoded. Mirrors the parts of :class:`~cascadenet.data.datasets.ImageSet` that training uses."""

    files: list[str]
    labels: Tensor  # int64 (N,)
    classes: list[str]
    size: int  # images come out size x size
    source: str = ""
    name: str = "imagefolder"
    hflip: bool = True
    channels: int = 3  # 1: read as grayscale

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_channels(self) -> int:
        return self.channels

    @property
    def shape(self) -> list[int]:
        return [self.channels, self.size, self.size]

    def subset(self, index: Tensor) -> FolderIndex:
        index = index.cpu()
        return FolderIndex([self.files[i] for i in index.tolist()], self.labels[index], self.classes, self.size,
                           self.source, channels=self.channels)  # fmt: skip

    def to(self, device: torch.device | str) -> FolderIndex:  # the files stay where they are
        return self


def index_folder(root: str | os.PathLike, split: str, size: int, grayscale: bool | None = None) -> FolderIndex:
    """The files of a split, to be read with one channel when ``grayscale`` (None: when every image of the split
    is grayscale, as ``load_dataset`` reads a folder into memory), else three."""
    files, labels, classes = image_folder_files(Path(root), split)
    gray = all_gray(files) if grayscale is None else grayscale
    return FolderIndex([str(f) for f in files], torch.tensor(labels, dtype=torch.int64), classes, size, str(root),
                       channels=1 if gray else 3)  # fmt: skip


def estimated_bytes(root: str | os.PathLike, image_size: int | None) -> int:
    """What the training split would take in memory decoded (uint8), judged from its first image when the
    images keep their own size."""
    files, _, _ = image_folder_files(Path(root), "train")
    if image_size is not None:
        return len(files) * 3 * image_size * image_size
    from PIL import Image

    try:
        with Image.open(files[0]) as im:  # reads the header only
            w, h = im.size
    except (OSError, ValueError) as e:
        raise DataError(f"{files[0]}: cannot read image ({e})") from None
    return len(files) * 3 * w * h


def available_memory() -> int:
    """Memory available to new allocations (Linux: MemAvailable), else total physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ----------------------------------------------------------------------------------------------------------------
# Decoding and transforms (in the workers)


def _random_resized_crop(w: int, h: int, rng: random.Random) -> tuple[float, float, float, float]:
    """The box (left, top, right, bottom) of a random resized crop, as torchvision draws it."""
    area = w * h
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return left, top, left + cw, top + ch
    ratio = w / h  # fallback: the centre crop with the ratio clamped to the range
    if ratio < 3 / 4:
        cw, ch = w, round(w / (3 / 4))
    elif ratio > 4 / 3:
        cw, ch = round(h * (4 / 3)), h
    else:
        cw, ch = w, h
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


def _centre_crop(w: int, h: int) -> tuple[float, float, float, float]:
    side = min(w, h) * CROP_FRACTION
    left, top = (w - side) / 2, (h - side) / 2
    return left, top, left + side, top + side


def load_transformed(path: str, size: int, train: bool, seed: int, channels: int = 3) -> np.ndarray:
    """One image as (channels, size, size) uint8 (1: gray, 3: RGB): decoded, cropped (random resized crop and flip
    when ``train``, else the centre crop) and resized in one resampling."""
    from PIL import Image

    rng = random.Random(seed)
    try:
        with Image.open(path) as im:
            w, h = im.size
            box = _random_resized_crop(w, h, rng) if train else _centre_crop(w, h)
            flip = train and rng.random() < 0.5
            # JPEG draft: let the decoder downscale by 1/2, 1/4 or 1/8 while the crop keeps >= size pixels
            scale = max(size / max(box[2] - box[0], 1), size / max(box[3] - box[1], 1))
            if scale < 1:
                im.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))  # the scale only: gray made below
            fx, fy = im.size[0] / w, im.size[1] / h
            box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
            out = to_mode(im, channels == 1).resize((size, size), Image.Resampling.BILINEAR, box=box)
            if flip:
                out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            array = np.asarray(out, dtype=np.uint8)
            return array[None].copy() if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from None


class StreamingImages(Dataset):
    """A map-style dataset of ``(index, seed)`` items: the image ``index`` transformed with the draws of ``seed``."""

    def __init__(self, index: FolderIndex, train: bool) -> None:
        self.files, self.labels, self.size, self.train = index.files, index.labels, index.size, train
        self.channels = index.channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, Tensor]:
        i, seed = item
        image = load_transformed(self.files[i], self.size, self.train, seed, self.channels)
        return torch.from_numpy(image), self.labels[i]


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def stream_batches(
    index: FolderIndex,
    batch_size: int,
    *,
    train: bool,
    shuffle: bool,
    mean: Tensor,
    std: Tensor,
    device: torch.device,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    shard: tuple[int, int] = (0, 1),
    start: int = 0,
    workers: int | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of normalised batches ``(x, y)`` on ``device``, from batch ``start`` on (earlier ones are neither
    read nor decoded). All draws are made when this is called (see the module docstring); ``shard`` as in
    :func:`cascadenet.data.loader.iterate_batches`: this process's part of every global batch."""
    n = len(index)
    rank, processes = shard
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    seeds = torch.randint(0, 2**62, (n,), generator=generator) if train else torch.zeros(n, dtype=torch.int64)
    step = batch_size * processes
    count = n // step if drop_last else -(-n // step)
    batches = []
    for b in range(start, count):
        lo = b * step + rank * batch_size
        window = range(lo, min(lo + batch_size, n))
        if len(window):
            batches.append([(int(order[j]), int(seeds[j])) for j in window])
    workers = default_workers() if workers is None else workers
    loader = DataLoader(
        StreamingImages(index, train), batch_sampler=batches, num_workers=workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
    )  # fmt: skip
    c = index.num_channels
    scale = (1 / (255 * std.float())).to(device).view(1, c, 1, 1)
    offset = (mean.float() / std.float()).to(device).view(1, c, 1, 1)
    batches_in = iter(loader)
    while True:
        try:
            x, y = next(batches_in)
        except StopIteration:
            return
        except DataError as e:  # raised in a worker: the DataLoader wraps it in the worker's whole traceback
            raise DataError(worker_message(e)) from None
        x = x.to(device, non_blocking=True).float().mul_(scale).sub_(offset)
        yield x, y.to(device, non_blocking=True)


def worker_message(error: BaseException) -> str:
    """The message of an error raised in a DataLoader worker, without the traceback the loader wraps it in."""
    text = str(error).strip()
    if "Original Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    head, sep, message = last.partition("DataError: ")
    return message if sep else last


def streaming_normalization(channels: int = 3) -> tuple[Tensor, Tensor]:
    """ImageNet's statistics; for one channel the mean of its three channels' means and standard deviations."""
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    if channels == 1:
        return mean.mean().view(1), std.mean().view(1)
    return mean, std
