"""Readers of image classification datasets in their standard on-disk formats, loaded whole into memory.

Supported formats, all read with numpy/gzip/pickle/PIL only (no torchvision):

- ``fashion-mnist``: IDX files (raw or gzipped) in ``root``, ``root/raw`` or ``root/FashionMNIST/raw``; by default
  from :data:`DEFAULT_ROOTS` (where Debian's package dataset-fashion-mnist installs them).
- ``cifar10`` / ``cifar100``: the python-pickle batches (``cifar-10-batches-py``, ``cifar-100-python``).
- ``imagefolder``: ``root/{train,test|val}/<class>/*.png|jpg|...``, plus the TinyImageNet validation layout.
- ``synthetic``: a tiny seeded dataset of four stripe/ring patterns, for fast end-to-end tests.

:func:`load_dataset` returns an :class:`ImageSet` (uint8 images on the CPU); batching it is
:mod:`cascadenet.data.loader`'s job. Loading only reads: nothing is ever written under a dataset root, and nothing is
downloaded. Every problem with the files surfaces as a :class:`DataError` that names the path and the problem.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import pickle
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..utils.memory import check_fits

__all__ = [
    "check_test_classes",
    "DATASETS",
    "DatasetName",
    "DEFAULT_ROOTS",
    "FASHION_CLASSES",
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "SYNTHETIC_CLASSES",
    "DataError",
    "ImageSet",
    "load_dataset",
    "kept_classes",
    "split_classes",
]

DatasetName = Literal["fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder", "synthetic"]
DATASETS: tuple[str, ...] = get_args(DatasetName)
# Where the Debian package dataset-fashion-mnist installs the files.
DEFAULT_ROOTS: dict[str, str] = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}
SPLITS: tuple[str, ...] = ("train", "test")

FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
MNIST_CLASSES = [str(d) for d in range(10)]
SYNTHETIC_CLASSES = ["hstripes", "vstripes", "checker", "rings"]
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})


class DataError(ValueError):
    """Bad or missing dataset files: the message names the path and the problem."""

    def __str__(self) -> str:  # one line, whatever the messages of other libraries it quotes hold
        return " ".join(line.strip() for line in super().__str__().splitlines())


@dataclass
class ImageSet:
    """A labelled image dataset held in memory.

    Attributes:
        images: uint8 tensor of shape (N, C, H, W).
        labels: int64 tensor of shape (N,).
        classes: class names; ``len(classes)`` is the number of classes.
        name: dataset name, one of :data:`DATASETS`.
        hflip: whether a horizontal flip preserves the class (a valid augmentation).
        source: where the data was read from (for error messages); empty for generated data.
    """

    images: Tensor
    labels: Tensor
    classes: list[str]
    name: str
    hflip: bool
    source: str = ""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"labels must be int64 ({len(self.images)},), got {self.labels.dtype} {self.labels.shape}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return self.images.shape[2], self.images.shape[3]

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str) -> ImageSet:
        """Returns a copy whose images and labels live on ``device``."""
        return dataclasses.replace(self, images=self.images.to(device), labels=self.labels.to(device))

    def subset(self, index: Tensor) -> ImageSet:
        """Returns the samples selected by ``index`` (integer indices or a boolean mask)."""
        index = index.to(self.images.device)
        return dataclasses.replace(self, images=self.images[index], labels=self.labels[index])


# ----------------------------------------------------------------------------------------------------------------
# Loading


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    split: str = "train",
    *,
    image_size: int | None = None,
    synthetic_size: int | None = None,
    seed: int = 0,
    holdout_classes: Sequence[int] | None = None,
    grayscale: bool | None = None,
) -> ImageSet:
    """Loads one split of a dataset into memory (on the CPU).

    Args:
        name: one of :data:`DATASETS`.
        root: dataset directory; ``None`` uses :data:`DEFAULT_ROOTS` where one exists. Ignored for "synthetic".
        split: "train" or "test" ("test" reads the val folder for image folders without a test folder).
        image_size: resize to ``image_size`` x ``image_size`` (shorter side to ``image_size``, then center crop).
            Needed for image folders whose images differ in size; ``None`` keeps the native size.
        synthetic_size: number of synthetic samples (default 512 for train, 256 for test).
        seed: seed of the synthetic data (train and test draw different samples).
        holdout_classes: drop the examples of these classes and renumber the others 0..K-1 (the kept part of
            :func:`split_classes`); ``None`` or empty keeps every class.
        grayscale: image folders: read every image as one channel (True), as RGB (False), or (None) as one
            channel when every image of the split is grayscale, else RGB (grayscale images as 3 equal channels).

    Returns:
        The split as an :class:`ImageSet` with uint8 images on the CPU.

    Raises:
        DataError: unknown name or split, missing root, or missing, truncated or corrupt files.
        ValueError: ``holdout_classes`` names a class the dataset lacks, or leaves fewer than two.
    """
    if holdout_classes:
        return split_classes(load_dataset(name, root, split, image_size=image_size, synthetic_size=synthetic_size,
                                          seed=seed, grayscale=grayscale), holdout_classes)[0]  # fmt: skip
    if name == "python":  # data.user.PYTHON_DATA: what a run trained by cascadenet.fit records
        raise DataError(
            "the run was trained on data given from Python (cascadenet.fit): it cannot be read from disk; pass the "
            "data from Python (cascadenet.fit(..., test_set=...), or evaluate(run_dir, data=...))"
        )
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise DataError(f"--image-size must be a positive integer, got {image_size!r}")
    if name == "synthetic":
        n = synthetic_size if synthetic_size is not None else (512 if split == "train" else 256)
        return _synthetic(n, image_size or 16, seed * 2 + (split == "test"))
    if root is None:
        if name not in DEFAULT_ROOTS:
            raise DataError(f"no default location for dataset {name!r}: pass --data-root (root=...) with its files")
        root = DEFAULT_ROOTS[name]
    root = Path(root)
    try:
        if not root.is_dir():
            raise DataError(f"{root}: dataset root does not exist or is not a directory (pass --data-root)")
        if name == "imagefolder":
            return _image_folder(root, split, image_size, grayscale)
        ds = _idx(root, split, name) if name in _IDX else _cifar(root, split, name == "cifar100")
    except OSError as e:  # an unreadable folder (permissions, I/O errors) while looking for the files
        raise DataError(f"{e.filename or root}: cannot read ({e.strerror or e})") from None
    return ds if image_size is None else dataclasses.replace(ds, images=_resize(ds.images, image_size))


def kept_classes(num_classes: int, holdout_classes: Sequence[int]) -> list[int]:
    """The classes of a ``num_classes``-class dataset that holding out ``holdout_classes`` keeps, in order: label
    ``k`` of the kept part is original class ``kept_classes(...)[k]``.

    Raises:
        ValueError: a held-out class outside 0..num_classes-1, a repeated one, or fewer than two classes kept (a
            classifier needs two).
    """
    held = list(holdout_classes)
    bad = [c for c in held if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"--holdout-classes {bad[0]!r}: the dataset's classes are 0..{num_classes - 1}")
    if len(set(held)) != len(held):
        raise ValueError(f"--holdout-classes lists a class twice: {' '.join(map(str, held))}")
    kept = [c for c in range(num_classes) if c not in held]
    if len(kept) < 2:
        raise ValueError(
            f"--holdout-classes {' '.join(map(str, held))} leaves {len(kept)} of the dataset's {num_classes} classes; "
            "a classifier needs at least two"
        )
    return kept


def split_classes(ds: ImageSet, holdout_classes: Sequence[int]) -> tuple[ImageSet, ImageSet]:
    """Split a dataset by class: ``(kept, held_out)``.

    ``kept`` holds the examples of the other classes, labels renumbered 0..K-1 in the order of the original
    class indices (:func:`kept_classes`) and ``classes`` their names; ``held_out`` holds the examples of
    ``holdout_classes`` with their original labels and ``ds``'s class names. Both keep the examples' order.

    Raises:
        ValueError: as :func:`kept_classes`.
    """
    kept = kept_classes(ds.num_classes, holdout_classes)
    renumber = torch.full((ds.num_classes,), -1, dtype=torch.int64, device=ds.labels.device)
    renumber[torch.tensor(kept, device=ds.labels.device)] = torch.arange(len(kept), device=ds.labels.device)
    mask = renumber[ds.labels] >= 0
    inside = ds.subset(mask)
    inside = dataclasses.replace(inside, labels=renumber[inside.labels], classes=[ds.classes[c] for c in kept])
    return inside, ds.subset(~mask)


def _resize(images: Tensor, size: int) -> Tensor:
    """Resizes (N, C, H, W) uint8 images: shorter side to ``size`` (antialiased bilinear), then center crop."""
    return resize_crop(images, (size, size))


def resize_crop(images: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, C, H, W) uint8 images scaled (antialiased bilinear) to cover ``size`` = (H, W), then center-cropped to
    it; returned as they are when they have that size already."""
    h, w = images.shape[2:]
    th, tw = size
    if (h, w) == (th, tw):
        return images
    n, c = images.shape[:2]
    check_fits(n * c * th * tw, f"{n} images resized to {th}x{tw}", "choose a smaller --image-size")
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    top, left = (nh - th) // 2, (nw - tw) // 2
    # Chunked so that the float copy of a 60k-image set never exists all at once.
    chunks = [
        F.interpolate(c.float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        .round_()
        .clamp_(0, 255)
        .to(torch.uint8)[:, :, top : top + th, left : left + tw]
        for c in images.split(4096)
    ]
    return torch.cat(chunks).contiguous()


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read file ({e})") from e


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parses an IDX file of unsigned bytes, checking the magic number and that the payload fits the header."""
    data = _read_bytes(path)
    if len(data) < 4 or int.from_bytes(data[:4], "big") != magic:
        found = f"0x{int.from_bytes(data[:4], 'big'):08x}" if len(data) >= 4 else "nothing"
        raise DataError(f"{path}: bad magic number {found}, expected 0x{magic:08x} (not an IDX file of this kind)")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated: expected a {header}-byte header, found {len(data)} bytes")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected, found = math.prod(dims), len(data) - header
    if found < expected:
        raise DataError(f"{path}: truncated: expected {expected} bytes, found {found}")
    if found > expected:
        raise DataError(f"{path}: expected {expected} bytes after the header but found {found} (trailing data)")
    # Copy so that torch gets a writable array (frombuffer on bytes is read-only).
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _find_file(root: Path, dirs: list[Path], name: str) -> Path:
    for d in dirs:
        for candidate in (d / name, d / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    looked = ", ".join(str(d) for d in dirs)
    raise DataError(f"{root / name}: missing file {name}[.gz] (looked in {looked})")


# The datasets stored as MNIST's four IDX files: class names, whether a horizontal flip keeps the class, and the
# sub-folder torchvision downloads them to.
_IDX = {
    "fashion-mnist": (FASHION_CLASSES, True, "FashionMNIST"),
    "mnist": (MNIST_CLASSES, False, "MNIST"),  # a mirrored digit is another symbol
}


def _idx(root: Path, split: str, name: str) -> ImageSet:
    classes, hflip, folder = _IDX[name]
    prefix = "train" if split == "train" else "t10k"
    dirs = [root, root / "raw", root / folder / "raw"]
    image_path = _find_file(root, dirs, f"{prefix}-images-idx3-ubyte")
    label_path = _find_file(root, dirs, f"{prefix}-labels-idx1-ubyte")
    images, labels = _read_idx(image_path, 0x00000803), _read_idx(label_path, 0x00000801)
    if len(images) != len(labels):
        raise DataError(f"{label_path}: has {len(labels)} labels but {image_path} has {len(images)} images")
    _check_labels(labels, len(classes), label_path)
    return ImageSet(
        torch.from_numpy(images).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        list(classes),
        name,
        hflip=hflip,
        source=str(root),
    )


def _check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise DataError(f"{path}: label {bad} out of range [0, {num_classes})")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays, so that a hostile 'dataset' file cannot run code."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        # The real CIFAR files predate numpy 2, which renamed numpy.core to numpy._core.
        renamed = module.replace("numpy.core.", "numpy._core.")
        if (renamed, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(renamed if hasattr(np, "_core") else module, name)


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: missing file")
    try:
        with path.open("rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as e:  # pickle raises almost anything on a corrupt stream; none of it should leak out
        raise DataError(f"{path}: corrupt or truncated pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    # encoding="bytes" gives bytes keys for the original (Python 2) files; accept str keys from re-pickled copies.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _field(batch: dict, key: str, path: Path) -> object:
    if key not in batch:
        raise DataError(f"{path}: missing key {key!r} (found {', '.join(map(str, batch))})")
    return batch[key]


def _cifar(root: Path, split: str, hundred: bool) -> ImageSet:
    folder = "cifar-100-python" if hundred else "cifar-10-batches-py"
    base = root / folder if (root / folder).is_dir() else root
    if hundred:
        files, label_key, meta_file, names_key = [split], "fine_labels", "meta", "fine_label_names"
    else:
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key, meta_file, names_key = "labels", "batches.meta", "label_names"
    meta_path = base / meta_file
    names = _field(_unpickle(meta_path), names_key, meta_path)
    try:
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    except (TypeError, UnicodeDecodeError) as e:
        raise DataError(f"{meta_path}: unreadable class names ({e})") from e
    all_images, all_labels = [], []
    for file in files:
        path = base / file
        batch = _unpickle(path)
        data, labels = _field(batch, "data", path), _field(batch, label_key, path)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise DataError(f"{path}: expected uint8 data of shape (N, 3072), found {found}")
        try:
            labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        except (TypeError, ValueError) as e:
            raise DataError(f"{path}: labels are not integers ({e})") from e
        if len(labels) != len(data):
            raise DataError(f"{path}: has {len(labels)} labels for {len(data)} images")
        _check_labels(labels, len(classes), path)
        all_images.append(data.reshape(-1, 3, 32, 32))
        all_labels.append(labels)
    images, labels = np.concatenate(all_images), np.concatenate(all_labels)
    name = "cifar100" if hundred else "cifar10"
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), classes, name, hflip=True, source=str(base))


def _list_images(folder: Path) -> list[Path]:
    # Recursive so that TinyImageNet's train/<wnid>/images/*.JPEG works as a class folder.
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and p.name[0] != "."
    )


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_folder(root: Path, split: str, image_size: int | None, grayscale: bool | None = None) -> ImageSet:
    files, labels, classes = image_folder_files(root, split)
    images = _load_images(files, image_size, grayscale)
    return ImageSet(images, torch.tensor(labels, dtype=torch.int64), classes, "imagefolder", True, str(root))


def image_folder_files(root: Path, split: str) -> tuple[list[Path], list[int], list[str]]:
    """The image files of one split of an image folder, their labels and the class names (nothing decoded).

    Raises:
        DataError: a missing or malformed layout.
    """
    root = Path(root)
    try:
        if not root.is_dir():
            raise DataError(f"{root}: dataset root does not exist or is not a directory (pass --data-root)")
        return _image_folder_files(root, split)
    except OSError as e:
        raise DataError(f"{e.filename or root}: cannot read ({e.strerror or e})") from None


def _image_folder_files(root: Path, split: str) -> tuple[list[Path], list[int], list[str]]:
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"{train_dir}: missing train folder (expected root/train/<class>/<images>)")
    classes = [d.name for d in _class_dirs(train_dir)]
    if not classes:
        raise DataError(f"{train_dir}: no class folders found")
    index = {c: i for i, c in enumerate(classes)}
    if split == "train":
        split_dir = train_dir
    else:
        # TinyImageNet ships an unlabelled test/images folder; its labelled held-out split is val.
        test_dir = root / "test"
        unlabelled = (
            test_dir.is_dir() and "images" not in index and [d.name for d in _class_dirs(test_dir)] == ["images"]
        )
        split_dir = test_dir if test_dir.is_dir() and not unlabelled else root / "val"
        if not split_dir.is_dir():
            raise DataError(f"{root}: no test or val folder for split 'test'")
    annotations = split_dir / "val_annotations.txt"
    if annotations.is_file() and (split_dir / "images").is_dir():
        files, labels = _tiny_imagenet_val(split_dir, annotations, index)
    else:
        files, labels = [], []
        for d in _class_dirs(split_dir):
            if d.name not in index:
                raise DataError(f"{d}: class folder {d.name!r} does not exist in {train_dir}")
            found = _list_images(d)
            if not found:
                raise DataError(f"{d}: class folder has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            files += found
            labels += [index[d.name]] * len(found)
    if not files:
        raise DataError(f"{split_dir}: no images found")
    return files, labels, classes


def check_test_classes(root: str | os.PathLike) -> None:
    """Before training on an image folder: every class folder of its test split (test/, else val/) is one of the
    training classes, so that the run can be evaluated (found at evaluation, it would cost the whole training).
    Nothing is decoded; a folder without a test split, or TinyImageNet's annotation file, passes.

    Raises:
        DataError: naming the class folder the training folder lacks.
    """
    root = Path(root)
    train_dir = root / "train"
    try:
        if not train_dir.is_dir():
            return  # reading the training split reports it
        classes = {d.name for d in _class_dirs(train_dir)}
        test_dir = root / "test"
        test_classes = [d.name for d in _class_dirs(test_dir)] if test_dir.is_dir() else []
        split_dir = (
            test_dir
            if test_dir.is_dir() and not (test_classes == ["images"] and "images" not in classes)
            else root / "val"
        )
        if not split_dir.is_dir() or (split_dir / "val_annotations.txt").is_file():
            return
        for d in _class_dirs(split_dir):
            if d.name not in classes:
                raise DataError(
                    f"{d}: the test split's class folder {d.name!r} does not exist in {train_dir}: a run trained on "
                    "it could not be evaluated (add the class to train/, or remove it)"
                )
    except OSError as e:
        raise DataError(f"{e.filename or root}: cannot read ({e.strerror or e})") from None


def _tiny_imagenet_val(val_dir: Path, annotations: Path, index: dict[str, int]) -> tuple[list[Path], list[int]]:
    """Reads TinyImageNet's val/val_annotations.txt (tab-separated: filename, wnid, box...)."""
    files, labels = [], []
    try:
        lines = annotations.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{annotations}: cannot read file ({e})") from e
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise DataError(f"{annotations}: line {lineno} is not 'filename<TAB>class...': {line!r}")
        if parts[1] not in index:
            raise DataError(f"{annotations}: line {lineno} names class {parts[1]!r}, which has no train folder")
        path = val_dir / "images" / parts[0]
        if not path.is_file():
            raise DataError(f"{path}: missing image listed on line {lineno} of {annotations}")
        files.append(path)
        labels.append(index[parts[1]])
    return files, labels


# PIL modes of grayscale images (one channel; LA: with transparency, dropped)
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


def is_gray(image: Any) -> bool:
    """Whether a PIL image is grayscale (one channel; its header says it, nothing is decoded)."""
    return image.mode in _GRAY_MODES


def to_mode(image: Any, gray: bool) -> Any:
    """A PIL image as 8-bit gray (``L``) or RGB, as image folders are read (16-bit and float gray scaled to 8
    bits; in memory and streamed alike)."""
    from PIL import Image

    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F") and gray:  # 16-bit or float gray: to 8 bits
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / (65535 if "16" in image.mode else 255) * 255)
                                .clip(0, 255).round().astype(np.uint8))  # fmt: skip
    return image.convert("L" if gray else "RGB")


