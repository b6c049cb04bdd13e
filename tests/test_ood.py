"""Out-of-distribution detection (cascadenet.properties.ood) and training with held-out classes (--holdout-classes)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import cascadenet.training.loop as T
from cascadenet.cli import main
from cascadenet.data.datasets import kept_classes, load_dataset, split_classes
from cascadenet.evaluation.evaluate import evaluate
from cascadenet.properties.ood import (
    SCORES,
    SYNTHETIC,
    LogisticDetector,
    auroc,
    convert_images,
    fpr_at_tpr,
    last_exit_features,
    ood_run,
    roc_curve,
    settle_steps,
    trace_features,
    trace_scores,
)
from cascadenet.runs.config import TrainConfig, check_resume_overrides
from cascadenet.runs.load import load_run
from test_data import write_idx
from test_train import small_cfg

# ----------------------------------------------------------------------------------------------------------------
# AUROC and FPR at 95% TPR


def test_auroc_by_hand_with_ties():
    # pairs (in, out): (3,2) (3,0) (2,0) (1,0) win, (2,2) ties, (1,2) loses: (4 + 0.5) / 6
    assert auroc([3, 2, 1], [2, 0]) == pytest.approx(4.5 / 6)
    assert auroc([1, 1], [1, 1, 1]) == 0.5  # a constant score tells nothing
    assert auroc([5, 6], [1, 2, 3]) == 1.0 and auroc([1, 2, 3], [5, 6]) == 0.0
    assert auroc([2, 2, 3], [2]) == pytest.approx((0.5 + 0.5 + 1) / 3)


def test_fpr95_by_hand_with_ties():
    ins = np.arange(1, 21, dtype=float)  # 20 scores: accepting 95% = 19 of them needs threshold 2
    assert fpr_at_tpr(ins, [1, 2, 2, 3, 0.5]) == pytest.approx(3 / 5)  # a tie with the threshold is accepted
    assert fpr_at_tpr(ins, [1.99, 0]) == 0.0
    assert fpr_at_tpr([5, 5, 5, 5], [5, 4]) == 0.5  # the threshold must accept all four tied in-scores
    # 10 in-scores: 95% needs ceil(9.5) = 10 of them, so the threshold is the smallest in-score
    assert fpr_at_tpr(np.arange(10.0), [0, -1, 3]) == pytest.approx(2 / 3)
    assert fpr_at_tpr([3, 2, 1], [2.5, 1.5], tpr=0.5) == 0.5  # ceil(1.5) = 2 accepted: threshold 2
    with pytest.raises(ValueError, match="finite"):
        auroc([1, float("nan")], [0])
    with pytest.raises(ValueError, match="at least one"):
        fpr_at_tpr([], [1])


def brute_auroc(a, b):
    return np.mean([(x > y) + 0.5 * (x == y) for x in a for y in b])


def brute_fpr(a, b, tpr=0.95):
    ok = [t for t in np.unique(a) if np.mean(a >= t) >= tpr]  # thresholds keeping >= 95% of in-distribution
    return np.mean(b >= max(ok))


@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_a_brute_force_count(seed):
    rng = np.random.default_rng(seed)
    a = np.round(rng.normal(0.5, 1, rng.integers(1, 60)), 1)  # rounded: many ties, within and across the sets
    b = np.round(rng.normal(0, 1, rng.integers(1, 60)), 1)
    assert auroc(a, b) == pytest.approx(brute_auroc(a, b), abs=1e-12)
    assert fpr_at_tpr(a, b) == pytest.approx(brute_fpr(a, b), abs=1e-12)
    fpr, tpr = roc_curve(a, b)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    area = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)  # trapezoids: a tie is a diagonal, half credit
    assert area == pytest.approx(auroc(a, b), abs=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Trace scores


def test_settle_steps_by_hand():
    preds = np.array([[0, 0, 1], [1, 0, 1], [1, 0, 0], [1, 0, 1]])  # (S=4, N=3)
    assert settle_steps(preds).tolist() == [1, 0, 3]
    assert settle_steps(preds[:1]).tolist() == [0, 0, 0]


def planted(n, flip, seed):
    """Logits (E=6, n, C=4) whose last exit has the same confidence either way (margins from ``seed``), and whose
    prediction stays put (``flip`` false) or alternates between two classes. Exit 0 sees nothing: it predicts
    class 3, so counting it would make every trace flip."""
    g = torch.Generator().manual_seed(seed)
    margin = torch.rand(n, generator=g) * 4
    logits = torch.zeros(6, n, 4)
    logits[0, :, 3] = 5.0
    for t in range(1, 6):
        cls = (t % 2) if flip else 0
        logits[t, torch.arange(n), cls] = margin * (0.5 + 0.1 * t) if t < 5 else margin
    return logits


def test_planted_trace_feature_separates_where_msp_cannot():
    ins, outs = planted(200, flip=False, seed=0), planted(200, flip=True, seed=0)
    s_in, s_out = trace_scores(ins, first_exit=1), trace_scores(outs, first_exit=1)
    assert set(s_in) == set(SCORES) - {"learned", "learned_last"}
    assert auroc(s_in["msp"], s_out["msp"]) == 0.5  # the same last-exit confidences: no information
    assert auroc(s_in["energy"], s_out["energy"]) == 0.5  # the same last-exit logits up to the class
    assert np.allclose(s_in["energy"], torch.logsumexp(ins[-1].double(), -1).numpy())
    # the learned detector on the trace separates them; its ablation on the last exit's features cannot
    f_in, f_out = trace_features(ins, 1), trace_features(outs, 1)
    full = LogisticDetector.fit(f_in, f_out)
    last = LogisticDetector.fit(last_exit_features(f_in), last_exit_features(f_out))
    assert last_exit_features(f_in).shape == (200, 2)
    assert np.allclose(last_exit_features(f_in)[:, 0], s_in["msp"])
    assert auroc(full.score(f_in), full.score(f_out)) > 0.99
    ablated = auroc(last.score(last_exit_features(f_in)), last.score(last_exit_features(f_out)))
    assert ablated == pytest.approx(0.5, abs=0.05)
    assert auroc(s_in["flips"], s_out["flips"]) == 1.0 and fpr_at_tpr(s_in["flips"], s_out["flips"]) == 0.0
    assert auroc(s_in["settle"], s_out["settle"]) == 1.0
    assert s_in["flips"].max() == 0  # exit 0 (uninformative) is left out
    assert np.allclose(s_in["msp"], torch.softmax(ins[-1].double(), -1).amax(-1).numpy())
    # the learned detector, fitted on another draw, finds the same separation
    fit_in, fit_out = planted(100, flip=False, seed=1), planted(100, flip=True, seed=1)
    detector = LogisticDetector.fit(trace_features(fit_in, 1), trace_features(fit_out, 1))
    learned_in, learned_out = detector.score(trace_features(ins, 1)), detector.score(trace_features(outs, 1))
    assert auroc(learned_in, learned_out) == 1.0


def test_trace_features_layout():
    logits = planted(5, flip=True, seed=0)
    feats = trace_features(logits, first_exit=1)
    assert feats.shape == (5, 2 * 5 + 2)
    assert np.allclose(feats[:, 10], 1.0)  # 4 flips over 4 transitions
    assert np.all((feats[:, 5:10] >= 0) & (feats[:, 5:10] <= 1))  # entropy over log C


# ----------------------------------------------------------------------------------------------------------------
# Images of another dataset as the model sees them


def test_convert_images_channels_and_size():
    rgb = torch.tensor([[255, 0, 0], [10, 20, 30]], dtype=torch.uint8).T.reshape(1, 3, 1, 2)  # two RGB pixels
    grey = convert_images(rgb, 1, (1, 2))
    assert grey.shape == (1, 1, 1, 2) and grey.flatten().tolist() == [76, 18]  # 0.299*255; 2.99+11.74+3.42
    back = convert_images(grey, 3, (1, 2))
    assert back.shape == (1, 3, 1, 2) and all(torch.equal(back[:, c], grey[:, 0]) for c in range(3))
    # resizing is the dataset readers' (antialiased bilinear), cropping the centre of a non-square image: a
    # 8x16 image white at both ends and black in the middle, to 2x2, keeps the dark middle (squashing would not)
    ends = torch.zeros(1, 1, 8, 16, dtype=torch.uint8)
    ends[..., :4] = ends[..., 12:] = 255
    assert convert_images(ends, 1, (2, 4))[0, 0].tolist() == [[219, 32, 32, 219]] * 2  # blended edges
    assert convert_images(ends, 1, (2, 2))[0, 0].tolist() == [[32, 32]] * 2
    assert convert_images(torch.full((2, 1, 28, 28), 7, dtype=torch.uint8), 3, (16, 16)).unique().tolist() == [7]
    with pytest.raises(ValueError, match="2-channel"):
        convert_images(torch.zeros(1, 2, 4, 4, dtype=torch.uint8), 3, (4, 4))


# ----------------------------------------------------------------------------------------------------------------
# Held-out classes


def test_split_classes_renumbers_in_order():
    ds = load_dataset("synthetic", synthetic_size=40)
    kept, held = split_classes(ds, (1, 3))
    assert kept.classes == ["hstripes", "checker"] and held.classes == ds.classes
    mask = (ds.labels == 0) | (ds.labels == 2)
    assert torch.equal(kept.images, ds.images[mask]) and torch.equal(kept.labels, ds.labels[mask] // 2)
    assert torch.equal(held.images, ds.images[~mask]) and torch.equal(held.labels, ds.labels[~mask])
    assert kept_classes(10, (7, 8, 9)) == list(range(7))
    for bad, message in [((4,), r"0\.\.3"), ((0, 1, 2), "at least two"), ((1, 1), "twice")]:
        with pytest.raises(ValueError, match=message):
            split_classes(ds, bad)


def test_holdout_option_is_checked_and_stored(tmp_path):
    cfg = small_cfg(tmp_path, holdout_classes=(3, 1))
    assert cfg.holdout_classes == (1, 3)  # stored sorted: the same run however it was typed
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # JSON lists read back as tuples
    for bad, message in [((), "at least one"), ((-1,), ">= 0"), ((2, 2), "twice")]:
        with pytest.raises(ValueError, match=f"--holdout-classes.*{message}"):
            small_cfg(tmp_path, holdout_classes=bad)
    with pytest.raises(ValueError, match="--holdout-classes"):
        TrainConfig(dataset="imagefolder", stream="on", holdout_classes=(1,))
    with pytest.raises(ValueError, match="--holdout-classes cannot change"):  # part of what the run computes
        check_resume_overrides({"holdout_classes": (2,)}, cfg)
    assert check_resume_overrides({"holdout_classes": (3, 1)}, cfg) == {}  # the same classes, typed in any order
    assert check_resume_overrides({"holdout_classes": [1, 3]}, cfg) == {}
    with pytest.raises(ValueError, match=r"0\.\.3"):  # the range is the dataset's: checked when it is read
        T._load_data(small_cfg(tmp_path, holdout_classes=(4,)))


def test_holdout_training_never_sees_the_held_out_classes(tmp_path):
    cfg = small_cfg(tmp_path, synthetic_size=64, holdout_classes=(1, 3))
    full, train_set, val_set, _, _ = T._load_data(cfg)
    original = load_dataset("synthetic", synthetic_size=64, seed=cfg.seed)
    mask = (original.labels == 0) | (original.labels == 2)
    assert torch.equal(full.images, original.images[mask])  # dropped before the split
    assert len(train_set) + len(val_set) == int(mask.sum())
    assert set(train_set.labels.tolist()) | set(val_set.labels.tolist()) == {0, 1}
    assert full.classes == ["hstripes", "checker"]


@pytest.fixture(scope="module")
def holdout_run(tmp_path_factory):
    """A tiny run on the synthetic dataset with class 3 held out, trained through the command line."""
    out = tmp_path_factory.mktemp("runs")
    argv = ["train", "--dataset", "synthetic", "--synthetic-size", "48", "--image-size", "8", "--model", "resnet10",
            "--width", "4", "--epochs", "1", "--batch-size", "16", "--warmup-epochs", "0", "--schedule", "constant",
            "--recalibrate-batches", "0", "--holdout-classes", "3", "--out", str(out), "--name", "h",
            "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    return out / "h"


def test_holdout_run_stores_the_mapping_and_evaluates_kept_classes(holdout_run):
    config = json.loads((holdout_run / "config.json").read_text())
    assert config["train"]["holdout_classes"] == [3]
    assert config["label_map"] == {"kept_classes": [0, 1, 2], "held_out_classes": [3]}
    assert config["model"]["num_classes"] == 3 and config["classes"] == ["hstripes", "vstripes", "checker"]
    test = load_dataset("synthetic", None, "test", image_size=8, synthetic_size=48, seed=0)
    kept = test.labels != 3
    loaded = load_run(holdout_run, split="test", device="cpu")
    assert torch.equal(loaded.data.images, test.images[kept]) and torch.equal(loaded.data.labels, test.labels[kept])
    assert evaluate(holdout_run, device="cpu")["num_examples"] == int(kept.sum())


def test_ood_cli_round_trip(holdout_run, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["ood", str(holdout_run), "--out", str(out), "--device", "cpu"]) == 0
    result = json.loads((out / "ood.json").read_text())
    assert list(result["ood_sets"]) == ["heldout", *SYNTHETIC]  # the defaults: held-out classes and synthetic
    held = result["ood_sets"]["heldout"]
    test = load_dataset("synthetic", None, "test", image_size=8, synthetic_size=48, seed=0)
    assert held["examples"] == int((test.labels == 3).sum()) and result["in_distribution"]["examples"] == int(
        (test.labels != 3).sum()
    )
    assert set(held["scores"]) == set(SCORES) and held["detector_fit_on"][1:] == [
        f"{k} of the validation split" for k in SYNTHETIC
    ]
    assert "noise" not in " ".join(result["ood_sets"]["noise"]["detector_fit_on"])  # never fitted on what it tests
    for data in result["ood_sets"].values():
        for row in data["scores"].values():
            assert 0 <= row["auroc"] <= 1 and 0 <= row["fpr95"] <= 1
        assert len(data["per_exit"]["msp_auroc"]) == result["exits"] - result["first_exit"]
        assert data["scores"]["msp"]["auroc_minus_msp"] == 0
    assert (out / "ood.png").read_bytes()[:4] == b"\x89PNG" and "| msp (baseline) |" in (out / "ood.md").read_text()
    before = (out / "ood.json").read_bytes()
    capsys.readouterr()
    assert main(["ood", str(holdout_run), "--out", str(out), "--device", "cpu"]) == 2  # never overwrites
    err = capsys.readouterr().err
    assert "exists; pass --overwrite" in err and len(err.strip().splitlines()) == 1
    assert (out / "ood.json").read_bytes() == before
    # --overwrite replaces; --holdout alone tests only the held-out classes
    assert main(["ood", str(holdout_run), "--out", str(out), "--holdout", "--overwrite", "--device", "cpu"]) == 0
    assert list(json.loads((out / "ood.json").read_text())["ood_sets"]) == ["heldout"]


def test_ood_of_another_dataset_is_converted(holdout_run, tmp_path):
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "fm", "t10k", rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
              np.arange(6, dtype=np.uint8), gz=True)  # fmt: skip
    result = ood_run(holdout_run, ood_dataset="fashion-mnist", ood_data=tmp_path / "fm", out=tmp_path / "r",
                     device="cpu")  # fmt: skip
    data = result["ood_sets"]["dataset:fashion-mnist"]
    assert list(result["ood_sets"]) == ["dataset:fashion-mnist"] and data["examples"] == 6
    assert "1x28x28 converted to 3x8x8" in data["description"]


def test_ood_errors_are_one_line(holdout_run, tmp_path, capsys):
    plain = T.train(dataclasses.replace(small_cfg(tmp_path, synthetic_size=32, epochs=1, batch_size=16,
                                                  recalibrate_batches=0), name="plain"))  # fmt: skip
    cases = [
        (["ood", str(plain), "--holdout"], "trained on every class"),
        (["ood", str(holdout_run), "--ood-data", str(tmp_path)], "--ood-dataset"),
        (["ood", str(tmp_path / "nothing")], "not a run directory"),
        (["ood", str(holdout_run), "--ood-dataset", "cifar10", "--ood-data", str(tmp_path / "nothing")], "nothing"),
        (["ood", str(holdout_run), "--out", str(plain / "config.json")], "not a folder"),
        (["ood", str(holdout_run), "--batch-size", "0"], "--batch-size"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main([*argv, "--device", "cpu"]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (holdout_run / "ood").exists()  # nothing was written


def test_a_constant_score_is_chance():
    """A score with the same value everywhere (e.g. ``settle`` when no prediction ever changes) is chance, not a
    detector; FPR95 then accepts every OOD input."""
    zeros = np.zeros(7)
    assert auroc(zeros, np.zeros(3)) == 0.5 and fpr_at_tpr(zeros, np.zeros(3)) == 1.0
    assert math.isclose(auroc(np.r_[zeros, 1], np.zeros(3)), (7 * 0.5 + 1) / 8)
