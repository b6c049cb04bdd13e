"""Experiment tracking (``--log``), the best-validation weights and early stopping (``training/tracking.py``)."""

import csv
import importlib.util
import json

import pytest

import cascadenet.training.loop as T
from cascadenet import CascadeConfig
from cascadenet.cli import main
from cascadenet.models.checkpoint import read_metadata
from cascadenet.training import tracking
from cascadenet.training.loop import TrainConfig, train
from cascadenet.training.optim import lr_at


def cfg(tmp_path, **kw):
    base = dict(model=CascadeConfig(arch="resnet10", width=4), dataset="synthetic", synthetic_size=256, epochs=2,
                batch_size=32, lr=0.05, warmup_epochs=0.5, out=str(tmp_path), name="run", threads=1)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_logs_every_step_and_every_epoch(tmp_path):
    run = train(cfg(tmp_path, log="csv"))  # 7 steps per epoch
    steps = read(run / "train_log.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, 15))
    assert [int(r["epoch"]) for r in steps] == [1] * 7 + [2] * 7
    total, warmup = 14, round(0.5 * 7)
    assert [float(r["lr"]) for r in steps] == pytest.approx(
        [0.05 * lr_at(i, total, warmup, "onecycle") for i in range(14)]
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    mean = sum(float(r["loss"]) for r in steps[:7]) / 7
    assert mean == pytest.approx(rows[0]["train_loss"], rel=1e-5)
    val = read(run / "val_log.csv")
    assert [int(r["epoch"]) for r in val] == [1, 2]
    for r, m in zip(val, rows):
        assert float(r["val_anytime_auc"]) == pytest.approx(m["val_anytime_auc"])
        acc = [float(r[f"val_accuracy_exit_{k}"]) for k in range(len(m["val_accuracy_per_step"]))]
        assert acc == pytest.approx(m["val_accuracy_per_step"])
    assert not (run / tracking.BEST).exists()  # only with --keep-best or --early-stop


def test_a_resumed_run_logs_every_step_once(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = T.compute_loss

    def interrupt(*args):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(T, "compute_loss", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path, log="csv"))
    monkeypatch.undo()
    run = train(resume=tmp_path / "run")
    assert [int(r["step"]) for r in read(run / "train_log.csv")] == list(range(1, 15))
    assert [int(r["epoch"]) for r in read(run / "val_log.csv")] == [1, 2]


def test_early_stop_keeps_the_best_weights(tmp_path, monkeypatch):
    aucs = iter([0.5, 0.7, 0.6, 0.65, 0.9, 0.9])  # best at epoch 2; patience 2 ends the run after epoch 4
    real = T._validate

    def validate(s, done):
        row = real(s, done)
        return {**row, "val_anytime_auc": next(aucs)}

    monkeypatch.setattr(T, "_validate", validate)
    run = train(cfg(tmp_path, epochs=6, early_stop=2))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert read_metadata(run / tracking.BEST)["epoch"] == 2
    assert read_metadata(run / "model.safetensors")["stopped_early_after"] == 4
    assert train(resume=run) == run  # finished: a resume does nothing more
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4


def test_stopping_rules():
    rows = [{"epoch": e, "val_anytime_auc": a} for e, a in enumerate([0.3, 0.5, 0.5, 0.4], start=1)]
    assert tracking.best_epoch(rows) == 2
    assert tracking.stopped_early(rows, 2) and not tracking.stopped_early(rows, 3)
    assert not tracking.stopped_early(rows, None) and not tracking.stopped_early([], 1)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--log", "wandb"], "unknown --log 'wandb'"),
        (["--early-stop", "0"], "--early-stop must be >= 1"),
    ],
)
def test_bad_tracking_options_are_one_line(tmp_path, capsys, flags, message):
    line = ["train", "--dataset", "synthetic", "--synthetic-size", "64", "--batch-size", "16", "--epochs", "1",
            "--out", str(tmp_path / "runs"), "--width", "4", *flags]  # fmt: skip
    assert main(line) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cascadenet: error:") and message in err and "\n" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_without_its_package_is_one_line(tmp_path, capsys):
    line = ["train", "--dataset", "synthetic", "--synthetic-size", "64", "--batch-size", "16", "--epochs", "1",
            "--out", str(tmp_path / "runs"), "--width", "4", "--log", "csv,tensorboard"]  # fmt: skip
    assert main(line) == 2
    err = capsys.readouterr().err.strip()
    assert "--log tensorboard needs the tensorboard package" in err and "\n" not in err
    assert not any((tmp_path / "runs").rglob("*.json"))  # nothing of the run was kept


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs tensorboard")
def test_tensorboard_logs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(cfg(tmp_path, log="csv,tensorboard", epochs=1))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "val/anytime_auc", "val/accuracy_exit_0"} <= set(tags)
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx([float(r["loss"]) for r in read(run / "train_log.csv")], rel=1e-6)