def all_gray(files: Sequence[str | os.PathLike]) -> bool:
    """Whether every image is grayscale, read from the headers (in parallel, 256 at a time), stopping at the first
    colour image: a colour folder costs a few hundred headers; a grayscale one, every header.

    Raises:
        DataError: an image that cannot be opened.
    """
    from PIL import Image

    def gray(path: str | os.PathLike) -> bool:
        try:
            with Image.open(path) as im:
                return is_gray(im)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise DataError(f"{path}: cannot read image ({e})") from None

    chunk = 256
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for lo in range(0, len(files), chunk):
            if not all(pool.map(gray, files[lo : lo + chunk])):
                return False
    return True


def _load_image(path: Path, size: int | None, grayscale: bool | None = False) -> np.ndarray:
    """Reads one image as (H, W, 3) uint8 RGB, or (H, W) uint8 gray (``grayscale``, or None and the image is
    grayscale), resized and center-cropped to ``size`` when given."""
    from PIL import Image  # imported here: only image folders need PIL

    try:
        with Image.open(path) as im:
            gray = grayscale if grayscale is not None else is_gray(im)
            im = to_mode(im, gray)
            if size is not None and im.size != (size, size):
                w, h = im.size
                scale = size / min(w, h)
                nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
                im = im.resize((nw, nh), Image.Resampling.BILINEAR)
                left, top = (nw - size) // 2, (nh - size) // 2
                im = im.crop((left, top, left + size, top + size))
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from e


