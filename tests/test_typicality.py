"""cascadenet typicality: the consistency estimator, rank statistics, binning, score files, the cache, the CLI."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cascadenet.cli import main
from cascadenet.data.datasets import ImageSet, load_dataset
from cascadenet.data.loader import train_val_indices, train_val_split
from cascadenet.evaluation.logits import dataset_logits
from cascadenet.properties.typicality import (
    EstimatorOptions,
    average_ranks,
    bin_analysis,
    cached_consistency_scores,
    consistency_scores,
    quantile_bins,
    read_scores,
    settle_steps,
    spearman,
)
from cascadenet.runs.load import load_run

FIXTURE = Path(__file__).parent / "fixtures" / "run-format1"
FAST = EstimatorOptions(folds=2, repeats=1, epochs=1)


def blobs(n, planted=(), seed=0):
    """Four classes, each a bright patch in its own quadrant of a 1x8x8 image plus noise; the examples at
    ``planted`` carry the next class's label (mislabelled: atypical for the label they carry)."""
    g = torch.Generator().manual_seed(seed)
    true = torch.arange(n) % 4
    x = torch.rand(n, 1, 8, 8, generator=g) * 60
    for c in range(4):
        r, q = divmod(c, 2)
        x[true == c, :, 4 * r : 4 * r + 4, 4 * q : 4 * q + 4] += 180
    labels = true.clone()
    planted = torch.as_tensor(list(planted), dtype=torch.long)
    labels[planted] = (true[planted] + 1) % 4
    return ImageSet(x.clamp(0, 255).to(torch.uint8), labels, ["a", "b", "c", "d"], "synthetic", hflip=False)


def test_consistency_estimator_puts_the_planted_atypical_examples_lowest():
    planted = [3, 17, 40, 58, 77, 91, 120, 150]
    pool = blobs(160, planted)
    extra = blobs(40, planted=[5, 6], seed=1)  # outside the pool: scored by every model
    options = EstimatorOptions(folds=4, repeats=2, epochs=6, batch_size=32, lr=1e-2)
    out = consistency_scores(pool, options, extra=extra)
    score, prob = out["score"], out["probability"]
    assert score.shape == prob.shape == (160,)
    bins = quantile_bins(score, 5, prob)
    assert set(bins[planted].tolist()) == {0}  # every planted example in the least typical fifth
    others = np.setdiff1d(np.arange(160), planted)
    assert score[planted].max() < score[others].min() or score[planted].max() <= 0.5
    assert prob[planted].max() < np.sort(prob[others])[0]  # each below every clean example
    assert score[others].mean() > 0.9
    # the extra examples: every one of the 8 models scores them, a multiple of 1/8
    assert np.allclose(out["extra_score"] * 8, np.round(out["extra_score"] * 8))
    assert out["extra_score"][[5, 6]].max() < out["extra_score"][np.r_[0:5, 7:40]].min()
    # seeded: the same options give the same scores
    again = consistency_scores(pool, options, extra=extra)
    assert np.array_equal(again["score"], score) and np.allclose(again["probability"], prob)


def test_spearman_with_ties_matches_a_hand_computation():
    x, y = [1, 2, 2, 3, 5], [2, 1, 4, 4, 3]
    # ranks by hand: x -> 1, 2.5, 2.5, 4, 5 and y -> 2, 1, 4.5, 4.5, 3; deviations from 3:
    # dx = -2, -.5, -.5, 1, 2 and dy = -1, -2, 1.5, 1.5, 0; sum dx dy = 3.75, sum dx^2 = sum dy^2 = 9.5
    assert average_ranks(x).tolist() == [1, 2.5, 2.5, 4, 5]
    assert average_ranks(y).tolist() == [2, 1, 4.5, 4.5, 3]
    assert spearman(x, y) == pytest.approx(3.75 / 9.5)
    assert spearman(y, x) == pytest.approx(3.75 / 9.5)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None  # undefined for a constant side
    # a second key breaks the first one's ties; equal on both keys: averaged
    assert average_ranks([1, 1, 1, 0], [0.5, 0.2, 0.5, 9]).tolist() == [3.5, 2, 3.5, 1]


