"""Stopping policies over the output trace (cascadenet.properties.stopping): curves and areas on hand-made traces, the
pointwise comparison, the learned GRU policy (a planted rule, determinism, the same steps as the generic Policy),
fitting on validation only, and the `cascadenet policy` command on a tiny trained run."""

import json

import pytest
import torch

from cascadenet.cli import main
from cascadenet.evaluation.policies import Confidence, Margin, StableArgmax
from cascadenet.models.registry import create_model
from cascadenet.properties.stopping import (
    GRUConfig,
    GRUPolicy,
    _sweep_steps,
    compare_curves,
    curve_areas,
    fit_gru,
    policy_curve,
    stopping_analysis,
    stopping_targets,
)
from cascadenet.training.loop import TrainConfig, train

# Two examples, three steps, three classes. A (label 0): margin 0.4 at step 0, confidence 0.8 from step 1.
# B (label 1): undecided at step 0, confident and right from step 1.
HAND = torch.tensor(
    [
        [[0.6, 0.2, 0.2], [0.40, 0.45, 0.15]],
        [[0.8, 0.1, 0.1], [0.20, 0.70, 0.10]],
        [[0.9, 0.05, 0.05], [0.20, 0.70, 0.10]],
    ]
)
HAND_LABELS = torch.tensor([0, 1])
HAND_MACS = [0.0, 10.0, 30.0]


def test_margin_stops_earlier_than_confidence_at_equal_accuracy():
    steps = torch.stack(
        [p.stopping_steps(HAND, 0) for p in (Confidence(0.7), Margin(0.4), StableArgmax(1), Confidence(0.95))]
    )
    assert steps.tolist() == [[1, 1], [0, 1], [1, 1], [2, 2]]
    curve = policy_curve(steps, HAND, HAND_LABELS, HAND_MACS)
    assert curve["accuracy"] == [1.0, 1.0, 1.0, 1.0]
    assert curve["mean_step"] == [1.0, 0.5, 1.0, 2.0]
    assert curve["mean_macs"] == [10.0, 5.0, 10.0, 30.0]
    # a wrong answer counts: B's step 0 answer is class 1 (0.45), right; relabel B as 2 and every stop is wrong
    wrong = policy_curve(steps, HAND, torch.tensor([0, 2]), HAND_MACS)
    assert wrong["accuracy"] == [0.5, 0.5, 0.5, 0.5]


def test_the_sweep_is_the_policies_own_rule_and_never_stops_before_the_first_step():
    steps = _sweep_steps("margin", [0.0, 0.4, 1.0], HAND, 1, None)
    assert steps.tolist() == [[1, 1], [1, 1], [2, 2]]
    assert _sweep_steps("confidence", [0.7], HAND, 0, None).tolist() == [[1, 1]]
    assert _sweep_steps("stable", [1, 2], HAND, 0, None).tolist() == [[1, 1], [2, 2]]


def test_areas_by_hand():
    curve = {"mean_step": [1.0], "accuracy": [1.0], "mean_macs": [10.0]}
    acc = [0.5, 1.0, 1.0]
    areas = curve_areas(curve, acc, HAND_MACS, 3)
    # anchored at (0, 0.5) and (1, 1.0): x = 0, 0.5, 1 and y = 0.5, 1, 1
    assert areas["steps_auc"] == pytest.approx(0.5 * 0.75 + 0.5 * 1.0)
    # MACs x = 0, 1/3, 1
    assert areas["macs_auc"] == pytest.approx(0.75 / 3 + 2 / 3)
    # a first exit that costs 10% of the network: chance (1/3) below it, not step 0's accuracy
    sdn = curve_areas({**curve, "mean_macs": [10.0]}, acc, [3.0, 10.0, 30.0], 3)
    assert sdn["macs_auc"] == pytest.approx(0.1 / 3 + (1 / 3 - 0.1) * 0.75 + 2 / 3)
    # a later stop at the same accuracy has less area
    later = curve_areas({"mean_step": [2.0], "accuracy": [1.0], "mean_macs": [30.0]}, acc, HAND_MACS, 3)
    assert later["steps_auc"] < areas["steps_auc"] and later["macs_auc"] < areas["macs_auc"]


def test_pointwise_comparison():
    a = ([0.0, 1.0], [0.5, 1.0])
    lower = ([0.0, 1.0], [0.5, 0.9])
    flat = ([0.0, 0.5, 1.0], [0.7, 0.7, 0.7])
    result = compare_curves({"a": a, "lower": lower, "flat": flat}, tol=0.01)
    pairs = {(p["a"], p["b"]): p for p in result["pairs"]}
    assert pairs["a", "lower"]["verdict"] == "a dominates lower"
    # a is above flat by more than 0.01 where 0.5 + 0.5x > 0.71 (x > 0.42), below where x < 0.38
    cross = pairs["a", "flat"]
    assert cross["verdict"] == "cross"
    assert cross["a_ahead"] == pytest.approx(0.58) and cross["b_ahead"] == pytest.approx(0.38)
    assert pairs["lower", "flat"]["verdict"] == "cross"
    assert result["dominant"] is None
    # within the tolerance, curves are equal; a curve above every other dominates
    assert compare_curves({"x": a, "y": ([0.0, 1.0], [0.505, 1.0])}, tol=0.01)["pairs"][0]["verdict"] == "equal"
    assert compare_curves({"a": a, "lower": lower}, tol=0.01)["dominant"] == "a"