def _load_images(files: list[Path], size: int | None, grayscale: bool | None = False) -> Tensor:
    """The images, ``(N, C, H, W)`` uint8: C = 1 when ``grayscale`` (or None and every image is grayscale), else
    3 (grayscale images as 3 equal channels)."""
    # PIL releases the GIL while decoding, so threads give a real speed-up on large folders (TinyImageNet: 100k).
    pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1))
    out = None
    try:
        for i, (path, arr) in enumerate(zip(files, pool.map(lambda p: _load_image(p, size, grayscale), files))):
            if arr.ndim == 2:
                arr = arr[:, :, None]
            if out is None:
                # Filled in place, channels first, so that peak memory stays near one copy of the dataset.
                out = np.empty((len(files), arr.shape[2], *arr.shape[:2]), dtype=np.uint8)
            elif arr.shape[2] > out.shape[1]:  # the first colour image after grayscale ones: RGB from here on
                out = np.repeat(out, 3, axis=1)
            if arr.shape[:2] != out.shape[2:]:
                raise DataError(
                    f"{path}: image is {arr.shape[1]}x{arr.shape[0]} but {files[0]} is {out.shape[3]}x{out.shape[2]};"
                    " pass --image-size to resize all images to one size"
                )
            out[i] = arr.transpose(2, 0, 1)
    finally:
        pool.shutdown(cancel_futures=True)  # on an error, do not decode the rest of a large folder first
    return torch.from_numpy(out)


