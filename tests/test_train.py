"""End-to-end training on the synthetic dataset: learning, resuming, divergence, evaluation, the CLI."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import cascadenet.training.loop as T
from cascadenet import CascadeConfig
from cascadenet.cli import main
from cascadenet.evaluation.evaluate import evaluate
from cascadenet.models.checkpoint import CheckpointError, load_checkpoint, load_model
from cascadenet.training.loop import TrainConfig, TrainingError, train
from cascadenet.training.optim import lr_at, make_optimizer

MODEL_OPTIONS = {f.name for f in dataclasses.fields(CascadeConfig)} - {"arch"}


def config_of(model="resnet10", **options):
    """A TrainConfig from flat options, as on the command line (model options inlined, ``model`` = arch)."""
    arch = CascadeConfig(arch=model, **{k: options.pop(k) for k in list(options) if k in MODEL_OPTIONS})
    return TrainConfig(model=arch, **options)


def small_cfg(tmp_path, **kw):
    base = dict(model="resnet10", width=4, dataset="synthetic", synthetic_size=256, epochs=2, batch_size=32,
                lr=0.05, warmup_epochs=0.5, out=str(tmp_path), name="run", eval_batch_size=128)  # fmt: skip
    return config_of(**{**base, **kw})


def weights(run_dir):
    return load_file(str(run_dir / "model.safetensors"))


def test_lr_schedules():
    assert lr_at(0, 100, 10, "onecycle") == pytest.approx(0.1)
    assert lr_at(9, 100, 10, "onecycle") == pytest.approx(1.0)
    assert lr_at(55, 100, 10, "onecycle") == pytest.approx(0.5)
    assert lr_at(100, 100, 10, "onecycle") == 0.0
    assert lr_at(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_at(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_at(77, 100, 0, "constant") == 1.0


def test_training_learns_and_writes_a_complete_run(tmp_path):
    run = train(small_cfg(tmp_path, epochs=4, synthetic_size=512))
    assert {p.name for p in run.iterdir()} == {"config.json", "checkpoint.pt", "metrics.jsonl", "model.safetensors"}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["val_accuracy_per_step"][-1] >= 0.8  # 4 easy classes: chance is 0.25
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["loss"] == "td" and config["model"]["arch"] == "resnet10"
    assert config["model"]["num_classes"] == 4 and config["model"]["format"] == 2  # set from the dataset
    # the saved weights are the final model and rebuild without the config file
    model = load_model(run)
    assert not model.training and model.config.to_dict() == config["model"]
    assert TrainConfig.from_file(run / "config.json").model == model.config


def test_existing_run_directory_is_never_overwritten(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(TrainingError, match="already exists"):
        train(small_cfg(tmp_path))
    assert (run / "notes.txt").read_text() == "mine" and len(list(run.iterdir())) == 1


class Interrupt:
    """Raise KeyboardInterrupt at the n-th loss computation (as a Ctrl-C during a forward pass would)."""

    def __init__(self, at):
        self.at, self.calls, self.real = at, 0, T.compute_loss

    def __call__(self, *args):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.real(*args)


@pytest.mark.parametrize("interrupt_at", [5, 8, 11])  # mid-epoch 1, first batch of epoch 2, mid-epoch 2
def test_resume_after_interruption_gives_the_uninterrupted_weights(tmp_path, monkeypatch, interrupt_at):
    full = train(small_cfg(tmp_path / "a", epochs=2))  # 7 batches per epoch
    monkeypatch.setattr(T, "compute_loss", Interrupt(interrupt_at))
    with pytest.raises(KeyboardInterrupt):
        train(small_cfg(tmp_path / "b", epochs=2))
    monkeypatch.undo()
    ckpt = load_checkpoint(tmp_path / "b" / "run" / "checkpoint.pt")
    assert ckpt["step"] == interrupt_at - 1
    resumed = train(resume=tmp_path / "b" / "run")
    a, b = weights(full), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = (resumed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2]


def test_resume_from_periodic_checkpoint_after_hard_kill(tmp_path, monkeypatch):
    """A kill gives no chance to save: resuming starts from the last periodic checkpoint."""
    full = train(small_cfg(tmp_path / "a", epochs=2))

    class Killed(Exception):
        pass

    calls = {"n": 0}
    real = T.compute_loss

    def die_at_step_10(*args):
        calls["n"] += 1
        if calls["n"] == 10:
            raise Killed
        return real(*args)

    monkeypatch.setattr(T, "compute_loss", die_at_step_10)
    with pytest.raises(Killed):
        train(small_cfg(tmp_path / "b", epochs=2, checkpoint_every=3))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "b" / "run" / "checkpoint.pt")["step"] == 9
    resumed = train(resume=tmp_path / "b" / "run")
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = small_cfg(tmp_path, epochs=3)
    calls = {"n": 0}
    real = T.compute_loss

    def nan_in_epoch_2(*args):
        calls["n"] += 1
        loss = real(*args)
        return loss * math.nan if calls["n"] > 9 else loss

    snapshot = {}
    real_save = T.save_checkpoint

    def remember(path, state):
        real_save(path, state)
        snapshot["bytes"] = path.read_bytes()

    monkeypatch.setattr(T, "compute_loss", nan_in_epoch_2)
    monkeypatch.setattr(T, "save_checkpoint", remember)
    with pytest.raises(TrainingError, match="nan.*last good checkpoint"):
        train(cfg)
    run = tmp_path / "run"
    assert (run / "checkpoint.pt").read_bytes() == snapshot["bytes"]
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1
    assert not (run / "model.safetensors").exists()


def test_evaluate_writes_metrics_and_logits(tmp_path):
    run = train(small_cfg(tmp_path, epochs=3, synthetic_size=512))
    result = evaluate(run, save_logits=tmp_path / "logits.npz")
    saved = json.loads((run / "eval.json").read_text())
    assert saved == json.loads(json.dumps(result))
    T_ = load_model(run).num_steps
    assert len(result["accuracy_per_step"]) == len(result["macs_per_step"]) == T_
    assert result["accuracy_per_step"][-1] == pytest.approx(result["feedforward_accuracy"], abs=1e-9)
    assert result["macs_per_step"] == sorted(result["macs_per_step"]) and result["macs_per_step"][0] == 0
    assert result["policy_first_step"] == 1  # the stem is delayed: the policy may not stop at step 0
    assert min(result["threshold_curve"]["mean_step"]) >= 1
    data = np.load(tmp_path / "logits.npz")
    assert data["logits"].shape == (T_, result["num_examples"], 4) and data["labels"].shape == (result["num_examples"],)
    acc = (data["logits"].argmax(-1) == data["labels"]).mean(-1)
    assert np.allclose(acc, result["accuracy_per_step"])
    with pytest.raises(FileExistsError):
        evaluate(run, save_logits=tmp_path / "logits.npz")
    serial = evaluate(run, scheme="serial")
    assert (run / "eval-serial.json").is_file() and serial["scheme"] == "serial"
    assert serial["accuracy_per_step"][-1] == pytest.approx(result["accuracy_per_step"][-1])


def test_checkpoint_errors_are_clear(tmp_path):
    run = train(small_cfg(tmp_path, epochs=1))
    ckpt = run / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    (run / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="checkpoint.pt.*truncated or corrupt"):
        load_model(run)
    with pytest.raises(CheckpointError, match="no model.safetensors or checkpoint.pt"):
        load_model(tmp_path)
    other = train(small_cfg(tmp_path, epochs=1, name="other", model="resnet18"))
    state = load_file(str(other / "model.safetensors"))
    from cascadenet.models.checkpoint import build_and_load

    with pytest.raises(CheckpointError, match="do not fit a resnet10"):
        build_and_load(dataclasses.replace(load_model(run.parent / "other").config, arch="resnet10"), state, "x")


def test_cli_end_to_end(tmp_path, capsys):
    args = ["--model", "resnet10", "--width", "4", "--dataset", "synthetic", "--synthetic-size", "256",
            "--epochs", "1", "--warmup-epochs", "0.5", "--batch-size", "32", "--out", str(tmp_path),
            "--name", "cli"]  # fmt: skip
    assert main(["train", *args]) == 0
    run = tmp_path / "cli"
    assert main(["eval", str(run)]) == 0
    assert "anytime AUC" in capsys.readouterr().out
    assert main(["plot", str(run), str(run), "-o", str(tmp_path / "fig.png")]) == 0
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # replay the stored configuration under another name: the same options, the same weights
    assert main(["train", "--config", str(run / "config.json"), "--name", "replay"]) == 0
    a, b = weights(run), weights(tmp_path / "replay")
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main(["models", "resnet5*"]) == 0
    assert capsys.readouterr().out.strip() == "resnet50"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "/nonexistent/run"], "no such run directory"),
        (["train", "--dataset", "cifar10", "--data-root", "/nonexistent"], "/nonexistent"),
        (["train", "--resume", "/nonexistent/run"], "not a run directory"),
        (["train", "--config", "/nonexistent.json"], "cannot read the configuration"),
        (["plot", "/tmp", "-o", "x.png"], "run `cascadenet eval"),
        (["train", "--lam", "1.5"], "--lam must be in [0, 1]"),
        (["train", "--width", "0"], "--width must be a positive integer"),
        (["train", "--num-steps", "1", "--dataset", "synthetic"], "--num-steps 1 leaves no step"),
        (["train", "--eval-batch-size", "0", "--dataset", "synthetic"], "--eval-batch-size must be >= 1"),
        (
            ["train", "--epochs", "1", "--warmup-epochs", "1", "--dataset", "synthetic"],
            "--warmup-epochs 1.0 is not shorter than --epochs 1",
        ),
    ],
)
def test_cli_user_errors_are_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cascadenet: error:") and message in err and "\n" not in err
    assert not (tmp_path / "runs").exists()  # a failed start leaves nothing behind


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--loss", "bogus"], "--loss: invalid choice 'bogus' (choose from td, ce, final, sdn, ic-only)"),
        (["train", "--no-such-option", "1"], "unknown option --no-such-option (see cascadenet train --help)"),
        (["train", "--epochs", "1.5"], "--epochs: invalid value '1.5' (expected INT)"),
        (["eval"], "missing RUN_DIR (see cascadenet eval --help)"),
    ],
)
def test_cli_parse_errors_exit_2(argv, message, capsys):
    """Option errors found by the parser (tyro) are one line naming the option, and exit 2, as the others."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"cascadenet: error: {message}\n", err


