"""Streaming image folders through DataLoader workers: transforms, determinism, sharding, resume, training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cascadenet.data import streaming
from cascadenet.training.loop import TrainConfig, train
from test_train import config_of


def make_folder(root, per_class=12, classes=("a", "b", "c"), size=(80, 60), seed=0):
    """JPEG and PNG images of mixed sizes: class c is brighter in channel c (learnable, and any crop keeps it)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", 4)):
        for k, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                w, h = size[0] + 8 * (i % 3), size[1] + 4 * (i % 2)
                img = rng.integers(0, 100, (h, w, 3), dtype=np.uint8)
                img[..., k] += 120
                ext = "jpg" if i % 2 else "png"
                Image.fromarray(img).save(d / f"{i}.{ext}")
    return root


def test_transforms_are_the_imagenet_ones_and_deterministic(tmp_path):
    make_folder(tmp_path)
    index = streaming.index_folder(tmp_path, "train", 32)
    assert len(index) == 36 and index.classes == ["a", "b", "c"] and index.shape == [3, 32, 32]
    path = index.files[1]
    a = streaming.load_transformed(path, 32, True, seed=5)
    assert a.shape == (3, 32, 32) and a.dtype == np.uint8
    assert np.array_equal(a, streaming.load_transformed(path, 32, True, seed=5))  # the seed decides every draw
    assert not np.array_equal(a, streaming.load_transformed(path, 32, True, seed=6))
    # evaluation: the centre crop of 87.5% of the shorter side, resized (no randomness)
    with Image.open(path) as im:
        w, h = im.size
        side = min(w, h) * 0.875
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        expected = np.asarray(im.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR, box=box)).transpose(2, 0, 1)
    assert np.array_equal(streaming.load_transformed(path, 32, False, seed=1), expected)
    # random resized crops stay inside the image, with area and ratio in the standard ranges
    import random

    rng = random.Random(0)
    for _ in range(200):
        left, top, right, bottom = streaming._random_resized_crop(80, 60, rng)
        assert 0 <= left < right <= 80 and 0 <= top < bottom <= 60
        assert (right - left) * (bottom - top) >= 0.08 * 80 * 60 * 0.9


def test_stream_batches_shard_resume_and_workers(tmp_path):
    make_folder(tmp_path)
    index = streaming.index_folder(tmp_path, "train", 24)
    mean, std = streaming.streaming_normalization()

    def epoch(batch, shard=(0, 1), start=0, workers=0):
        g = torch.Generator().manual_seed(3)
        return list(streaming.stream_batches(index, batch, train=True, shuffle=True, mean=mean, std=std,
                                             device=torch.device("cpu"), generator=g, drop_last=True, shard=shard,
                                             start=start, workers=workers))  # fmt: skip

    whole = epoch(12)
    assert len(whole) == 3 and whole[0][0].shape == (12, 3, 24, 24) and whole[0][0].dtype == torch.float32
    assert torch.equal(torch.cat([y for _, y in whole]).sort().values, index.labels.sort().values)  # the epoch
    with_workers = epoch(12, workers=2)
    for (x, y), (xw, yw) in zip(whole, with_workers):  # workers change nothing
        assert torch.equal(x, xw) and torch.equal(y, yw)
    parts = [epoch(6, shard=(r, 2)) for r in (0, 1)]
    for i, (x, y) in enumerate(whole):  # two processes: disjoint halves of each global batch
        assert torch.equal(torch.cat([parts[0][i][0], parts[1][i][0]]), x)
        assert torch.equal(torch.cat([parts[0][i][1], parts[1][i][1]]), y)
    resumed = epoch(12, start=2)  # a resumed epoch: the same remaining batches
    assert len(resumed) == 1 and torch.equal(resumed[0][0], whole[2][0])