def _synthetic(n: int, size: int, seed: int) -> ImageSet:
    """Four flip- and shift-invariant pattern classes (horizontal/vertical stripes, checkerboard, rings) with a
    random phase, colour and Gaussian noise: easy for a small CNN, impossible to memorise pixel by pixel."""
    if n < 1:
        raise DataError(f"--synthetic-size must be >= 1, got {n}")
    # the images (uint8), the patterns (one float64 plane per image) and, while drawing them, three float64 copies
    # of the (N, 3, H, W) images at once (the coloured patterns, the noise, the scaled noise): 2.3 GB per copy for
    # 96 images of 1000x1000 (the first estimate counted one plane and let such a run die in the allocator)
    check_fits(n * size * size * (3 + 8 + 3 * 3 * 8), f"--synthetic-size {n} of {size}x{size} images",
               "use fewer (--synthetic-size) or smaller (--image-size) images")  # fmt: skip
    # float64 throughout: 1-ulp differences between the SIMD and scalar paths of sin (which depend on the CPU and
    # on how the work is split across threads) must never flip a rounded pixel.
    g, f64 = torch.Generator().manual_seed(seed), torch.float64
    labels = torch.arange(n) % 4
    labels = labels[torch.randperm(n, generator=g)]
    coords = torch.arange(size, dtype=f64) * (2 * math.pi / (size / 4))  # period: a quarter of the image
    ys, xs = coords.view(1, size, 1), coords.view(1, 1, size)
    phase = torch.rand(2, n, 1, 1, generator=g, dtype=f64) * 2 * math.pi
    rows, cols = torch.sin(ys + phase[0]), torch.sin(xs + phase[1])
    centre = (size - 1) / 2 * 2 * math.pi / (size / 4)
    rings = torch.sin(((ys - centre) ** 2 + (xs - centre) ** 2).sqrt() + phase[0])
    k = labels.view(n, 1, 1)
    patterns = torch.where(k == 0, rows, torch.where(k == 1, cols, torch.where(k == 2, 2 * rows * cols, rings)))
    colour = 0.5 + 0.5 * torch.rand(n, 3, 1, 1, generator=g, dtype=f64)
    x = 0.5 + 0.35 * colour * patterns.unsqueeze(1) + 0.1 * torch.randn(n, 3, size, size, generator=g, dtype=f64)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageSet(images, labels, list(SYNTHETIC_CLASSES), "synthetic", hflip=True)