def test_resume_refuses_option_changes(tmp_path, capsys):
    run = train(small_cfg(tmp_path, epochs=1))
    assert main(["train", "--resume", str(run), "--lr", "0.5"]) == 2
    assert "--lr" in capsys.readouterr().err


def test_demo_report_and_reuse(tmp_path, monkeypatch):
    import cascadenet.experiments.demo as demo

    tiny = dict(model="resnet10", width=4, dataset="synthetic", synthetic_size=256, batch_size=32, epochs=1,
                warmup_epochs=0.5)  # fmt: skip
    monkeypatch.setattr(
        demo,
        "DEMO_RUNS",
        {"cascaded-td": config_of(**tiny, loss="td"), "cascaded-ce": config_of(**tiny, loss="final")},
    )
    report = demo.run_demo(tmp_path / "demo", threads=None)
    text = report.read_text()
    assert "| cascaded-td |" in text and "| cascaded-ce |" in text and "anytime AUC" in text
    assert "cascadenet train --model resnet10 --width 4" in text and "--loss final" in text
    assert (tmp_path / "demo" / "speed_accuracy.png").is_file()
    before = (tmp_path / "demo" / "cascaded-td" / "model.safetensors").read_bytes()
    assert "reused" in demo.run_demo(tmp_path / "demo", threads=None).read_text()
    assert (tmp_path / "demo" / "cascaded-td" / "model.safetensors").read_bytes() == before
    # a finished run with other options is not reused under the demo's recipe, and an unfinished one is not
    # continued with it: both are refused naming the option, and nothing is changed
    with pytest.raises(ValueError, match="--epochs 1, but this would train --epochs 2"):
        demo.run_demo(tmp_path / "demo", threads=None, epochs=2)
    assert (tmp_path / "demo" / "cascaded-td" / "model.safetensors").read_bytes() == before
    (tmp_path / "demo" / "cascaded-td" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="--epochs 1, but this would train --epochs 2"):
        demo.run_demo(tmp_path / "demo", threads=None, epochs=2)