def test_quantile_bins_keep_ties_together():
    assert quantile_bins([0.1, 0.1, 0.5, 0.7, 0.9, 0.9], 3).tolist() == [0, 0, 1, 1, 2, 2]
    # the tie at 0.5 straddles the first boundary: both take the bin of their average rank
    assert quantile_bins([0.5, 0.1, 0.5, 0.7, 0.9, 0.9], 3).tolist() == [0, 0, 0, 1, 2, 2]
    assert quantile_bins([3, 1, 2, 0], 4).tolist() == [3, 1, 2, 0]
    assert quantile_bins([1, 1, 1, 1], 2).tolist() == [0, 0, 0, 0]  # all tied: one bin (average rank 2.5), one empty
    assert quantile_bins([1, 1, 1, 1], 2, tiebreak=[4, 3, 2, 1]).tolist() == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="--bins"):
        quantile_bins([1, 2], 3)


def test_settle_steps_and_bin_analysis_on_hand_made_trajectories():
    # 4 steps, 6 examples, 2 classes; label 0 for all. Column = example; "c" marks a step where class 0 wins.
    # predicted class per step (rows) and example (columns):
    pred = np.array([
        [0, 1, 0, 1, 0, 1],
        [0, 1, 1, 0, 0, 1],
        [0, 0, 0, 0, 1, 1],
        [0, 0, 0, 0, 0, 1],
    ])  # fmt: skip
    conf = np.array([
        [0.6, 0.6, 0.6, 0.6, 0.6, 0.6],
        [0.95, 0.7, 0.7, 0.7, 0.7, 0.7],
        [0.95, 0.7, 0.95, 0.7, 0.7, 0.95],
        [0.99, 0.8, 0.8, 0.8, 0.95, 0.99],
    ])  # fmt: skip
    probs = np.where(pred[..., None] == np.arange(2), conf[..., None], 1 - conf[..., None])  # (4, 6, 2)
    labels = np.zeros(6, dtype=np.int64)
    correct = pred == 0
    # first step (>= 1) from which always correct: ex0 1 (correct from 0, clipped to 1), ex1 2, ex2 2, ex3 1,
    # ex4 3, ex5 never (4)
    assert settle_steps(correct, first_step=1).tolist() == [1, 2, 2, 1, 3, 4]
    assert settle_steps(correct, first_step=0).tolist() == [0, 2, 2, 1, 3, 4]
    score = np.array([0.9, 0.8, 0.7, 0.6, 0.2, 0.1])
    bin_of = quantile_bins(score, 3)
    assert bin_of.tolist() == [2, 2, 1, 1, 0, 0]
    res = bin_analysis(probs, labels, bin_of, 3, score, thresholds=(0.9,), first_step=1)
    b0, b1, b2 = res["bins"]  # bin 0: ex4, ex5; bin 1: ex2, ex3; bin 2: ex0, ex1
    assert b0["accuracy_per_step"] == [0.5, 0.5, 0.0, 0.5]
    assert b1["accuracy_per_step"] == [0.5, 0.5, 1.0, 1.0]
    assert b2["accuracy_per_step"] == [0.5, 0.5, 1.0, 1.0]
    assert [b["mean_settle_step"] for b in res["bins"]] == [3.5, 1.5, 1.5]
    assert [b["never_settled"] for b in res["bins"]] == [0.5, 0.0, 0.0]
    # stop at the first step >= 1 with max prob >= 0.9, else step 3: ex0 1, ex1 3, ex2 2, ex3 3, ex4 3, ex5 2
    pol = res["threshold_policy"][0]
    assert pol["mean_step_per_bin"] == [2.5, 2.5, 2.0]
    assert pol["accuracy_per_bin"] == [0.5, 1.0, 1.0]  # ex5 stops wrong at step 2
    assert pol["mean_step"] == pytest.approx(14 / 6)
    assert res["spearman_score_settle"] == pytest.approx(spearman(score, [1, 2, 2, 1, 3, 4]))
    assert res["spearman_score_settle"] < 0  # typical examples settle sooner here
    assert res["settle_step"] == [1, 2, 2, 1, 3, 4]
    # the score as binned, and the examples correct at the last step only (ex5 never settles: left out)
    assert res["spearman_bin_settle"] == pytest.approx(spearman(bin_of, [1, 2, 2, 1, 3, 4]))
    assert res["spearman_score_settle_final_correct"] == pytest.approx(spearman(score[:5], [1, 2, 2, 1, 3]))
    assert [b["mean_settle_step_final_correct"] for b in res["bins"]] == [3.0, 1.5, 1.5]
    # censored analysis: per bin, the fraction not settled after each step (ex5 censored: never settles)
    assert b0["survival"] == [1.0, 1.0, 1.0, 0.5] and b2["survival"] == [1.0, 0.5, 0.0, 0.0]
    # an empty bin gives None, not a crash
    empty = bin_analysis(probs, labels, np.zeros(6, dtype=int), 2, score, first_step=1)
    assert empty["bins"][1]["accuracy_per_step"] is None and empty["bins"][1]["mean_settle_step"] is None


