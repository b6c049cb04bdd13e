"""Property tests: random bytes and random shapes thrown at every reader of user files (dataset loaders,
checkpoints, weights, config files). Whatever comes in, only the project's own error types come out (each a
one-line message naming the file), never a traceback of numpy, pickle, PIL, torch or safetensors."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save

from cascadenet import CascadeConfig
from cascadenet.data.datasets import DataError, load_dataset
from cascadenet.models.checkpoint import CheckpointError, load_checkpoint, load_model
from cascadenet.training.loop import ConfigError, TrainConfig

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
OURS = (DataError, CheckpointError, ConfigError)

blobs = st.binary(max_size=600)
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def one_line(error: BaseException) -> None:
    assert isinstance(error, OURS), f"{type(error).__name__}: {error}"
    assert "\n" not in str(error).strip()


def expect_ours(call) -> None:
    try:
        call()
    except Exception as e:  # noqa: BLE001 - the property: whatever is raised is ours
        one_line(e)


def idx(dims: tuple[int, ...], payload: bytes) -> bytes:
    return bytes([0, 0, 0x08, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + payload


@FUZZ
@given(images=blobs | st.tuples(shapes, blobs).map(lambda t: idx(*t)), labels=blobs, gz=st.booleans())
def test_fashion_mnist_reader(tmp_path, images, labels, gz):
    root = fresh(tmp_path / "f")
    for name, data in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        (root / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz and len(data) % 3 else data)
    expect_ours(lambda: load_dataset("fashion-mnist", root, "train"))


pickled = st.one_of(
    blobs,
    json_values.map(lambda v: pickle.dumps(v, protocol=2)),
    st.tuples(shapes, st.sampled_from(["uint8", "float32", "int64"]), json_values).map(
        lambda t: pickle.dumps({b"data": np.zeros(t[0], t[1]), b"labels": t[2], b"label_names": t[2]}, protocol=2)
    ),
)


@FUZZ
@given(meta=pickled, batch=pickled)
def test_cifar_reader(tmp_path, meta, batch):
    base = fresh(tmp_path / "c") / "cifar-10-batches-py"
    base.mkdir()
    (base / "batches.meta").write_bytes(meta)
    (base / "test_batch").write_bytes(batch)
    expect_ours(lambda: load_dataset("cifar10", tmp_path / "c", "test"))


def png(shape: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((*shape, 3), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@FUZZ
@given(
    files=st.lists(blobs | st.tuples(st.integers(1, 6), st.integers(1, 6)).map(png), min_size=1, max_size=3),
    annotations=st.text(max_size=80),
)
def test_image_folder_reader(tmp_path, files, annotations):
    root = fresh(tmp_path / "i")
    for i, data in enumerate(files):
        folder = root / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(data)
    val = root / "val"
    (val / "images").mkdir(parents=True)
    (val / "images" / "0.png").write_bytes(files[0])
    (val / "val_annotations.txt").write_text(annotations)
    expect_ours(lambda: load_dataset("imagefolder", root, "train"))
    expect_ours(lambda: load_dataset("imagefolder", root, "test"))


def model_config(**changes) -> dict:
    return CascadeConfig(arch="resnet10", width=2, num_classes=3, **changes).to_dict()


state_dicts = st.dictionaries(
    st.sampled_from(["stem.conv.weight", "heads.0.weight", "heads.0.bias", "x"]),
    shapes.map(lambda s: torch.zeros(s)),
    max_size=3,
)
configs = st.one_of(st.just(model_config()), json_values, st.dictionaries(st.sampled_from(list(model_config())),
                                                                          json_values, max_size=4))  # fmt: skip


@FUZZ
@given(
    data=st.one_of(
        blobs,
        st.tuples(configs, state_dicts).map(
            lambda t: _saved({"format": 2, "model_config": t[0], "model": t[1], "epoch": 0})
        ),
        json_values.map(lambda v: _saved({"format": 2, "model_config": v, "model": v})),
    )
)
def test_checkpoint_reader(tmp_path, data):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(data)
    expect_ours(lambda: load_checkpoint(path))
    expect_ours(lambda: load_model(path))


def _saved(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


@FUZZ
@given(
    data=st.one_of(
        blobs,
        st.tuples(configs, state_dicts).map(
            lambda t: save({k: v.contiguous() for k, v in t[1].items()}, metadata={"model_config": json.dumps(t[0])})
        ),
        st.dictionaries(st.text(max_size=8), st.text(max_size=20), max_size=3).map(
            lambda m: save({"a": torch.zeros(2)}, metadata=m)
        ),
    )
)
def test_weights_reader(tmp_path, data):
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    expect_ours(lambda: load_model(path))


keys = st.sampled_from([f.name for f in __import__("dataclasses").fields(TrainConfig)] + ["train", "bogus"])


@FUZZ
@given(
    data=st.one_of(
        blobs,
        json_values.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(keys, json_values, max_size=4).map(lambda d: json.dumps(d).encode()),
        st.dictionaries(keys, json_values, max_size=4).map(lambda d: json.dumps({"train": d}).encode()),
    )
)
def test_config_reader(tmp_path, data):
    path = tmp_path / "config.json"
    path.write_bytes(data)
    try:
        TrainConfig.from_file(path)
    except Exception as e:  # noqa: BLE001
        assert isinstance(e, ConfigError), f"{type(e).__name__}: {e}"
        assert "\n" not in str(e) and str(e).startswith(str(path))


@pytest.mark.parametrize("name", ["checkpoint.pt", "model.safetensors", "config.json"])
def test_empty_files(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    reader = TrainConfig.from_file if name == "config.json" else load_model
    with pytest.raises(OURS):
        reader(tmp_path / name)


# ---- issue 21: every other file a verb reads ------------------------------------------------------------------


def _npz_bytes(arrays: dict) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@FUZZ
@given(data=st.one_of(blobs, st.builds(lambda cut: _npz_bytes({"scores": np.arange(8.0)})[:cut],
                                       st.integers(0, 400))),  # fmt: skip
       suffix=st.sampled_from([".npz", ".npy"]))  # fmt: skip
def test_score_files(tmp_path, data, suffix):
    from cascadenet.properties.typicality import read_scores

    path = tmp_path / f"s{suffix}"
    path.write_bytes(data)
    try:
        read_scores(path, 8)
    except ValueError as e:  # the reader's one error type, naming the flag and the file
        assert str(e).startswith(f"--scores {path}") and "\n" not in str(e)


@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.lists(json_values, max_size=4).map(
    lambda rows: "\n".join(json.dumps(r) for r in rows))))  # fmt: skip
def test_metrics_of_a_reused_run(tmp_path, text):
    from cascadenet.experiments.reproduce import _last_row, _train_seconds

    run = fresh(tmp_path / "run")
    (run / "metrics.jsonl").write_text(text)
    for read in (_last_row, _train_seconds):
        try:
            read(run)
        except ValueError as e:
            assert str(e).startswith(str(run / "metrics.jsonl")) and "\n" not in str(e)


@FUZZ
@given(epoch=st.one_of(st.integers(-(2**62), 2**62), st.floats(), st.none(), st.booleans()),
       batch=st.one_of(st.integers(-(2**62), 2**62), st.floats(), st.none()),
       step=st.one_of(st.integers(-(2**62), 2**62), st.none()))  # fmt: skip
def test_checkpoint_position_fields(epoch, batch, step):
    from types import SimpleNamespace

    from cascadenet.training.session import _check_position

    s = SimpleNamespace(per_epoch=5, cfg=SimpleNamespace(epochs=3))
    ckpt = {"epoch": epoch, "batch": batch, "step": step}
    s.epoch, s.batch_done, s.step = (v if isinstance(v, int) else 0 for v in (epoch, batch, step))
    inside = all(isinstance(v, int) and not isinstance(v, bool) for v in (epoch, batch, step)) and (
        0 <= epoch <= 3 and 0 <= batch <= 5 and 0 <= step <= 15
    )
    try:
        _check_position(s, ckpt, Path("checkpoint.pt"))
        assert inside
    except CheckpointError as e:
        assert not inside and "damaged training position" in str(e)


@FUZZ
@given(key=st.sampled_from(["epochs", "batch_size", "lr", "threads", "seed", "width", "num_steps", "lam",
                            "warmup_epochs", "synthetic_size", "image_size", "name"]),
       value=st.one_of(st.integers(-(2**63), 2**63), st.floats(), st.text(max_size=12), st.none()))  # fmt: skip
def test_config_values_at_their_extremes(tmp_path, key, value):
    cfg = TrainConfig(dataset="synthetic").to_dict()
    if key in ("width", "num_steps"):
        cfg["model"][key] = value
    else:
        cfg[key] = value
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"train": cfg}))
    expect_ours(lambda: TrainConfig.from_file(path))
