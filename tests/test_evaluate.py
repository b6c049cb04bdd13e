"""evaluate(): the splits and their file names, the cost-aware keys, the budgeted-batch curve fitted on the run's
own validation split, on the first release's fixture run (a 6-step cascade on 64 synthetic examples)."""

import json
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from cascadenet.cli import main
from cascadenet.evaluation import metrics
from cascadenet.evaluation.evaluate import eval_filename, evaluate, format_table
from cascadenet.evaluation.logits import dataset_logits
from cascadenet.models.checkpoint import load_model
from cascadenet.runs.data import split_data
from cascadenet.training.loop import TrainConfig, _load_data

FIXTURE = Path(__file__).parent / "fixtures" / "run-format1"

NEW_KEYS = ("mean_confidence_per_step", "chance_accuracy", "macs_auc", "latency_auc",
            "steps_to_50pct_accuracy", "steps_to_95pct_accuracy", "macs_to_50pct_accuracy", "macs_to_95pct_accuracy",
            "latency_to_50pct_accuracy", "latency_to_95pct_accuracy", "accuracy_at_budget",
            "budgeted_batch")  # fmt: skip


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "run-format1"
    shutil.copytree(FIXTURE, run)
    (run / "expected-eval.json").unlink()
    return run


def test_eval_filename_parts():
    assert eval_filename(None, "parallel", None) == "eval.json"
    assert eval_filename("parallel", "parallel", None, "test") == "eval.json"
    assert eval_filename("serial", "parallel", None) == "eval-serial.json"
    assert eval_filename(None, None, 20) == "eval-T20.json"
    assert eval_filename(None, None, None, "train") == "eval-train.json"
    assert eval_filename(None, None, None, "val") == "eval-val.json"
    assert eval_filename("serial", "parallel", 20, "train") == "eval-serial-T20-train.json"


def test_val_split_is_the_one_training_held_out():
    cfg = TrainConfig.from_file(FIXTURE / "config.json")
    _, trained, held_out, _, _ = _load_data(cfg)
    val, val_again = split_data(cfg, None, "val")
    assert val is val_again and torch.equal(val.images, held_out.images) and torch.equal(val.labels, held_out.labels)
    train_part, _ = split_data(cfg, None, "train")
    assert torch.equal(train_part.images, trained.images)
    test, for_fit = split_data(cfg, None, "test")
    assert torch.equal(for_fit.images, held_out.images) and len(test) == 64


def test_no_validation_split_means_no_budgeted_curve():
    cfg = types.SimpleNamespace(**{**vars(TrainConfig.from_file(FIXTURE / "config.json")), "val_fraction": 0.0})
    test, val = split_data(cfg, None, "test")
    assert val is None and len(test) == 64
    train_part, val = split_data(cfg, None, "train")
    assert val is None and len(train_part) == 64  # nothing held out: the whole training set
    with pytest.raises(ValueError, match="--split val: this run held out no validation split"):
        split_data(cfg, None, "val")


def test_new_keys_and_the_budgeted_curve_on_the_test_split(run):
    result = evaluate(run)
    saved = json.loads((run / "eval.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert all(key in saved for key in NEW_KEYS)
    acc, macs, latency = result["accuracy_per_step"], result["macs_per_step"], result["parallel_latency_blocks"]
    assert result["chance_accuracy"] == 0.25  # 4 classes
    assert result["macs_auc"] == pytest.approx(metrics.cost_auc(acc, macs, 4))
    assert result["latency_auc"] == pytest.approx(metrics.cost_auc(acc, latency, 4))
    # the model's own full cost is the default reference: the last budget holds the last exit's accuracy
    budget = result["accuracy_at_budget"]
    assert budget["reference_macs"] == macs[-1] and budget["accuracy"][-1] == acc[-1]
    assert budget["macs"] == [f * macs[-1] for f in (0.25, 0.5, 0.75, 1.0)]

    # the curve is fitted on the validation logits and measured on the test logits, never fitted on test
    cfg = TrainConfig.from_file(run / "config.json")
    stored = json.loads((run / "config.json").read_text())["normalization"]
    mean, std = torch.tensor(stored["mean"]), torch.tensor(stored["std"])
    model = load_model(run)
    val, _ = split_data(cfg, None, "val")
    test, _ = split_data(cfg, None, "test")
    val_logits = dataset_logits(model, val, mean, std)
    test_logits = dataset_logits(model, test, mean, std)
    expected = metrics.budgeted_curve(val_logits, test_logits, test.labels, macs, first_exit=1)
    budgeted = result["budgeted_batch"]
    assert budgeted["fit_split"] == "val" and len(budgeted["q"]) == 39
    assert budgeted["accuracy"] == expected["accuracy"] and budgeted["mean_macs"] == expected["mean_cost"]
    assert budgeted["mean_latency"] == pytest.approx([np.dot(f, latency) for f in expected["exit_fractions"]])
    on_test = metrics.budgeted_curve(test_logits, test_logits, test.labels, macs, first_exit=1)
    assert on_test["accuracy"] != expected["accuracy"]  # the fixture tells a test-fitted curve apart
    assert "test split" in format_table(result) and "budgeted batch (39 points" in format_table(result)


def test_other_splits_have_their_own_files(run, capsys):
    evaluate(run)
    before = (run / "eval.json").read_bytes()
    val = evaluate(run, split="val")
    train_part = evaluate(run, split="train", scheme="serial")
    assert (run / "eval.json").read_bytes() == before  # eval.json stays the test split's
    assert json.loads((run / "eval-val.json").read_text())["split"] == "val" and val["num_examples"] == 6
    assert val["budgeted_batch"] is None  # never measured on the examples it would be fitted on
    assert len(train_part["budgeted_batch"]["q"]) == 39  # fitted on val, measured on the training part
    assert json.loads((run / "eval-serial-train.json").read_text())["num_examples"] == 58
    assert train_part["split"] == "train" and train_part["scheme"] == "serial"
    assert main(["eval", str(run), "--split", "val"]) == 0
    assert "val split, 6 examples" in capsys.readouterr().out


def test_reference_macs(run, capsys):
    result = evaluate(run, reference_macs=1e9)  # far beyond this tiny model: every budget holds the last exit
    budget = result["accuracy_at_budget"]
    assert budget["reference_macs"] == 1e9 and budget["macs"] == [2.5e8, 5e8, 7.5e8, 1e9]
    assert budget["accuracy"] == [result["accuracy_per_step"][-1]] * 4
    small = evaluate(run, reference_macs=1)["accuracy_at_budget"]  # below step 1: step 0's accuracy (0 MACs)
    assert small["accuracy"] == [result["accuracy_per_step"][0]] * 4
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="--reference-macs must be a number > 0"):
            evaluate(run, reference_macs=bad)
    assert main(["eval", str(run), "--reference-macs", "0"]) == 2
    assert "--reference-macs must be a number > 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown --split 'dev'"):
        evaluate(run, split="dev")


def test_an_unreadable_training_split_leaves_the_test_evaluation_without_the_curve(run, monkeypatch):
    import cascadenet.runs.data as E
    from cascadenet.data.datasets import DataError

    real = E.load_dataset

    def no_train(name, root, split, **kw):
        if split == "train":
            raise DataError("train-images: missing")
        return real(name, root, split, **kw)

    monkeypatch.setattr(E, "load_dataset", no_train)
    with pytest.warns(UserWarning, match="no budgeted-batch curve.*train-images: missing"):
        result = evaluate(run)
    assert result["budgeted_batch"] is None and result["num_examples"] == 64