def test_read_scores_npy_npz_and_refusals(tmp_path):
    labels = np.array([0, 1, 2, 1])
    np.save(tmp_path / "s.npy", np.array([0.1, 0.2, 0.3, 0.4]))
    assert read_scores(tmp_path / "s.npy", 4).tolist() == [0.1, 0.2, 0.3, 0.4]
    np.savez(tmp_path / "s.npz", scores=np.array([1.0, 0.5, 0.2, 0.0]), labels=labels)
    assert read_scores(tmp_path / "s.npz", 4, labels).tolist() == [1.0, 0.5, 0.2, 0.0]
    np.savez(tmp_path / "nolabels.npz", scores=np.arange(4.0))
    assert read_scores(tmp_path / "nolabels.npz", 4, labels).tolist() == [0, 1, 2, 3]
    np.savez(tmp_path / "other.npz", scores=np.arange(4.0), labels=np.array([0, 1, 1, 1]))
    np.savez(tmp_path / "nokey.npz", c_scores=np.arange(4.0))
    np.save(tmp_path / "nan.npy", np.array([0.1, np.nan, 0.3, 0.4]))
    np.save(tmp_path / "2d.npy", np.zeros((4, 1)))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    for name, message in [
        ("s.npy", "4 scores but the dataset has 3 examples"),
        ("other.npz", "labels disagree"),
        ("nokey.npz", "no 'scores' array"),
        ("nan.npy", "not finite"),
        ("2d.npy", "1-D"),
        ("junk.npy", "not a readable numpy file"),
        ("missing.npy", "no such file"),
        ("s.txt", ".npy"),
    ]:
        n = 3 if name == "s.npy" else 4
        with pytest.raises(ValueError, match=message) as info:
            read_scores(tmp_path / name, n, labels)
        assert str(info.value).startswith("--scores ") and "\n" not in str(info.value)


