"""One source of truth for a model's options: CascadeConfig, its stored form, and run directories written by
the first release (format 1: tests/fixtures/run-format1, produced by that code before the configuration changed)."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cascadenet as cn
from cascadenet.cli import main
from cascadenet.evaluation.evaluate import evaluate
from cascadenet.models.checkpoint import CheckpointError, load_checkpoint, save_weights
from cascadenet.models.registry import config_from_dict
from cascadenet.training.loop import TrainConfig, train

FIXTURE = Path(__file__).parent / "fixtures" / "run-format1"


def test_model_is_built_from_its_config_and_keeps_it():
    config = cn.CascadeConfig(arch="resnet10", num_classes=7, width=4, multi_head=True)
    model = cn.CascadedResNet(config)
    assert model.config is config and model.num_classes == 7 and len(model.heads) == model.num_steps
    assert cn.create_model("resnet10", num_classes=7, width=4, multi_head=True).config == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.width = 8  # type: ignore[misc]
    with pytest.raises(TypeError, match="CascadeConfig"):
        cn.CascadedResNet({"arch": "resnet10"})  # type: ignore[arg-type]


def test_config_round_trips_through_its_stored_form():
    config = cn.CascadeConfig(arch="resnet34", num_classes=3, in_channels=1, width=8, delay="ews", alpha=0.25,
                              scheme="serial", stem="imagenet", num_steps=12)  # fmt: skip
    stored = json.loads(json.dumps(config.to_dict()))
    assert stored["format"] == 2 and stored["family"] == "cascaded-resnet"
    assert config_from_dict(stored) == config


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"format": 2, "family": "cascaded-resnet", "arch": "resnet10", "depth": 3}, "unknown to the cascaded-resnet"),
        ({"format": 9, "family": "cascaded-resnet"}, "format 9"),
        ({"format": 2, "family": "cascaded-resnet", "arch": "resnet10", "stem": "tiny"}, "valid choices"),
        ({"num_classes": 10}, "name"),
        ([1, 2], "dict"),
    ],
)
def test_bad_stored_configs_are_refused_clearly(raw, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(raw)


def test_a_model_not_built_by_create_model_saves_and_loads(tmp_path):
    model = cn.CascadedResNet(cn.CascadeConfig(arch="resnet10", num_classes=3, width=4))
    save_weights(tmp_path / "m.safetensors", model)
    loaded = cn.load_model(tmp_path / "m.safetensors")
    assert loaded.config == model.config
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(ValueError, match="ModelConfig"):
        save_weights(tmp_path / "x.safetensors", torch.nn.Linear(2, 2))


def test_package_top_level_exports():
    assert cn.td_loss is cn.training.losses.td_loss and cn.load_model is cn.deployment.loading.load_model
    assert cn.CascadeConfig is cn.models.cascade.CascadeConfig


def test_train_config_nests_the_model_config_and_reads_the_first_release_form():
    stored = json.loads((FIXTURE / "config.json").read_text())["train"]
    assert stored["model"] == "resnet10"  # the flat form of format 1
    cfg = TrainConfig.from_dict(stored)
    assert cfg.model == cn.CascadeConfig(arch="resnet10", width=2, multi_head=True)
    assert cfg.epochs == 1 and cfg.max_batches == 2 and cfg.dataset == "synthetic"
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown configuration keys: bogus"):
        TrainConfig.from_dict({**stored, "bogus": 1})


def copy_fixture(tmp_path) -> Path:
    run = tmp_path / "run-format1"
    shutil.copytree(FIXTURE, run)
    return run


def test_first_release_run_directory_loads_and_evaluates_to_the_same_numbers(tmp_path):
    run = copy_fixture(tmp_path)
    model = cn.load_model(run)  # model.safetensors with a format-1 configuration
    assert model.config == cn.CascadeConfig(arch="resnet10", num_classes=4, width=2, multi_head=True, num_steps=6)
    from_ckpt = cn.load_model(run / "checkpoint.pt")  # checkpoint format 1
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), from_ckpt.state_dict().values()))
    expected = json.loads((run / "expected-eval.json").read_text())
    result = evaluate(run)
    for key in ("accuracy_per_step", "anytime_auc", "threshold_curve", "threshold_auc", "feedforward_accuracy",
                "macs_per_step", "macs_feedforward", "num_examples"):  # fmt: skip
        assert result[key] == expected[key], key
    # the one definition that changed since: a stem-delayed step t is t units of parallel latency (the first
    # release said t + 1, charging a unit to the constant step 0)
    assert result["parallel_latency_blocks"] == [t - 1 for t in expected["parallel_latency_blocks"]]


def test_first_release_run_directory_resumes_and_replays(tmp_path, capsys):
    run = copy_fixture(tmp_path)
    final = load_file(str(run / "model.safetensors"))
    (run / "model.safetensors").unlink()
    assert load_checkpoint(run / "checkpoint.pt")["format"] == 1
    train(resume=run, overrides={"progress": False})  # the checkpoint is at the end: only the weights are written
    resumed = load_file(str(run / "model.safetensors"))
    assert final.keys() == resumed.keys() and all(torch.equal(final[k], resumed[k]) for k in final)
    stored = json.loads((run / "config.json").read_text())
    assert stored["train"]["model"]["format"] == 2  # rewritten in the current form
    # replaying the first release's config.json from the command line gives the same run
    assert main(["train", "--config", str(FIXTURE / "config.json"), "--out", str(tmp_path), "--name", "replay"]) == 0
    replay = load_file(str(tmp_path / "replay" / "model.safetensors"))
    replayed = TrainConfig.from_file(tmp_path / "replay" / "config.json")
    original = TrainConfig.from_file(FIXTURE / "config.json")
    # the thread count the run computed with is stored (the first release stored None: PyTorch's choice)
    assert original.threads is None and replayed.threads == torch.get_num_threads()
    assert replayed.options() == {
        **original.options(),
        "out": str(tmp_path),
        "name": "replay",
        "threads": torch.get_num_threads(),
    }
    # the same computation; bit-equality would also need the thread count and CPU the fixture was made with
    assert all(torch.allclose(final[k], replay[k], rtol=1e-3, atol=1e-4) for k in final)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    run = copy_fixture(tmp_path)
    ckpt = load_checkpoint(run / "checkpoint.pt")
    from cascadenet.models.checkpoint import build_and_load

    with pytest.raises(CheckpointError, match="do not fit a resnet18"):
        build_and_load({**ckpt["model_config"], "name": "resnet18"}, ckpt["model"], "x")


def test_the_default_warm_up_fits_a_one_epoch_run(tmp_path):
    """`cascadenet train --epochs 1` is the first thing a new user types: the default warm-up (one epoch, or a
    fifth of a shorter run) lets it train, and its learning rate warms up and decays within the epoch."""
    assert TrainConfig(epochs=30).warmup() == 1.0 and TrainConfig(epochs=5).warmup() == 1.0
    assert TrainConfig(epochs=1).warmup() == pytest.approx(0.2) and TrainConfig(epochs=2).warmup() == 0.4
    assert TrainConfig(epochs=1, warmup_epochs=0.5).warmup() == 0.5  # an explicit value is kept
    with pytest.raises(ValueError, match="--warmup-epochs 1.0 is not shorter than --epochs 1"):
        TrainConfig(epochs=1, warmup_epochs=1.0)
    assert TrainConfig.from_dict({"warmup_epochs": 1.0}).warmup_epochs == 1.0  # stored runs keep what they ran
    from cascadenet.cli import main

    argv = ["train", "--dataset", "synthetic", "--synthetic-size", "64", "--model", "resnet10", "--width", "2",
            "--epochs", "1", "--batch-size", "16", "--out", str(tmp_path), "--name", "one"]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1] and rows[0]["lr"] == 0.0  # one-cycle decayed to 0 by the end