def test_targets():
    probs = torch.tensor([[[0.6, 0.4], [0.6, 0.4]], [[0.3, 0.7], [0.3, 0.7]], [[0.6, 0.4], [0.3, 0.7]]])
    labels = torch.tensor([0, 1])
    # example 0: pred 0, 1, 0 -> correct at 0 and 2; example 1: pred 0, 1, 1 -> correct at 1 and 2
    assert stopping_targets(probs, labels, "correct").tolist() == [[1, 0], [0, 1], [1, 1]]
    # final-correct also needs the last step's answer: both examples end on their label, so nothing changes
    assert stopping_targets(probs, labels, "final-correct").tolist() == [[1, 0], [0, 1], [1, 1]]
    assert stopping_targets(probs, torch.tensor([1, 1]), "correct").tolist() == [[0, 0], [1, 1], [0, 1]]
    # example 0 is right at step 1 (pred 1) but answers 0 at the last step: not final-correct
    assert stopping_targets(probs, torch.tensor([1, 1]), "final-correct").tolist() == [[0, 0], [0, 1], [0, 1]]
    with pytest.raises(ValueError, match="target must be one of"):
        stopping_targets(probs, labels, "settled")
    with pytest.raises(ValueError, match="GRUConfig.holdout"):
        GRUConfig(holdout=1.0)