def test_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    import cascadenet.properties.consistency as consistency

    calls = []
    real = consistency.consistency_scores
    monkeypatch.setattr(consistency, "consistency_scores", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    pool = blobs(24)
    first, path, reused = cached_consistency_scores(pool, FAST, tmp_path)
    assert not reused and path.is_file() and len(calls) == 1
    second, path2, reused = cached_consistency_scores(pool, FAST, tmp_path)
    assert reused and path2 == path and len(calls) == 1
    assert all(np.array_equal(first[k], second[k]) for k in ("score", "probability"))
    # a changed option recomputes into another file (the first stays for later reuse)
    _, path3, reused = cached_consistency_scores(pool, EstimatorOptions(folds=3, repeats=1, epochs=1), tmp_path)
    assert not reused and path3 != path and path.is_file() and len(calls) == 2
    # other data recomputes too
    _, path4, reused = cached_consistency_scores(blobs(24, planted=[0]), FAST, tmp_path)
    assert not reused and path4 not in (path, path3) and len(calls) == 3
    # a damaged cache file is recomputed, with a warning
    path.write_bytes(b"broken")
    with pytest.warns(UserWarning, match="unreadable cache"):
        _, _, reused = cached_consistency_scores(pool, FAST, tmp_path)
    assert not reused and len(calls) == 4
    assert cached_consistency_scores(pool, FAST, tmp_path)[2]


def test_estimator_options_are_checked():
    for options, flag in [({"folds": 1}, "--folds"), ({"repeats": 0}, "--repeats"),
                          ({"epochs": 0}, "--estimator-epochs"), ({"model": "rnn"}, "--estimator-model"),
                          ({"lr": 0.0}, "--estimator-lr")]:  # fmt: skip
        with pytest.raises(ValueError, match=flag):
            EstimatorOptions(**options)
    with pytest.raises(ValueError, match="more folds than"):
        consistency_scores(blobs(3), EstimatorOptions(folds=4))


def test_cnn_estimator_runs():
    out = consistency_scores(blobs(16), EstimatorOptions(folds=2, repeats=1, epochs=1, model="cnn"))
    assert out["score"].shape == (16,) and set(np.unique(out["score"])) <= {0.0, 1.0}


def test_train_val_indices_are_the_split():
    full = load_dataset("synthetic", split="train", synthetic_size=50, seed=3)
    train_idx, val_idx = train_val_indices(50, 0.2, seed=3)
    train, val = train_val_split(full, 0.2, seed=3)
    assert torch.equal(full.images[val_idx], val.images) and torch.equal(full.images[train_idx], train.images)
    assert sorted(train_idx.tolist() + val_idx.tolist()) == list(range(50)) and len(val_idx) == 10


def _runs(tmp_path, n=2):
    runs = []
    for i in range(n):
        run = tmp_path / f"run{i}"
        shutil.copytree(FIXTURE, run)
        runs.append(run)
    return runs


def test_cli_round_trip_with_the_estimator(tmp_path, capsys, monkeypatch):
    import cascadenet.properties.typicality as typ

    a, b = _runs(tmp_path)
    argv = ["typicality", str(a), str(b), "--bins", "3", "--thresholds", "0.5", "0.9", "--folds", "2",
            "--repeats", "1", "--estimator-epochs", "1", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    screen = capsys.readouterr().out
    assert "Spearman" in screen and "typicality.md" in screen
    out = a / "typicality"
    result = json.loads((out / "typicality.json").read_text())
    assert (out / "typicality.png").read_bytes()[:4] == b"\x89PNG" and "| bin |" in (out / "typicality.md").read_text()
    assert result["scores"]["kind"] == "estimator" and not result["scores"]["reused"]
    assert [r["name"] for r in result["runs"]] == ["run0", "run1"]
    # the examples are the run's validation split, at their positions in the original training set
    loaded = load_run(a, split="val", device="cpu")
    _, val_idx = train_val_indices(64, 0.1, seed=0)
    assert result["examples"]["index"] == val_idx.tolist()
    assert result["examples"]["label"] == loaded.data.labels.tolist()
    # per-bin accuracy recomputed from the run's own logits
    logits = dataset_logits(loaded.model, loaded.data, loaded.mean, loaded.std)
    correct = (logits.argmax(-1) == loaded.data.labels).numpy()
    bin_of = np.array(result["examples"]["bin"]) - 1
    for b, info in enumerate(result["runs"][0]["bins"]):
        members = bin_of == b
        assert info["n"] == members.sum()
        assert info["accuracy_per_step"] == pytest.approx(correct[:, members].mean(1).tolist())
    assert result["runs"][0]["accuracy_per_step"] == pytest.approx(correct.mean(1).tolist())
    # the report files are never replaced without --overwrite; with it, the cached scores are reused
    before = (out / "typicality.json").read_bytes()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (out / "typicality.json").read_bytes() == before
    # (the figure is checked above; drawing it again costs seconds)
    monkeypatch.setattr(typ, "_figure_png", lambda result: b"figure")
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads((out / "typicality.json").read_text())["scores"]["reused"] is True
    # another estimator option: recomputed
    assert main([*argv, "--overwrite", "--estimator-seed", "1"]) == 0
    assert json.loads((out / "typicality.json").read_text())["scores"]["reused"] is False
    assert len(list(out.glob("consistency-*.npz"))) == 2


def test_cli_with_a_score_file_maps_the_val_split_to_original_indices(tmp_path, capsys, monkeypatch):
    import cascadenet.properties.typicality as typ

    monkeypatch.setattr(typ, "_figure_png", lambda result: b"figure")  # seconds otherwise
    (a,) = _runs(tmp_path, 1)
    full = load_dataset("synthetic", split="train", synthetic_size=64, seed=0)
    # score = original index: the scores the report shows are then the positions of its examples
    np.savez(tmp_path / "s.npz", scores=np.arange(64.0), labels=full.labels.numpy())
    out = tmp_path / "report"
    assert main(["typicality", str(a), "--scores", str(tmp_path / "s.npz"), "--bins", "2", "--out", str(out),
                 "--device", "cpu"]) == 0  # fmt: skip
    result = json.loads((out / "typicality.json").read_text())
    assert result["examples"]["score"] == result["examples"]["index"]
    assert result["examples"]["index"] == train_val_indices(64, 0.1, seed=0)[1].tolist()
    assert result["examples"]["bin"] == [1, 1, 1, 2, 2, 2]  # sorted positions, so sorted scores
    assert result["scores"] == {"kind": "file", "path": str(tmp_path / "s.npz")}
    assert not list(out.glob("consistency-*"))  # no estimator with a file
    capsys.readouterr()
    # refusals: one line each, exit 2
    np.save(tmp_path / "short.npy", np.arange(6.0))  # one per val example: the file must cover the training set
    wrong = full.labels.numpy().copy()
    wrong[[0, 1]] = (wrong[[0, 1]] + 1) % 4
    np.savez(tmp_path / "wrong.npz", scores=np.arange(64.0), labels=wrong)
    other = _runs(tmp_path / "other", 1)[0]
    config = json.loads((other / "config.json").read_text())
    config["train"]["seed"] = 1
    (other / "config.json").write_text(json.dumps(config))
    for argv, message in [
        (["--scores", str(tmp_path / "short.npy")], "6 scores but the synthetic training set has 64 examples"),
        (["--scores", str(tmp_path / "wrong.npz")], "labels disagree"),
        (["--scores", str(tmp_path / "none.npy")], "no such file"),
        (["--bins", "0"], "--bins"),
        (["--bins", "7"], "more bins than val examples (6)"),
        (["--thresholds", "1.5"], "--thresholds"),
        ([str(other)], "evaluate different val examples"),
    ]:
        code = main(["typicality", str(a), *argv, "--out", str(tmp_path / "x"), "--device", "cpu"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow  # the first torch.optim use imports torch._dynamo: seconds
def test_the_estimators_adam_is_torchs():
    from cascadenet.properties.consistency import _Adam

    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    ours, theirs = _Adam(list(a.parameters()), 0.01), torch.optim.Adam(b.parameters(), lr=0.01)
    for _ in range(20):
        x = torch.randn(8, 5)
        ours.step(torch.autograd.grad(a(x).pow(2).sum(), list(a.parameters())))
        theirs.zero_grad()
        b(x).pow(2).sum().backward()
        theirs.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)
