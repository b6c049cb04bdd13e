"""Tests for cascadenet.data.datasets and cascadenet.data.loader: every format is written small into tmp_path and read
back exactly."""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cascadenet.data.datasets import DATASETS, DEFAULT_ROOTS, DataError, ImageSet, load_dataset
from cascadenet.data.loader import check_compatible, iterate_batches, normalization, num_batches, train_val_split

FASHION_ROOT = Path(DEFAULT_ROOTS["fashion-mnist"])
RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------------------------------------------
# Writers for tiny files in each format


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
        path = folder / f"{prefix}-{kind}-ubyte{'.gz' if gz else ''}"
        path.write_bytes(gzip.compress(idx_bytes(array)) if gz else idx_bytes(array))


def fashion(tmp_path: Path, gz: bool = True, sub: str = "", n: int = 6) -> tuple[Path, np.ndarray, np.ndarray]:
    images = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    write_idx(tmp_path / sub, "t10k", images, labels, gz)
    return tmp_path, images, labels


def pickle_to(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))


def cifar10(root: Path, n: int = 2) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Writes data_batch_1..5 and test_batch of n images each; returns what each file holds."""
    base, written = root / "cifar-10-batches-py", {}
    for i, file in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = RNG.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [(i + j) % 10 for j in range(n)]
        pickle_to(base / file, {b"batch_label": b"x", b"data": data, b"labels": labels})
        written[file] = (data, labels)
    pickle_to(base / "batches.meta", {b"label_names": [f"c{k}".encode() for k in range(10)]})
    return written


def save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def image_folder(root: Path, splits: tuple[str, ...] = ("train", "test"), size: int = 8) -> dict[str, list]:
    """Writes root/<split>/<class>/k.png for classes b, a (listed unsorted); returns (class, array) per split."""
    written: dict[str, list] = {}
    for split in splits:
        written[split] = []
        for cls in ("b", "a"):
            for k in range(2):
                array = RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)
                save_png(root / split / cls / f"{k}.png", array)
                written[split].append((cls, array))
    return written


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def toy(n: int = 10, c: int = 1, size: int = 8, hflip: bool = True) -> ImageSet:
    """Each image is distinct and its label is its index, so a batch says exactly which samples it holds."""
    images = torch.randint(0, 256, (n, c, size, size), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    return ImageSet(images, torch.arange(n), [str(i) for i in range(n)], "toy", hflip)


# ----------------------------------------------------------------------------------------------------------------
# Fashion-MNIST / IDX


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("sub", ["", "raw", "FashionMNIST/raw"])
def test_idx_reads_back_exactly(tmp_path: Path, gz: bool, sub: str) -> None:
    root, images, labels = fashion(tmp_path, gz, sub)
    before = snapshot(root)
    ds = load_dataset("fashion-mnist", root, "test")
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (6, 1, 28, 28)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == labels.tolist()
    assert ds.classes[0] == "T-shirt/top" and ds.num_classes == 10 and ds.hflip and ds.name == "fashion-mnist"
    assert (len(ds), ds.num_channels, ds.image_size) == (6, 1, (28, 28))
    assert snapshot(root) == before  # loading writes nothing under the root


def test_idx_image_size_resizes(tmp_path: Path) -> None:
    root, _, _ = fashion(tmp_path)
    assert load_dataset("fashion-mnist", root, "test", image_size=32).images.shape == (6, 1, 32, 32)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_truncated(tmp_path: Path, gz: bool) -> None:
    fashion(tmp_path, gz)
    path = tmp_path / f"t10k-images-idx3-ubyte{'.gz' if gz else ''}"
    raw = idx_bytes(RNG.integers(0, 256, (6, 28, 28), dtype=np.uint8))[:-10]
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(DataError, match=f"truncated: expected {6 * 28 * 28} bytes, found {6 * 28 * 28 - 10}") as e:
        load_dataset("fashion-mnist", tmp_path, "test")
    assert str(path) in str(e.value)


def test_idx_truncated_gzip_stream(tmp_path: Path) -> None:
    fashion(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DataError, match="cannot read") as e:
        load_dataset("fashion-mnist", tmp_path, "test")
    assert str(path) in str(e.value)


def test_idx_wrong_magic(tmp_path: Path) -> None:
    fashion(tmp_path, gz=False)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(np.zeros((6, 2), np.uint8)))  # a 2-d file where labels (1-d) belong
    with pytest.raises(DataError, match="magic") as e:
        load_dataset("fashion-mnist", tmp_path, "test")
    assert str(path) in str(e.value)


def test_idx_label_out_of_range(tmp_path: Path) -> None:
    fashion(tmp_path, gz=False)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(np.array([0, 1, 2, 10, 4, 5], np.uint8)))
    with pytest.raises(DataError, match=r"label 10 out of range \[0, 10\)") as e:
        load_dataset("fashion-mnist", tmp_path, "test")
    assert str(path) in str(e.value)


def test_idx_count_mismatch(tmp_path: Path) -> None:
    fashion(tmp_path, gz=False)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(DataError, match="5 labels") as e:
        load_dataset("fashion-mnist", tmp_path, "test")
    assert str(path) in str(e.value)


def test_missing_root_and_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    for name in ("fashion-mnist", "cifar10", "cifar100", "imagefolder"):
        with pytest.raises(DataError, match="does not exist") as e:
            load_dataset(name, missing)
        assert str(missing) in str(e.value)
    fashion(tmp_path)
    with pytest.raises(DataError, match="missing file train-images-idx3-ubyte") as e:
        load_dataset("fashion-mnist", tmp_path, "train")
    assert str(tmp_path) in str(e.value)


def test_bad_name_split_and_missing_default_root() -> None:
    with pytest.raises(DataError, match="cifar10, cifar100"):
        load_dataset("imagenet")
    with pytest.raises(DataError, match="train, test"):
        load_dataset("synthetic", split="val")
    with pytest.raises(DataError, match="--data-root"):
        load_dataset("cifar10")
    assert DATASETS == ("fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder", "synthetic")
    with pytest.raises(DataError, match="no default location for dataset 'mnist'"):
        load_dataset("mnist")


@pytest.mark.parametrize("sub", ["", "raw", "MNIST/raw"])
def test_mnist_reads_the_idx_files_as_digits(tmp_path: Path, sub: str) -> None:
    """MNIST: the same IDX files as Fashion-MNIST (also in torchvision's MNIST/raw), digit classes, and no
    horizontal flip (a mirrored digit is another symbol)."""
    root, images, labels = fashion(tmp_path, gz=False, sub=sub)
    ds = load_dataset("mnist", root, "test")
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images)) and ds.labels.tolist() == labels.tolist()
    assert ds.classes == [str(d) for d in range(10)] and ds.name == "mnist" and not ds.hflip
    if sub != "MNIST/raw":  # torchvision keeps Fashion-MNIST in FashionMNIST/raw
        assert load_dataset("fashion-mnist", root, "test").hflip  # clothes mirror


@pytest.mark.skipif(not FASHION_ROOT.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist() -> None:
    ds = load_dataset("fashion-mnist", split="test")  # the default root
    assert ds.images.shape == (10000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels.min() >= 0 and ds.labels.max() < 10 and torch.bincount(ds.labels).tolist() == [1000] * 10


# ----------------------------------------------------------------------------------------------------------------
# CIFAR


@pytest.mark.parametrize("direct", [False, True])
def test_cifar10_reads_back_exactly(tmp_path: Path, direct: bool) -> None:
    written = cifar10(tmp_path)
    before = snapshot(tmp_path)
    root = tmp_path / "cifar-10-batches-py" if direct else tmp_path
    train, test = load_dataset("cifar10", root, "train"), load_dataset("cifar10", root, "test")
    assert train.images.shape == (10, 3, 32, 32) and test.images.shape == (2, 3, 32, 32)
    data = np.concatenate([written[f"data_batch_{k}"][0] for k in range(1, 6)])
    assert torch.equal(train.images, torch.from_numpy(data).view(10, 3, 32, 32))
    assert train.labels.tolist() == sum((written[f"data_batch_{k}"][1] for k in range(1, 6)), [])
    assert torch.equal(test.images, torch.from_numpy(written["test_batch"][0]).view(2, 3, 32, 32))
    assert test.labels.tolist() == written["test_batch"][1]
    assert train.classes == [f"c{k}" for k in range(10)] and train.hflip and train.name == "cifar10"
    assert snapshot(tmp_path) == before


def test_cifar100_reads_back_exactly(tmp_path: Path) -> None:
    base = tmp_path / "cifar-100-python"
    data = RNG.integers(0, 256, (3, 3072), dtype=np.uint8)
    pickle_to(base / "test", {b"data": data, b"fine_labels": [99, 0, 42], b"coarse_labels": [1, 2, 3]})
    pickle_to(base / "meta", {b"fine_label_names": [f"f{k}".encode() for k in range(100)]})
    ds = load_dataset("cifar100", tmp_path, "test")
    assert torch.equal(ds.images, torch.from_numpy(data).view(3, 3, 32, 32)) and ds.labels.tolist() == [99, 0, 42]
    assert ds.num_classes == 100 and ds.classes[42] == "f42" and ds.name == "cifar100"
    with pytest.raises(DataError, match="missing file") as e:
        load_dataset("cifar100", tmp_path, "train")
    assert str(base / "train") in str(e.value)


@pytest.mark.parametrize(
    "content",
    [
        b"not a pickle at all",
        pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, protocol=2)[:-40],  # truncated
        b"cos\nsystem\n(S'echo hacked'\ntR.",  # a pickle that would run code: refused, not executed
    ],
)
def test_cifar_corrupt_pickle(tmp_path: Path, content: bytes) -> None:
    cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(content)
    with pytest.raises(DataError, match="corrupt") as e:
        load_dataset("cifar10", tmp_path, "train")
    assert str(path) in str(e.value)


def test_cifar_bad_contents(tmp_path: Path) -> None:
    cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    pickle_to(path, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    with pytest.raises(DataError, match="label 10 out of range") as e:
        load_dataset("cifar10", tmp_path, "test")
    assert str(path) in str(e.value)
    pickle_to(path, {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DataError, match=r"shape \(N, 3072\)"):
        load_dataset("cifar10", tmp_path, "test")
    pickle_to(path, {b"images": np.zeros((2, 3072), np.uint8)})
    with pytest.raises(DataError, match="missing key 'data'"):
        load_dataset("cifar10", tmp_path, "test")


# ----------------------------------------------------------------------------------------------------------------
# Image folders


@pytest.mark.parametrize("eval_split", ["test", "val"])
def test_image_folder_reads_back_exactly(tmp_path: Path, eval_split: str) -> None:
    written = image_folder(tmp_path, ("train", eval_split))
    before = snapshot(tmp_path)
    for split, key in (("train", "train"), ("test", eval_split)):
        ds = load_dataset("imagefolder", tmp_path, split)
        assert ds.classes == ["a", "b"] and ds.images.shape == (4, 3, 8, 8) and ds.name == "imagefolder"
        expected = sorted(written[key], key=lambda item: item[0])  # class a first, files in name order
        assert ds.labels.tolist() == [ds.classes.index(cls) for cls, _ in expected]
        for image, (_, array) in zip(ds.images, expected):
            assert torch.equal(image, torch.from_numpy(array).permute(2, 0, 1))
    assert snapshot(tmp_path) == before


def test_image_folder_grayscale_and_extensions(tmp_path: Path) -> None:
    gray = RNG.integers(0, 256, (5, 5), dtype=np.uint8)
    save_png(tmp_path / "train" / "x" / "IMG.PNG", gray)
    (tmp_path / "train" / "x" / "notes.txt").write_text("ignored")
    ds = load_dataset("imagefolder", tmp_path)  # every image grayscale: one channel
    assert ds.images.shape == (1, 1, 5, 5) and torch.equal(ds.images[0, 0], torch.from_numpy(gray))
    ds = load_dataset("imagefolder", tmp_path, grayscale=False)  # RGB asked for: 3 equal channels
    assert ds.images.shape == (1, 3, 5, 5)
    assert all(torch.equal(ds.images[0, c], torch.from_numpy(gray)) for c in range(3))


def test_image_folder_of_mixed_grayscale_and_colour_is_rgb(tmp_path: Path) -> None:
    gray = RNG.integers(0, 256, (5, 5), dtype=np.uint8)
    colour = RNG.integers(0, 256, (5, 5, 3), dtype=np.uint8)
    save_png(tmp_path / "train" / "a" / "0.png", gray)  # read first, before the colour image
    save_png(tmp_path / "train" / "b" / "1.png", colour)
    ds = load_dataset("imagefolder", tmp_path)
    assert ds.images.shape == (2, 3, 5, 5)
    assert all(torch.equal(ds.images[0, c], torch.from_numpy(gray)) for c in range(3))
    assert torch.equal(ds.images[1], torch.from_numpy(colour).permute(2, 0, 1))
    forced = load_dataset("imagefolder", tmp_path, grayscale=True)  # one channel asked for: luma
    assert forced.images.shape == (2, 1, 5, 5) and torch.equal(forced.images[0, 0], torch.from_numpy(gray))


def test_image_folder_sizes(tmp_path: Path) -> None:
    save_png(tmp_path / "train" / "a" / "0.png", np.zeros((8, 8, 3), np.uint8))
    odd = tmp_path / "train" / "b" / "0.png"
    save_png(odd, np.zeros((6, 10, 3), np.uint8))
    with pytest.raises(DataError, match="--image-size") as e:
        load_dataset("imagefolder", tmp_path)
    assert str(odd) in str(e.value)
    assert load_dataset("imagefolder", tmp_path, image_size=4).images.shape == (2, 3, 4, 4)


def test_image_folder_errors(tmp_path: Path) -> None:
    image_folder(tmp_path, ("train",))
    bad = tmp_path / "train" / "a" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="cannot read image") as e:
        load_dataset("imagefolder", tmp_path)
    assert str(bad) in str(e.value)
    bad.unlink()
    with pytest.raises(DataError, match="no test or val folder"):
        load_dataset("imagefolder", tmp_path, "test")
    save_png(tmp_path / "val" / "zebra" / "0.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="does not exist in") as e:
        load_dataset("imagefolder", tmp_path, "test")
    assert str(tmp_path / "val" / "zebra") in str(e.value)
    empty = tmp_path / "train" / "c"
    empty.mkdir()
    with pytest.raises(DataError, match="no images") as e:
        load_dataset("imagefolder", tmp_path)
    assert str(empty) in str(e.value)
    with pytest.raises(DataError, match="missing train folder"):
        load_dataset("imagefolder", tmp_path / "val")


def test_tiny_imagenet_layout(tmp_path: Path) -> None:
    for wnid in ("n02", "n01"):
        save_png(tmp_path / "train" / wnid / "images" / f"{wnid}_0.JPEG", np.full((8, 8, 3), 50, np.uint8))
        (tmp_path / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    save_png(tmp_path / "test" / "images" / "test_0.JPEG", np.zeros((8, 8, 3), np.uint8))  # unlabelled: skipped
    for k in range(3):
        save_png(tmp_path / "val" / "images" / f"val_{k}.JPEG", np.full((8, 8, 3), 200, np.uint8))
    lines = ["val_0.JPEG\tn02\t0\t0\t7\t7", "val_1.JPEG\tn01\t1\t1\t6\t6", "", "val_2.JPEG\tn02\t0\t0\t5\t5"]
    annotations = tmp_path / "val" / "val_annotations.txt"
    annotations.write_text("\n".join(lines) + "\n")
    train, val = load_dataset("imagefolder", tmp_path), load_dataset("imagefolder", tmp_path, "test")
    assert train.classes == ["n01", "n02"] and train.labels.tolist() == [0, 1]
    assert val.images.shape == (3, 3, 8, 8) and val.labels.tolist() == [1, 0, 1]
    annotations.write_text("val_0.JPEG\tn99\n")
    with pytest.raises(DataError, match="n99") as e:
        load_dataset("imagefolder", tmp_path, "test")
    assert str(annotations) in str(e.value)


# ----------------------------------------------------------------------------------------------------------------
# Synthetic


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny ops gain nothing from intra-op threads, and they slow down many-fold when the CPU cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_synthetic(one_thread: None) -> None:
    train, test = load_dataset("synthetic"), load_dataset("synthetic", split="test")
    assert train.images.shape == (512, 3, 16, 16) and test.images.shape == (256, 3, 16, 16)
    assert train.num_classes == 4 and torch.bincount(train.labels).tolist() == [128] * 4
    assert torch.equal(train.images, load_dataset("synthetic", root="/ignored").images)  # deterministic
    assert not torch.equal(train.images[:256], test.images)
    assert not torch.equal(train.images, load_dataset("synthetic", seed=1).images)
    assert len(load_dataset("synthetic", synthetic_size=40)) == 40

    # Learnable: a tiny CNN gets most of the test set right within 100 steps (about a second on a CPU).
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 4),
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    mean, std, g = *normalization(train), torch.Generator().manual_seed(0)
    for _ in range(13):  # 13 epochs of 8 batches
        for x, y in iterate_batches(train, 64, shuffle=True, augment=True, mean=mean, std=std, generator=g):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        (x, y), *_ = iterate_batches(test, 256, shuffle=False, augment=False, mean=mean, std=std)
        assert (net(x).argmax(1) == y).float().mean() > 0.9


# ----------------------------------------------------------------------------------------------------------------
# Split, statistics, batching


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 300), fraction=st.floats(0.01, 0.99), seed=st.integers(0, 2**31))
def test_split_is_deterministic_disjoint_and_complete(n: int, fraction: float, seed: int) -> None:
    ds = toy(n, size=2)
    train, val = train_val_split(ds, fraction, seed)
    again_train, again_val = train_val_split(ds, fraction, seed)
    assert torch.equal(train.labels, again_train.labels) and torch.equal(val.labels, again_val.labels)
    assert len(val) >= 1 and len(train) >= 1
    assert sorted(train.labels.tolist() + val.labels.tolist()) == list(range(n))
    assert torch.equal(train.images, ds.images[train.labels])  # images follow their labels


def test_split_rejects_bad_fraction() -> None:
    for fraction in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            train_val_split(toy(), fraction)


def test_normalization() -> None:
    ds = toy(7, c=3)
    mean, std = normalization(ds)
    x = ds.images.double() / 255
    assert mean.dtype == std.dtype == torch.float32 and mean.shape == std.shape == (3,)
    torch.testing.assert_close(mean, x.mean((0, 2, 3)).float())
    torch.testing.assert_close(std, x.transpose(0, 1).reshape(3, -1).std(1, correction=0).float())


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 70), batch_size=st.integers(1, 30), drop_last=st.booleans(), augment=st.booleans())
def test_batches_cover_each_index_once(n: int, batch_size: int, drop_last: bool, augment: bool) -> None:
    ds = toy(n, size=4)
    batches = list(
        iterate_batches(
            ds, batch_size, shuffle=True, augment=augment, mean=torch.zeros(1), std=torch.ones(1), drop_last=drop_last
        )
    )
    assert len(batches) == num_batches(n, batch_size, drop_last)
    seen = torch.cat([y for _, y in batches]).tolist() if batches else []
    assert all(x.shape == (len(y), 1, 4, 4) and x.dtype == torch.float32 for x, y in batches)
    if drop_last:
        assert len(seen) == n // batch_size * batch_size and len(set(seen)) == len(seen)
    else:
        assert sorted(seen) == list(range(n))


def test_num_batches() -> None:
    assert [num_batches(10, 3, False), num_batches(10, 3, True), num_batches(2, 3, True)] == [4, 3, 0]


def test_batches_reproducible_from_generator_state() -> None:
    ds, g = toy(20, c=3, size=8), torch.Generator().manual_seed(5)
    mean, std = normalization(ds)

    def epoch() -> list:
        return list(iterate_batches(ds, 6, shuffle=True, augment=True, mean=mean, std=std, generator=g))

    state = g.get_state()
    first = epoch()
    g.set_state(state)
    it = iterate_batches(ds, 6, shuffle=True, augment=True, mean=mean, std=std, generator=g)
    after_call = g.get_state()  # every draw of the epoch is made at call time, before any batch is consumed
    again = list(it)
    assert torch.equal(g.get_state(), after_call)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, epoch()))  # the next epoch differs


def test_batches_normalize_in_order() -> None:
    ds = toy(5, c=3)
    mean, std = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.2, 0.3, 0.4])
    (x, y), *rest = iterate_batches(ds, 5, shuffle=False, augment=False, mean=mean, std=std)
    assert not rest and y.tolist() == list(range(5))
    torch.testing.assert_close(x, (ds.images.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))


def windows(image: torch.Tensor, pad: int, flip: bool) -> list[torch.Tensor]:
    """Every crop of the zero-padded image (and of its mirror when flip)."""
    h, w = image.shape[1:]
    sources = [image, image.flip(-1)] if flip else [image]
    padded = [torch.nn.functional.pad(s, (pad, pad, pad, pad)) for s in sources]
    return [p[:, i : i + h, j : j + w] for p in padded for i in range(2 * pad + 1) for j in range(2 * pad + 1)]


@pytest.mark.parametrize("hflip", [True, False])
def test_augmentation_only_shifts_and_flips(hflip: bool) -> None:
    # Distinct positive pixels, so a crop is identified unambiguously and padding (0) is never confused with content.
    n, size, pad = 64, 6, 2
    images = (torch.randperm(n * 2 * size * size) % 250 + 1).to(torch.uint8).view(n, 2, size, size)
    ds = ImageSet(images, torch.arange(n), [str(i) for i in range(n)], "toy", hflip)
    g = torch.Generator().manual_seed(0)
    x, y = next(
        iterate_batches(ds, n, shuffle=True, augment=True, mean=torch.zeros(2), std=torch.ones(2) / 255, generator=g)
    )
    assert x.shape == (n, 2, size, size)
    shifts, flips = set(), 0
    for out, label in zip(x.round().to(torch.uint8), y):
        source = images[label]
        matches = [k for k, win in enumerate(windows(source, pad, flip=True)) if torch.equal(win, out)]
        assert matches, "output is not a shifted (or mirrored) crop of its source"
        flipped = matches[0] >= (2 * pad + 1) ** 2
        flips += flipped
        shifts.add(matches[0] % (2 * pad + 1) ** 2)
    assert len(shifts) > 5  # crops really vary
    assert (0 < flips < n) if hflip else flips == 0


def test_augment_default_padding_and_identity() -> None:
    ds = toy(8, size=16, hflip=False)
    mean, std = torch.zeros(1), torch.ones(1) / 255
    (x, _), *_ = iterate_batches(ds, 8, shuffle=False, augment=True, mean=mean, std=std, crop_padding=0)
    assert torch.equal(x.to(torch.uint8), ds.images)  # no padding and no flip: nothing changes
    g = torch.Generator().manual_seed(1)
    (x, _), *_ = iterate_batches(ds, 8, shuffle=False, augment=True, mean=mean, std=std, generator=g)
    assert (x == 0).any(dim=(1, 2, 3)).float().mean() > 0.5  # zero padding shows up in most crops
    with pytest.raises(ValueError):
        iterate_batches(ds, 0, shuffle=False, augment=False, mean=mean, std=std)


def test_imageset_to_and_subset() -> None:
    ds = toy(6)
    sub = ds.subset(torch.tensor([4, 1]))
    assert sub.labels.tolist() == [4, 1] and torch.equal(sub.images[0], ds.images[4]) and sub.classes == ds.classes
    moved = ds.to("cpu")
    assert moved.images.device.type == "cpu" and len(moved) == 6
    with pytest.raises(ValueError):
        ImageSet(ds.images.float(), ds.labels, ds.classes, "toy", True)


def test_check_compatible(tmp_path: Path) -> None:
    root, _, _ = fashion(tmp_path)
    ds = load_dataset("fashion-mnist", root, "test")
    check_compatible(ds, in_channels=1, num_classes=10)
    with pytest.raises(DataError, match="in_channels=3") as e:
        check_compatible(ds, in_channels=3, num_classes=10)
    assert str(root) in str(e.value)
    with pytest.raises(DataError, match="num_classes=4") as e:
        check_compatible(ds, in_channels=1, num_classes=4)
    assert str(root) in str(e.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_on_gpu() -> None:
    ds = load_dataset("synthetic").to("cuda")
    mean, std = normalization(ds)
    g = torch.Generator().manual_seed(0)
    cpu = list(iterate_batches(ds.to("cpu"), 100, shuffle=True, augment=True, mean=mean, std=std, generator=g))
    g.manual_seed(0)
    gpu = list(iterate_batches(ds, 100, shuffle=True, augment=True, mean=mean, std=std, generator=g))
    assert all(x.is_cuda and y.is_cuda for x, y in gpu)
    assert all(torch.allclose(a.cpu(), b) and torch.equal(c.cpu(), d) for (a, c), (b, d) in zip(gpu, cpu))


def test_os_pathlike_root(tmp_path: Path) -> None:
    root, _, _ = fashion(tmp_path)
    assert len(load_dataset("fashion-mnist", os.fspath(root), "test")) == 6


def test_batches_come_in_the_default_dtype():
    ds = load_dataset("synthetic", None, "train", synthetic_size=8)
    mean, std = normalization(ds)
    before = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        x, _ = next(iterate_batches(ds, 4, shuffle=False, augment=False, mean=mean, std=std))
    finally:
        torch.set_default_dtype(before)
    assert x.dtype == torch.float64
    x32, _ = next(iterate_batches(ds, 4, shuffle=False, augment=False, mean=mean, std=std))
    assert x32.dtype == torch.float32 and torch.allclose(x.float(), x32, atol=1e-6)