def test_weight_decay_spares_batch_norm_and_biases():
    from cascadenet import create_model

    model = create_model("resnet10", num_classes=4, width=4, temporal_affine=True)  # 2-D BN scales
    decay, other = make_optimizer(model, TrainConfig()).param_groups
    norm = {id(p) for bn in model.norms() for p in (bn.weight, bn.bias)}
    assert decay["weight_decay"] == 5e-4 and other["weight_decay"] == 0.0
    assert not any(id(p) in norm for p in decay["params"]) and all(p.ndim == 4 or p.ndim == 2 for p in decay["params"])
    assert len(decay["params"]) + len(other["params"]) == len(list(model.parameters()))
    assert {id(p) for p in other["params"]} == norm | {id(model.heads[0].bias)}


def test_cli_keeps_the_model_flags_users_know(capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--width", "--stem", "--scheme", "--delay", "--alpha", "--no-stem-delay",
                 "--temporal-bn", "--temporal-affine", "--multi-head", "--num-steps"):  # fmt: skip
        assert flag in text, flag
    assert "--num-classes" not in text and "--in-channels" not in text  # the dataset sets them
    assert main(["train", "--model", "resnet19"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown model 'resnet19'" in err and "\n" not in err


@pytest.mark.slow
def test_fashion_mnist_learns_in_part_of_an_epoch(tmp_path):
    """The real default dataset end to end (about a minute on 2 cores): slow, so kept out of `make test`."""
    from cascadenet.data.datasets import DEFAULT_ROOTS

    if not (Path(DEFAULT_ROOTS["fashion-mnist"]) / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("dataset-fashion-mnist is not installed")
    cfg = config_of(model="resnet10", width=8, stem="cifar_pool", dataset="fashion-mnist", epochs=1, max_batches=150,
                    warmup_epochs=0.2, batch_size=128, out=str(tmp_path), name="fmnist", threads=2)  # fmt: skip
    run = train(cfg)
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["val_accuracy_per_step"][-1] > 0.8 and row["val_accuracy_per_step"][2] > 0.7