def test_training_streams_above_the_threshold_and_resumes(tmp_path, monkeypatch, caplog):
    root = make_folder(tmp_path / "data")
    base = dict(model="resnet10", width=4, dataset="imagefolder", data_root=str(root), image_size=24, epochs=2,
                batch_size=8, lr=0.05, warmup_epochs=0.5, out=str(tmp_path / "runs"), workers=0, val_fraction=0.25,
                eval_batch_size=16)  # fmt: skip
    with caplog.at_level("INFO", logger="cascadenet"):
        run = train(config_of(**base, name="auto", stream_above_gb=1e-6))  # 1 KiB: this folder is "too large"
    assert "streaming them" in caplog.text
    stored = json.loads((run / "config.json").read_text())
    assert stored["train"]["stream"] == "on"  # the choice is part of the run
    assert stored["data"] == {"examples": 36, "shape": [3, 24, 24], "classes": 3}
    assert stored["normalization"]["mean"] == pytest.approx(list(streaming.IMAGENET_MEAN))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and len(rows[-1]["val_accuracy_per_step"]) == 6

    # in memory below the threshold; --stream on/off force it
    small = train(config_of(**base, name="small"))
    assert json.loads((small / "config.json").read_text())["train"]["stream"] == "off"

    # interrupted mid-epoch and resumed: the weights of the uninterrupted run (epoch order and crops replayed)
    import cascadenet.training.loop as T

    real, calls = T.compute_loss, [0]

    def interrupt(*args):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(T, "compute_loss", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(config_of(**base, name="cut", stream="on"))
    monkeypatch.setattr(T, "compute_loss", real)
    cut = train(resume=tmp_path / "runs" / "cut")
    from safetensors.torch import load_file

    a, b = load_file(str(run / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(ValueError, match="--stream cannot change"):
        train(resume=cut, overrides={"stream": "off"})


def test_stream_on_needs_an_image_folder():
    with pytest.raises(ValueError, match="only image folders stream"):
        TrainConfig(dataset="synthetic", stream="on")


def make_gray_folder(root, per_class=8, classes=("a", "b"), seed=0):
    """Grayscale PNGs (8-bit, and a 16-bit one per class) and JPEGs: class k brighter."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", 4)):
        for k, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 100, (60 + 4 * (i % 2), 80), dtype=np.uint8) + 120 * k
                if i == 0:
                    Image.fromarray(img.astype(np.uint16) * 257).save(d / f"{i}.png")  # 16-bit gray
                else:
                    Image.fromarray(img).save(d / f"{i}.{'jpg' if i % 2 else 'png'}")
    return root


def test_streamed_folders_read_grayscale_as_folders_in_memory_do(tmp_path):
    from cascadenet.data.datasets import load_dataset

    root = make_gray_folder(tmp_path / "gray")
    index = streaming.index_folder(root, "train", 32)  # every image grayscale: one channel
    assert index.num_channels == 1 and index.shape == [1, 32, 32] and index.subset(torch.arange(3)).channels == 1
    for path in index.files[:3]:  # a 16-bit PNG, a JPEG, an 8-bit PNG
        with Image.open(path) as im:
            w, h = im.size
            side = min(w, h) * 0.875
            box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
            gray = im.convert("L") if im.mode == "L" else Image.fromarray((np.asarray(im) // 257).astype(np.uint8))
            expected = np.asarray(gray.resize((32, 32), Image.Resampling.BILINEAR, box=box))[None]
        got = streaming.load_transformed(path, 32, False, seed=0, channels=1)
        assert got.shape == (1, 32, 32) and np.abs(got.astype(int) - expected).max() <= 1, path
        assert streaming.load_transformed(path, 32, True, seed=3, channels=1).shape == (1, 32, 32)
    # the same images in memory: one channel too, the 16-bit one scaled to 8 bits the same way
    memory = load_dataset("imagefolder", root, image_size=32)
    assert memory.images.shape[1] == 1
    # RGB asked for: three equal channels; a colour folder asked for gray: its luminance
    rgb = streaming.index_folder(root, "train", 32, grayscale=False)
    x = streaming.load_transformed(rgb.files[1], 32, False, seed=0, channels=rgb.channels)
    assert rgb.channels == 3 and x.shape == (3, 32, 32) and (x == x[:1]).all()
    colour = make_folder(tmp_path / "colour")
    assert streaming.index_folder(colour, "train", 32).channels == 3
    as_gray = streaming.index_folder(colour, "train", 32, grayscale=True)
    with Image.open(as_gray.files[0]) as im:
        w, h = im.size
        side = min(w, h) * 0.875
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        expected = np.asarray(im.convert("L").resize((32, 32), Image.Resampling.BILINEAR, box=box))[None]
    assert np.array_equal(streaming.load_transformed(as_gray.files[0], 32, False, 0, as_gray.channels), expected)
    # one colour image among grayscale ones: RGB, as in memory
    Image.fromarray(np.full((60, 80, 3), [200, 0, 0], dtype=np.uint8)).save(root / "train" / "b" / "z.png")
    assert streaming.index_folder(root, "train", 32).channels == 3
    assert load_dataset("imagefolder", root, image_size=32).images.shape[1] == 3
    # batches: one channel, normalised with the mean of ImageNet's statistics
    mean, std = streaming.streaming_normalization(1)
    assert mean.tolist() == pytest.approx([0.449], abs=1e-3) and std.tolist() == pytest.approx([0.226], abs=1e-3)
    x, y = next(streaming.stream_batches(index, 4, train=True, shuffle=True, mean=mean, std=std,
                                         device=torch.device("cpu"), generator=torch.Generator().manual_seed(0),
                                         workers=0))  # fmt: skip
    assert x.shape == (4, 1, 32, 32) and x.dtype == torch.float32


def test_training_on_a_streamed_grayscale_folder_has_one_channel(tmp_path):
    root = make_gray_folder(tmp_path / "data")
    base = dict(model="resnet10", width=4, dataset="imagefolder", data_root=str(root), image_size=24, epochs=1,
                batch_size=8, lr=0.05, warmup_epochs=0.5, out=str(tmp_path / "runs"), workers=0, val_fraction=0.25,
                eval_batch_size=16)  # fmt: skip
    streamed = train(config_of(**base, name="streamed", stream="on"))
    in_memory = train(config_of(**base, name="memory", stream="off"))
    a, b = (json.loads((r / "config.json").read_text()) for r in (streamed, in_memory))
    assert a["data"]["shape"] == b["data"]["shape"] == [1, 24, 24]
    assert a["model"]["in_channels"] == b["model"]["in_channels"] == 1
    assert a["normalization"]["mean"] == pytest.approx([0.449], abs=1e-3)
    from cascadenet.evaluation.evaluate import evaluate

    assert evaluate(streamed)["num_examples"] == 8  # the val folder, read as the run read its images
