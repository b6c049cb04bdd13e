"""Stopping with guarantees: risk-controlled thresholds keep their promise on a distribution whose risk is known
in closed form, the conditional-monotonicity measures by hand, the report and the verbs."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cascadenet.cli import main
from cascadenet.evaluation import metrics
from cascadenet.evaluation.monotonicity import monotonicity
from cascadenet.evaluation.outputs import Outputs
from cascadenet.evaluation.risk import (
    apply_threshold,
    binomial_p_values,
    example_losses,
    resplit_check,
    risk_controlled_threshold,
    threshold_grid,
)
from cascadenet.properties.guarantees import format_guarantees, guarantees_analysis

FIXTURE = Path(__file__).parent / "fixtures" / "run-format1"


def sample(n, rng):
    """Two exits, two classes. Exit 0 says class 0 with confidence c ~ U(0.5, 1); the last exit disagrees (says
    class 1) with probability 1 - c. Exiting at exit 0 when c >= lam has disagreement risk
    R(lam) = P(c >= lam, disagree) = integral_lam^1 2 (1 - c) dc = (1 - lam)^2 for lam in [0.5, 1]."""
    c = rng.uniform(0.5, 1.0, n)
    disagree = rng.uniform(size=n) < 1 - c
    logits = np.zeros((2, n, 2))
    logits[0, :, 0], logits[0, :, 1] = np.log(c), np.log1p(-c)
    logits[1, :, 1] = np.where(disagree, 5.0, -5.0)
    return torch.tensor(logits), torch.zeros(n, dtype=torch.long)


def true_risk(lam):
    return 0.0 if lam is None else (1 - max(lam, 0.5)) ** 2


def test_binomial_p_values_are_the_binomial_lower_tail():
    n, eps = 40, 0.1
    for k in (0, 1, 4, 12, 40):
        expected = sum(math.comb(n, i) * eps**i * (1 - eps) ** (n - i) for i in range(k + 1))
        assert binomial_p_values([k], n, eps)[0] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("method", ["fixed-sequence", "bonferroni"])
def test_the_threshold_risk_exceeds_eps_at_most_delta_of_the_time(method):
    rng = np.random.default_rng(0)
    eps, delta, draws = 0.05, 0.1, 300
    chosen = []
    for _ in range(draws):
        logits, labels = sample(400, rng)
        chosen.append(risk_controlled_threshold(logits, labels, eps=eps, delta=delta, method=method)["threshold"])
    risks = np.array([true_risk(lam) for lam in chosen])
    violations = (risks > eps).mean()
    assert violations <= delta + 3 * math.sqrt(delta * (1 - delta) / draws)
    # and not vacuous: the thresholds exit early with a risk of the order of eps (the best is lam = 1 - sqrt(eps))
    assert all(lam is not None for lam in chosen)
    assert eps / 4 < risks.mean() < eps


def test_example_losses_and_the_applied_threshold():
    # 3 exits, 3 examples; exit 1's confidence decides
    logits = torch.tensor(
        [
            [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],  # exit 0: uninformative (first_exit = 1)
            [[4.0, 0.0], [0.0, 4.0], [0.1, 0.0]],  # exit 1: confident 0, confident 1, unsure
            [[4.0, 0.0], [4.0, 0.0], [0.0, 4.0]],  # last exit: 0, 0, 1
        ]
    )
    labels = torch.tensor([0, 1, 1])
    dis, exits = example_losses(logits, labels, [0.9], first_exit=1)
    assert exits.tolist() == [[1, 1, 2]] and dis.tolist() == [[False, True, False]]
    drop, _ = example_losses(logits, labels, [0.9], first_exit=1, risk="accuracy-drop")
    assert drop.tolist() == [[False, False, False]]  # example 1: the last exit is wrong, the early one right
    r = apply_threshold(logits, labels, 0.9, [0, 10, 30], first_exit=1)
    assert r["disagreement"] == pytest.approx(1 / 3) and r["accuracy"] == 1.0
    assert r["accuracy_last_exit"] == pytest.approx(2 / 3)
    assert r["mean_macs"] == pytest.approx(50 / 3) and r["macs_saved"] == pytest.approx(1 - 50 / 90)
    assert apply_threshold(logits, labels, None, [0, 10, 30], first_exit=1)["macs_saved"] == 0.0
    grid = threshold_grid()
    assert grid[0] == 1.0 and grid[-1] == 0.0 and (np.diff(grid) < 0).all()
    with pytest.raises(ValueError, match="--risk"):
        risk_controlled_threshold(logits, labels, eps=1.5, delta=0.1)


def test_resplit_check_reports_violations_on_the_test_part_and_the_pool():
    logits, labels = sample(3000, np.random.default_rng(1))
    rows = resplit_check(logits, labels, [1.0, 2.0], eps=[0.05], delta=0.1, calibration_size=300, splits=50)
    (row,) = rows
    assert row["splits"] == 50 and row["test_size"] == 2700
    assert 0 <= row["violations"] <= 0.3 and 0 <= row["violations_pool"] <= 0.3
    assert 0 < row["macs_saved_mean"] < 0.5  # exit 0 costs half the last exit's MACs
    with pytest.raises(ValueError, match="calibration_size"):
        resplit_check(logits, labels, [1.0, 2.0], eps=[0.05], delta=0.1, calibration_size=3000)


def test_monotonicity_by_hand():
    # 3 classes, 3 exits; true class 0. Example a: p_true 0.6 -> 0.2 -> 0.7 (a drop of 0.4, right -> wrong);
    # example b: 0.3 -> 0.5 -> 0.9 (monotone); exit 0 drops do not count with first_exit = 1.
    def row(p):
        rest = (1 - p) / 2
        return [math.log(p), math.log(rest * 1.5), math.log(rest * 0.5)]

    probs = [[0.6, 0.3], [0.2, 0.5], [0.7, 0.9]]
    logits = torch.tensor([[row(p) for p in exit_] for exit_ in probs], dtype=torch.float64)
    labels = torch.tensor([0, 0])
    m = monotonicity(logits, labels, margins=(0.1, 0.5))
    assert m["drop_share"] == [0.5, 0.0] and m["right_to_wrong"] == 0.5
    assert m["mean_max_drop"] == pytest.approx(0.2)
    m1 = monotonicity(logits, labels, first_exit=1, margins=(0.1,))
    assert m1["drop_share"] == [0.0] and m1["right_to_wrong"] == 0.0


def test_guarantees_analysis_and_report():
    rng = np.random.default_rng(2)
    val, val_y = sample(800, rng)
    test, test_y = sample(800, rng)
    a = guarantees_analysis(val, val_y, test, test_y, [1.0, 2.0], first_exit=0, eps=(0.05,), splits=20,
                            calibration_sizes=(200, 5000))  # fmt: skip
    assert len(a["calibration"]["temperatures"]) == 2
    assert set(a["monotonicity"]) == {"raw", "poe"}
    # the policies on the raw outputs are those of the calibration section's raw entry (same outputs, same fit)
    raw, poe = a["monotonicity"]["raw"], a["monotonicity"]["poe"]
    assert raw["threshold_auc"] == a["calibration"]["raw"]["threshold_auc"]
    assert raw["budgeted_accuracy_at"] == a["calibration"]["raw"]["budgeted_accuracy_at"]
    # PoE's are scored on its own outputs: here exit 0's logits are all <= 0, so its PoE output is uniform (no
    # confidence to stop on) and the threshold curve differs from the raw one
    poe_out = Outputs(poe=True, first_exit=0).transform(test.double())
    assert poe["threshold_auc"] == metrics.summarize(poe_out, test_y, first_step=0)["threshold_auc"]
    assert poe["threshold_auc"] != raw["threshold_auc"] and len(poe["budgeted_accuracy_at"]) == 3
    assert len(a["risk"]["fit"]) == 2 and len(a["risk"]["resplit"]) == 2  # 5000 >= the pool: skipped
    record = {"eps": [0.05], "delta": 0.1, "splits": 20, "seed": 0,
              "runs": [{"run": f"m-s{s}", "model": "m", "family": "x", **a} for s in range(2)]}  # fmt: skip
    text = format_guarantees(record)
    assert "| m | disagreement | 200 / 1400 | 0.05 |" in text and "## Conditional monotonicity" in text
    row = next(line for line in text.splitlines() if line.startswith("| m | poe |"))
    assert row.endswith(f"| {100 * poe['threshold_auc']:.2f} ± 0.00 | {100 * poe['budgeted_accuracy_at'][0]:.1f} ± "
                        f"0.0 | {100 * poe['budgeted_accuracy_at'][1]:.1f} ± 0.0 |")  # fmt: skip
    # a report written before the policies were measured still formats
    for r in record["runs"]:
        r["monotonicity"] = {k: {x: v for x, v in m.items() if x not in ("threshold_auc", "budgeted_accuracy_at")}
                             for k, m in r["monotonicity"].items()}  # fmt: skip
    assert "| - | - | - |" in format_guarantees(record)


def test_cli_policy_risk_and_guarantees(tmp_path, capsys):
    run = tmp_path / "run-s0"
    shutil.copytree(FIXTURE, run)
    assert main(["policy", str(run), "--risk", "0.2", "--delta", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "threshold" in out and "MACs saved" in out
    assert main(["policy", str(run), "--risk", "0"]) == 2
    assert "--risk must be a number in (0, 1)" in capsys.readouterr().err
    report = tmp_path / "g"
    argv = ["guarantees", str(run), "--out", str(report), "--splits", "5", "--calibration-sizes", "5", "--eps", "0.2"]
    assert main(argv) == 0
    record = json.loads((report / "guarantees.json").read_text())
    assert record["runs"][0]["model"] == "run" and (report / "guarantees.md").is_file()
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err


@pytest.mark.slow  # two fits of the learned policy's GRU (~20 s under load)
def test_cli_policy_comparison_reads_the_chosen_outputs(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    assert main(["policy", str(run), "--poe", "--out", str(tmp_path / "p")]) == 0
    record = json.loads((tmp_path / "p" / "stopping.json").read_text())
    assert record["runs"][0]["outputs"] == "poe"
    assert main(["calibrate", str(run)]) == 0
    assert main(["policy", str(run), "--out", str(tmp_path / "c")]) == 0  # the run's temperatures when present
    assert json.loads((tmp_path / "c" / "stopping.json").read_text())["runs"][0]["outputs"] == "calibrated"