def planted(n, seed, T=8):
    """Traces where the answer becomes the label right after a marker class (3) is the argmax, and is a constant
    wrong class before it; every step has the same confidence (0.55), so confidence, margin and stable argmax
    cannot tell before from after. The label is never 3."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    wrong = (labels + torch.randint(1, 3, (n,), generator=g)) % 3
    marker = torch.randint(1, T - 2, (n,), generator=g)  # the step at which class 3 is the argmax
    t = torch.arange(T)[:, None]
    pred = torch.where(t < marker, wrong, torch.where(t == marker, torch.full_like(wrong, 3), labels))  # (T, N)
    probs = torch.full((T, n, 4), 0.15)
    probs.scatter_(2, pred[..., None], 0.55)
    return probs, labels, marker


def test_the_gru_learns_a_planted_rule_deterministically():
    probs, labels, _ = planted(240, seed=0)
    # a small, fast configuration (the defaults fit real traces of thousands of examples)
    cfg = GRUConfig(hidden=8, epochs=15, patience=15, batch_size=40, lr=0.1)
    net, record = fit_gru(probs, labels, 1, cfg, seed=3)
    again, record_again = fit_gru(probs, labels, 1, cfg, seed=3)
    assert record == record_again  # the same seed, the same fit, to the bit
    assert all(torch.equal(p, q) for p, q in zip(net.state_dict().values(), again.state_dict().values()))
    _, other = fit_gru(probs, labels, 1, GRUConfig(hidden=8, epochs=1), seed=4)
    _, other_seed = fit_gru(probs, labels, 1, GRUConfig(hidden=8, epochs=1), seed=5)
    assert other["weights_sha256"] != other_seed["weights_sha256"]
    assert record["fit_examples"] == 180 and record["holdout_examples"] == 60

    # new traces: the GRU says "correct" after the marker and not before it
    test_probs, test_labels, test_marker = planted(300, seed=1)
    y = stopping_targets(test_probs[1:], test_labels)
    pred = net.scores(test_probs[1:]) >= 0.5
    assert y.mean() < 0.6  # chance by always saying the majority answer is at most 0.6
    assert (pred == y.bool()).float().mean() > 0.95

    # as a stopping policy: right and right after the marker, where the rules can only stop everyone at once
    policy = GRUPolicy(net, 0.5)
    steps = policy.stopping_steps(test_probs, 1)
    correct = test_probs.argmax(-1).gather(0, steps[None])[0] == test_labels
    assert correct.float().mean() > 0.95
    assert (steps == test_marker + 1).float().mean() > 0.9
    for rule in (Confidence(0.5), Margin(0.3), StableArgmax(1)):
        rule_steps = rule.stopping_steps(test_probs, 1)
        rule_correct = test_probs.argmax(-1).gather(0, rule_steps[None])[0] == test_labels
        assert rule_correct.float().mean() < 0.5 or rule_steps.float().mean() > steps.float().mean() + 1

    # the sweep (GRU run once) gives the policy's own steps; online stop agrees with offline; never before step 1
    taus = [0.0, 0.3, 0.5, 0.9, 1.0]
    swept = _sweep_steps("learned", taus, test_probs, 1, net)
    for tau, row in zip(taus, swept):
        assert torch.equal(row, GRUPolicy(net, tau).stopping_steps(test_probs, 1))
    assert swept[0].tolist() == [1] * 300  # tau 0: everyone at the first informative step, none before
    online = torch.full((300,), -1)
    for t in range(test_probs.shape[0]):
        stop = policy.stop(test_probs[: t + 1], 1) & (online < 0)
        online[stop] = t
    online[online < 0] = test_probs.shape[0] - 1
    assert torch.equal(online, steps)


def test_fitting_uses_only_the_validation_split():
    probs, labels, _ = planted(200, seed=5)
    logits = probs.log()
    val, val_y, test, test_y = logits[:, :120], labels[:120], logits[:, 120:], labels[120:]
    kw = {"first_step": 1, "macs": list(range(8)), "points": 6, "gru": GRUConfig(epochs=5), "seed": 2}
    base = stopping_analysis(val, val_y, test, test_y, **kw)
    shuffled = stopping_analysis(val, val_y, test, test_y[torch.randperm(80)], **kw)
    for kind, policy in base["policies"].items():
        other = shuffled["policies"][kind]
        assert policy["values"] == other["values"] and policy["val"] == other["val"]
        assert policy["operating_point"][policy["parameter"]] == other["operating_point"][other["parameter"]]
        assert policy["test"]["mean_step"] == other["test"]["mean_step"]
    assert base["policies"]["learned"]["gru"] == shuffled["policies"]["learned"]["gru"]
    assert base["accuracy_per_step"]["test"] != shuffled["accuracy_per_step"]["test"]  # the labels did change
    # and the validation labels do matter to the fit
    relabelled = stopping_analysis(val, val_y[torch.randperm(120)], test, test_y, **kw)
    assert (
        relabelled["policies"]["learned"]["gru"]["weights_sha256"]
        != base["policies"]["learned"]["gru"]["weights_sha256"]
    )
    # every policy reaches both ends' neighbourhoods and never stops before the first informative step
    for policy in base["policies"].values():
        assert min(policy["test"]["mean_step"]) >= 1 and 0 <= policy["steps_auc"] <= 1
    assert set(base["comparison"]) == {"step", "macs"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    model = create_model("resnet10", width=2, num_classes=4)
    cfg = TrainConfig(model=model.config, dataset="synthetic", synthetic_size=96, val_fraction=0.5, epochs=1,
                      max_batches=2, batch_size=16, warmup_epochs=0.5, device="cpu", out=str(out),
                      name="tiny")  # fmt: skip
    return train(cfg)


def test_cli_round_trip(tiny_run, capsys):
    args = ["policy", str(tiny_run), "--device", "cpu", "--seed", "1", "--batch-size", "64"]
    assert main(args) == 0
    folder = tiny_run / "stopping"
    record = json.loads((folder / "stopping.json").read_text())
    (run,) = record["runs"]
    assert record["seed"] == 1 and run["run"] == "tiny" and run["first_step"] == 1
    assert run["val_examples"] == 48 and run["test_examples"] == 96
    assert set(run["policies"]) == {"confidence", "margin", "stable", "learned"}
    for policy in run["policies"].values():
        assert len(policy["test"]["accuracy"]) == len(policy["values"]) >= 2
        assert min(policy["test"]["mean_step"]) >= 1
    assert (folder / "stopping.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (folder / "stopping.md").read_text()
    assert "## tiny" in report and "largest area" in report
    assert run["outputs"] == "raw" and "raw outputs" in report  # which outputs the policies read is in the report

    before = (folder / "stopping.json").read_bytes()
    assert main(args) == 2  # refuses to replace the report, before any work
    assert "pass --overwrite" in capsys.readouterr().err
    assert (folder / "stopping.json").read_bytes() == before
    # several runs need --out; a missing run is one line
    assert main(["policy", str(tiny_run), str(tiny_run), "--device", "cpu"]) == 2
    assert "--out is needed" in capsys.readouterr().err
    assert main(["policy", str(tiny_run / "missing"), "--out", str(folder / "m")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert main([*args[:2], "--batch-size", "0", "--out", str(folder / "m")]) == 2
    assert "--batch-size must be a positive integer" in capsys.readouterr().err
    assert not (folder / "m").exists()  # nothing written by the refused commands


@pytest.mark.slow
def test_cli_several_runs_overwrite_and_determinism(tiny_run, tmp_path):
    args = ["policy", str(tiny_run), str(tiny_run), "--device", "cpu", "--seed", "1", "--out", str(tmp_path / "r")]
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "stopping.md").write_text("mine")
    assert main(args) == 2
    assert (tmp_path / "r" / "stopping.md").read_text() == "mine"
    assert main([*args, "--overwrite"]) == 0
    first, second = json.loads((tmp_path / "r" / "stopping.json").read_text())["runs"]
    assert first == second  # seeded: the same numbers for the same run


def test_no_stray_numpy_types_in_the_record():
    probs, labels, _ = planted(60, seed=7)
    result = stopping_analysis(probs.log()[:, :40], labels[:40], probs.log()[:, 40:], labels[40:], first_step=1,
                               macs=list(range(8)), points=4, gru=GRUConfig(epochs=2))  # fmt: skip
    assert json.loads(json.dumps(result)) == result
