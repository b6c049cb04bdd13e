"""Tests for cascadenet.evaluation.metrics on hand-made trajectories, properties and a loop reference."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cascadenet.evaluation.metrics import (
    accuracy_at_budgets,
    anytime_auc,
    apply_thresholds,
    budget_exit_fractions,
    budgeted_curve,
    cost_auc,
    cost_summary,
    first_step_reaching,
    fit_budget_thresholds,
    mean_confidence_per_step,
    normalized_time,
    per_step_accuracy,
    steps_to_fraction,
    summarize,
    threshold_auc,
    threshold_curve,
)


def _two_class_logits(pred: int, prob: float) -> list[float]:
    """Two-class logits whose argmax is pred with max softmax probability prob (a logit gap of log(p / (1 - p)))."""
    gap = math.log(prob / (1.0 - prob))
    return [gap, 0.0] if pred == 0 else [0.0, gap]


# Hand-made trajectory, T=3 steps, N=4 examples, C=2 classes; entries are (prediction, max softmax probability):
#            label   step 0        step 1        step 2
#   ex 0:      0     (0, .75) ok   (0, .90) ok   (0, .95) ok
#   ex 1:      1     (0, .75) x    (1, .75) ok   (1, .95) ok
#   ex 2:      0     (1, .90) x    (0, .75) ok   (0, .90) ok    <- confidently wrong at step 0
#   ex 3:      1     (0, .75) x    (0, .75) x    (0, .75) x     <- never confident, always wrong
_TABLE = [
    [(0, 0.75), (0, 0.90), (0, 0.95)],
    [(0, 0.75), (1, 0.75), (1, 0.95)],
    [(1, 0.90), (0, 0.75), (0, 0.90)],
    [(0, 0.75), (0, 0.75), (0, 0.75)],
]
HAND_LOGITS = np.array([[_two_class_logits(*_TABLE[n][t]) for n in range(4)] for t in range(3)])  # (T, N, C)
HAND_LABELS = np.array([0, 1, 0, 1])


def test_per_step_accuracy_hand_made() -> None:
    # step 0: only ex 0 right -> 1/4; steps 1 and 2: all but ex 3 right -> 3/4.
    np.testing.assert_allclose(per_step_accuracy(HAND_LOGITS, HAND_LABELS), [0.25, 0.75, 0.75])


def test_per_step_accuracy_accepts_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    acc = per_step_accuracy(torch.tensor(HAND_LOGITS, dtype=torch.bfloat16), torch.tensor(HAND_LABELS))
    np.testing.assert_allclose(acc, [0.25, 0.75, 0.75])


def test_normalized_time() -> None:
    np.testing.assert_allclose(normalized_time(5), [0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_array_equal(normalized_time(1), [0.0])


def test_anytime_auc_hand_made() -> None:
    # Times 0, .5, 1: trapezoids .5 * (.25 + .75) / 2 + .5 * (.75 + .75) / 2 = .25 + .375.
    assert anytime_auc(per_step_accuracy(HAND_LOGITS, HAND_LABELS)) == pytest.approx(0.625)


@pytest.mark.parametrize(
    ("accuracy", "expected"),
    [
        ([0.7, 0.7, 0.7, 0.7], 0.7),  # constant: the area is the constant
        (np.linspace(0, 1, 11), 0.5),  # linear ramp 0 -> 1
        ([0.0, 1.0, 1.0, 1.0, 1.0], 0.875),  # step at time 1/4: 1 - half of the first 1/4-wide interval
        ([0.0, 0.0, 1.0], 0.25),  # step in the last interval: one triangle of area .5 * .5 / 2
        ([0.4], 0.4),  # T == 1 -> accuracy[0]
    ],
)
def test_anytime_auc_known_shapes(accuracy: list[float], expected: float) -> None:
    assert anytime_auc(accuracy) == pytest.approx(expected)


def test_threshold_curve_hand_made() -> None:
    # Stopping step per example (first step with max-prob >= q, else the last step 2) and whether it is right there:
    #   q=0:    every example stops at step 0                      -> steps (0,0,0,0), right (1,0,0,0)
    #   q=.5:   every step-0 prob is >= .75                        -> same as q=0
    #   q=.8:   ex0 step 1 (.90), ex1 step 2 (.95), ex2 step 0 (.90, wrong), ex3 never -> 2
    #                                                              -> steps (1,2,0,2), right (1,1,0,0)
    #   q=.92:  ex0 step 2 (.95), ex1 step 2 (.95), ex2 and ex3 never -> 2
    #                                                              -> steps (2,2,2,2), right (1,1,1,0)
    #   q=1:    nobody reaches it                                  -> same as q=.92
    curve = threshold_curve(HAND_LOGITS, HAND_LABELS, [0.0, 0.5, 0.8, 0.92, 1.0])
    assert curve["thresholds"] == [0.0, 0.5, 0.8, 0.92, 1.0]
    np.testing.assert_allclose(curve["mean_step"], [0.0, 0.0, 1.25, 2.0, 2.0])
    np.testing.assert_allclose(curve["accuracy"], [0.25, 0.25, 0.5, 0.75, 0.75])


def test_threshold_curve_never_stops_before_first_step() -> None:
    # From step 1 on, q=0 stops everyone at step 1 (accuracy 0.75 there), whatever step 0 says.
    curve = threshold_curve(HAND_LOGITS, HAND_LABELS, [0.0, 1.0], first_step=1)
    np.testing.assert_allclose(curve["mean_step"], [1.0, 2.0])
    np.testing.assert_allclose(curve["accuracy"], [0.75, 0.75])
    with pytest.raises(ValueError, match="first_step"):
        threshold_curve(HAND_LOGITS, HAND_LABELS, first_step=3)


def test_threshold_curve_default_thresholds() -> None:
    curve = threshold_curve(HAND_LOGITS, HAND_LABELS)
    assert len(curve["thresholds"]) == len(curve["mean_step"]) == len(curve["accuracy"]) == 101
    assert curve["thresholds"][0] == 0.0 and curve["thresholds"][-1] == 1.0
    assert all(type(v) is float for key in curve for v in curve[key])


def test_threshold_curve_is_stable_for_huge_logits() -> None:
    # Without subtracting the max, exp(1000) overflows and the probabilities become NaN.
    logits = np.array([[[1000.0, 0.0]], [[0.0, 1000.0]]])  # (T=2, N=1, C=2), certain at every step
    curve = threshold_curve(logits, [1], [0.0, 0.99])
    assert curve["mean_step"] == [0.0, 0.0]
    assert curve["accuracy"] == [0.0, 0.0]


def test_threshold_auc_hand_made() -> None:
    # From the hand-made curve with q in (0, .8, .92, 1): times mean_step / 2 = (0, .625, 1, 1), accuracies
    # (.25, .5, .75, .75). The two points at time 1 merge into .75. Trapezoids: .625 * (.25 + .5) / 2 = .234375 and
    # .375 * (.5 + .75) / 2 = .234375.
    curve = threshold_curve(HAND_LOGITS, HAND_LABELS, [0.0, 0.8, 0.92, 1.0])
    assert threshold_auc(curve, 3) == pytest.approx(0.46875)


def test_threshold_auc_extends_horizontally_and_sorts() -> None:
    # T=3, so times are mean_step / 2: points (.25, .2) and (.75, .8), given right-to-left. Extended: .2 on [0, .25]
    # -> .05, trapezoid on [.25, .75] -> .25, .8 on [.75, 1] -> .2; total .5.
    curve = {"thresholds": [0.9, 0.1], "mean_step": [1.5, 0.5], "accuracy": [0.8, 0.2]}
    assert threshold_auc(curve, 3) == pytest.approx(0.5)
    # A single point is flat across [0, 1].
    assert threshold_auc({"mean_step": [1.0], "accuracy": [0.6]}, 3) == pytest.approx(0.6)


def test_threshold_auc_merges_ties_by_mean() -> None:
    # Both points at time .5 merge into accuracy (.2 + .6) / 2 = .4, flat across [0, 1].
    curve = {"mean_step": [1.0, 1.0], "accuracy": [0.2, 0.6]}
    assert threshold_auc(curve, 3) == pytest.approx(0.4)


def test_threshold_auc_single_step() -> None:
    # T == 1: every point sits at time 0, so the area is the (merged) accuracy.
    assert threshold_auc({"mean_step": [0.0, 0.0], "accuracy": [0.3, 0.5]}, 1) == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("accuracy", "fraction", "expected"),
    [
        ([0.25, 0.75, 0.75], 0.5, 1),  # target .375: step 0 (.25) misses, step 1 hits
        ([0.25, 0.75, 0.75], 0.3, 0),  # target .225: step 0 already hits
        ([0.25, 0.75, 0.75], 1.0, 1),
        ([0.2, 0.72, 0.8], 0.9, 1),  # target 0.9 * 0.8 == 0.7200000000000001 in floats; 18/25 = .72 must count
        ([0.0, 0.0, 0.0], 0.95, 0),  # final accuracy 0 -> target 0, reached at once
        ([0.2, 0.4, 0.5], 1.5, None),  # target .75 is never reached
    ],
)
def test_steps_to_fraction(accuracy: list[float], fraction: float, expected: int | None) -> None:
    result = steps_to_fraction(accuracy, fraction)
    assert result == expected
    assert result is None or type(result) is int


def test_summarize_hand_made_is_plain_json() -> None:
    summary = summarize(HAND_LOGITS, HAND_LABELS, [0.0, 0.8, 0.92, 1.0])
    assert json.loads(json.dumps(summary)) == summary
    assert summary["num_steps"] == 3 and summary["num_examples"] == 4
    assert summary["accuracy_per_step"] == pytest.approx([0.25, 0.75, 0.75])
    assert summary["anytime_auc"] == pytest.approx(0.625)
    assert summary["threshold_auc"] == pytest.approx(0.46875)
    assert summary["steps_to_50pct_final"] == 1
    assert summary["steps_to_95pct_final"] == 1
    assert summary["final_accuracy"] == pytest.approx(0.75)
    assert summary["policy_first_step"] == 0

    def plain(value: object) -> bool:
        if isinstance(value, dict):
            return all(plain(v) for v in value.values())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or type(value) in (int, float, str)

    assert plain(summary)


def _reference_threshold_curve(
    logits: np.ndarray, labels: np.ndarray, thresholds: np.ndarray, first_step: int = 0
) -> dict:
    """Direct per-example loop: scan the steps from first_step, stop at the first confident one, else at the last."""
    num_steps, num_examples, _ = logits.shape
    mean_step, accuracy = [], []
    for q in thresholds:
        stops, right = [], []
        for n in range(num_examples):
            stop = num_steps - 1
            for t in range(first_step, num_steps):
                z = logits[t, n] - logits[t, n].max()
                probs = np.exp(z) / np.exp(z).sum()
                if probs.max() >= q:
                    stop = t
                    break
            stops.append(stop)
            right.append(logits[stop, n].argmax() == labels[n])
        mean_step.append(np.mean(stops))
        accuracy.append(np.mean(right))
    return {"mean_step": mean_step, "accuracy": accuracy}


@pytest.mark.parametrize("seed", range(6))
def test_threshold_curve_matches_loop_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_steps, num_examples, num_classes = rng.integers(1, 6), rng.integers(1, 40), rng.integers(2, 7)
    # A drift towards the label makes confidence grow over time, so many thresholds stop mid-trajectory.
    labels = rng.integers(0, num_classes, num_examples)
    drift = np.eye(num_classes)[labels] * np.arange(num_steps)[:, None, None]  # (T, N, C)
    logits = rng.normal(scale=2.0, size=(num_steps, num_examples, num_classes)) + drift
    thresholds = np.sort(rng.uniform(0, 1, 30))
    first_step = int(rng.integers(0, num_steps)) if seed % 2 else 0
    expected = _reference_threshold_curve(logits, labels, thresholds, first_step)
    curve = threshold_curve(logits, labels, thresholds, first_step=first_step)
    np.testing.assert_allclose(curve["mean_step"], expected["mean_step"])
    np.testing.assert_allclose(curve["accuracy"], expected["accuracy"])


@st.composite
def trajectories(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    num_steps = draw(st.integers(1, 5))
    num_examples = draw(st.integers(1, 8))
    num_classes = draw(st.integers(2, 5))
    # Bounded logits keep every max-prob below 1 - 1e-8, so q = 1 is above all of them.
    logits = draw(
        hnp.arrays(np.float64, (num_steps, num_examples, num_classes), elements=st.floats(-8.0, 8.0, width=32))
    )
    labels = draw(hnp.arrays(np.int64, (num_examples,), elements=st.integers(0, num_classes - 1)))
    return logits, labels


@settings(max_examples=60, deadline=None)
@given(trajectories(), st.lists(st.floats(0.0, 1.0), min_size=1, max_size=10))
def test_threshold_curve_properties(trajectory: tuple[np.ndarray, np.ndarray], extra: list[float]) -> None:
    logits, labels = trajectory
    num_steps = logits.shape[0]
    acc = per_step_accuracy(logits, labels)
    thresholds = np.sort(np.concatenate([[0.0, 1.0], extra]))
    curve = threshold_curve(logits, labels, thresholds)

    # q = 0: everyone stops at step 0. q = 1: nobody is that confident, everyone runs to the end.
    assert curve["mean_step"][0] == 0.0
    assert curve["accuracy"][0] == pytest.approx(acc[0])
    assert curve["mean_step"][-1] == num_steps - 1
    assert curve["accuracy"][-1] == pytest.approx(acc[-1])
    # Raising the threshold can only delay stopping.
    assert np.all(np.diff(curve["mean_step"]) >= 0)
    assert all(0.0 <= a <= 1.0 for a in curve["accuracy"])
    assert 0.0 <= anytime_auc(acc) <= 1.0
    assert 0.0 <= threshold_auc(curve, num_steps) <= 1.0 + 1e-12


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=20))
def test_anytime_auc_bounded_by_extremes(accuracy: list[float]) -> None:
    assert min(accuracy) - 1e-12 <= anytime_auc(accuracy) <= max(accuracy) + 1e-12


_GOOD_LOGITS = np.zeros((2, 3, 4))
_GOOD_LABELS = np.array([0, 1, 3])


@pytest.mark.parametrize(
    ("logits", "labels", "thresholds", "match"),
    [
        (np.zeros((3, 4)), _GOOD_LABELS, None, "logits must have shape"),
        (_GOOD_LOGITS, _GOOD_LABELS[:, None], None, "labels must have shape"),
        (_GOOD_LOGITS, np.array([0, 1]), None, "labels has 2 entries but logits has 3"),
        (np.zeros((0, 3, 4)), _GOOD_LABELS, None, "non-empty"),
        (np.zeros((2, 0, 4)), np.array([], dtype=np.int64), None, "non-empty"),
        (_GOOD_LOGITS, np.array([0, 1, 4]), None, r"labels must lie in \[0, 4\)"),
        (_GOOD_LOGITS, np.array([-1, 1, 3]), None, r"labels must lie in \[0, 4\)"),
        (_GOOD_LOGITS, np.array([0.0, 1.0, 3.0]), None, "labels must be integers"),
        (np.where(np.arange(4) == 2, np.nan, _GOOD_LOGITS), _GOOD_LABELS, None, "NaN"),
        (_GOOD_LOGITS, _GOOD_LABELS, [0.5, 1.5], r"thresholds must lie in \[0, 1\]"),
        (_GOOD_LOGITS, _GOOD_LABELS, [-0.1], r"thresholds must lie in \[0, 1\]"),
        (_GOOD_LOGITS, _GOOD_LABELS, [], "thresholds must be a non-empty"),
    ],
)
def test_bad_trajectory_inputs(logits: np.ndarray, labels: np.ndarray, thresholds: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        threshold_curve(logits, labels, thresholds)
    with pytest.raises(ValueError, match=match):
        summarize(logits, labels, thresholds)
    if thresholds is None:
        with pytest.raises(ValueError, match=match):
            per_step_accuracy(logits, labels)


@pytest.mark.parametrize("accuracy", [[], [[0.5]], [0.5, np.nan], [0.5, 1.2], [-0.1]])
def test_bad_accuracy_inputs(accuracy: list) -> None:
    with pytest.raises(ValueError, match="accuracy_per_step"):
        anytime_auc(accuracy)
    with pytest.raises(ValueError, match="accuracy_per_step"):
        steps_to_fraction(accuracy, 0.5)


def test_bad_scalar_and_curve_inputs() -> None:
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        normalized_time(0)
    with pytest.raises(ValueError, match="num_steps must be an integer"):
        normalized_time(2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fraction"):
        steps_to_fraction([0.5], -0.1)
    with pytest.raises(ValueError, match="mean_step"):
        threshold_auc({"accuracy": [0.5]}, 3)
    with pytest.raises(ValueError, match="equal length"):
        threshold_auc({"mean_step": [0.0, 1.0], "accuracy": [0.5]}, 3)
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\]"):
        threshold_auc({"mean_step": [3.0], "accuracy": [0.5]}, 3)


def test_summarize_anchors_threshold_auc_at_step_zero_when_policy_starts_later() -> None:
    # first_step=1, thresholds {0, 1}: points (mean step 1, acc .75) and (2, .75); anchored at (0, step-0 acc .25).
    # x = step / 2: area = trapezoid (0, .25) -> (.5, .75) -> (1, .75) = .5 * (.25 + .75) / 2 + .5 * .75 = .625
    summary = summarize(HAND_LOGITS, HAND_LABELS, [0.0, 1.0], first_step=1)
    assert summary["threshold_auc"] == pytest.approx(0.625)
    assert summary["threshold_curve"]["mean_step"] == [1.0, 2.0]  # the anchor is not a policy point


# ---------------------------------------------------------------------------------------------------------------
# Cost-aware metrics: mean confidence, areas on the cost axes, budgets, absolute targets.


def test_mean_confidence_per_step_hand_made() -> None:
    # Max-softmax per step from _TABLE: step 0 (.75, .75, .90, .75), step 1 (.90, .75, .75, .75),
    # step 2 (.95, .95, .90, .75).
    np.testing.assert_allclose(mean_confidence_per_step(HAND_LOGITS), [0.7875, 0.7875, 0.8875])
    with pytest.raises(ValueError, match="logits must have shape"):
        mean_confidence_per_step(np.zeros((2, 3)))


@pytest.mark.parametrize(
    ("accuracy", "costs", "num_classes", "expected"),
    [
        # a multi-exit network: chance (0.1) over [0, .15), exit 0 over [.15, .5), exit 1 over [.5, 1)
        ([0.6, 0.8, 0.9], [15, 50, 100], 10, 0.1 * 0.15 + 0.6 * 0.35 + 0.8 * 0.5),
        # a cascade in MACs: step 0 costs 0, so no chance part; .25 * .5 + .75 * .5
        ([0.25, 0.75, 0.75], [0, 10, 20], 2, 0.5),
        # the same cascade in latency (one block per step: 1, 2, 3): chance over the first third
        ([0.25, 0.75, 0.75], [1, 2, 3], 2, (0.5 + 0.25 + 0.75) / 3),
        # ties: exits 0 and 1 both cost 0 (exit 1 is held from b = 0), exits 2 and 3 both cost 10
        ([0.1, 0.2, 0.3, 0.4], [0, 0, 10, 10], 4, 0.2),
        ([0.7], [5], 4, 0.25),  # one exit: chance until it completes at b = 1
        ([0.3, 0.7], [0, 0], 4, 0.7),  # nothing costs anything: the last exit's answer at once
    ],
)
def test_cost_auc_hand_made(accuracy: list, costs: list, num_classes: int, expected: float) -> None:
    assert cost_auc(accuracy, costs, num_classes) == pytest.approx(expected)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(0, 1), min_size=1, max_size=6),
    st.lists(st.integers(0, 50), min_size=6, max_size=6),
    st.integers(1, 20),
)
def test_cost_auc_is_the_integral_of_accuracy_at_budgets(accuracy: list, steps: list, num_classes: int) -> None:
    costs = np.cumsum(steps[: len(accuracy)]).astype(float)
    if costs[-1] == 0:
        costs = costs + 1.0
    # midpoints of a fine grid never fall on a cost exactly, so the step function is integrated without ambiguity
    grid = (np.arange(20_000) + 0.5) / 20_000
    numeric = accuracy_at_budgets(accuracy, costs, grid * costs[-1], num_classes).mean()
    assert cost_auc(accuracy, costs, num_classes) == pytest.approx(numeric, abs=2e-3)


def test_accuracy_at_budgets_hand_made() -> None:
    acc, costs = [0.6, 0.8, 0.9], [15, 50, 100]
    got = accuracy_at_budgets(acc, costs, [0, 14.99, 15, 49, 50, 100, 1000, 20], 10)
    np.testing.assert_allclose(got, [0.1, 0.1, 0.6, 0.6, 0.8, 0.9, 0.9, 0.6])
    with pytest.raises(ValueError, match="budgets"):
        accuracy_at_budgets(acc, costs, [-1], 10)
    with pytest.raises(ValueError, match="cumulative"):
        accuracy_at_budgets(acc, [15, 10, 100], [20], 10)
    with pytest.raises(ValueError, match="one entry per step"):
        accuracy_at_budgets(acc, [15, 100], [20], 10)
    with pytest.raises(ValueError, match="num_classes"):
        accuracy_at_budgets(acc, costs, [20], 0)


def test_first_step_reaching() -> None:
    acc = [0.3, 0.5, 0.94, 0.95, 0.99]
    assert first_step_reaching(acc, 0.5) == 1
    assert first_step_reaching(acc, 0.95) == 3
    assert first_step_reaching(acc, 0.995) is None
    assert first_step_reaching([0.0], 0.0) == 0
    with pytest.raises(ValueError, match="target"):
        first_step_reaching(acc, 1.5)


def test_cost_summary_hand_made() -> None:
    acc, macs, latency = [0.2, 0.6, 0.97], [0, 40, 100], [1.0, 2.0, 3.0]
    s = cost_summary(acc, macs, latency, 5)
    assert json.loads(json.dumps(s)) == s
    assert s["chance_accuracy"] == pytest.approx(0.2)
    assert s["macs_auc"] == pytest.approx(0.2 * 0.4 + 0.6 * 0.6)
    assert s["latency_auc"] == pytest.approx((0.2 + 0.2 + 0.6) / 3)
    assert (s["steps_to_50pct_accuracy"], s["macs_to_50pct_accuracy"], s["latency_to_50pct_accuracy"]) == (1, 40, 2.0)
    assert (s["steps_to_95pct_accuracy"], s["macs_to_95pct_accuracy"], s["latency_to_95pct_accuracy"]) == (2, 100, 3.0)
    assert type(s["macs_to_50pct_accuracy"]) is int
    budget = s["accuracy_at_budget"]  # the model's own full cost, 100 MACs: budgets 25, 50, 75, 100
    assert budget["reference_macs"] == 100.0 and budget["fractions"] == [0.25, 0.5, 0.75, 1.0]
    assert budget["macs"] == [25.0, 50.0, 75.0, 100.0]
    assert budget["accuracy"] == pytest.approx([0.2, 0.6, 0.6, 0.97])
    # against a reference model twice as expensive: budgets 50, 100, 150, 200
    other = cost_summary(acc, macs, latency, 5, reference_macs=200)["accuracy_at_budget"]
    assert other["macs"] == [50.0, 100.0, 150.0, 200.0]
    assert other["accuracy"] == pytest.approx([0.6, 0.97, 0.97, 0.97])
    never = cost_summary([0.1, 0.4], [10, 20], [1, 2], 10)
    assert never["steps_to_50pct_accuracy"] is None and never["macs_to_50pct_accuracy"] is None
    assert never["latency_to_95pct_accuracy"] is None
    for bad in (0, -5, float("nan"), "100", True):
        with pytest.raises(ValueError, match="reference_macs"):
            cost_summary(acc, macs, latency, 5, reference_macs=bad)


def test_summarize_has_mean_confidence() -> None:
    summary = summarize(HAND_LOGITS, HAND_LABELS)
    assert summary["mean_confidence_per_step"] == pytest.approx([0.7875, 0.7875, 0.8875])


# ---------------------------------------------------------------------------------------------------------------
# Budgeted batch (MSDNet's adaptive_inference.py).


def _conf_logits(conf: list[list[float]], preds: list[list[int]] | None = None) -> np.ndarray:
    """(K, N, 2) logits with the given max-softmax confidences (> .5) and predictions (default class 0)."""
    k, n = len(conf), len(conf[0])
    preds = preds or [[0] * n for _ in range(k)]
    return np.array([[_two_class_logits(preds[e][i], conf[e][i]) for i in range(n)] for e in range(k)])


def test_budget_exit_fractions() -> None:
    np.testing.assert_allclose(budget_exit_fractions(1.0, 4), [0.25] * 4)
    np.testing.assert_allclose(budget_exit_fractions(2.0, 3), [2 / 14, 4 / 14, 8 / 14])
    np.testing.assert_allclose(budget_exit_fractions(0.5, 2), [2 / 3, 1 / 3])
    big = budget_exit_fractions(1.95, 2000)  # q^k overflows float64 without the log-space normalisation
    assert np.all(np.isfinite(big)) and big.sum() == pytest.approx(1.0)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="q must be"):
            budget_exit_fractions(bad, 3)


def test_fit_budget_thresholds_hand_made() -> None:
    # K = 3, N = 6, q = 1: P = 1/3 each, rank floor(6 / 3) = 2 at exits 0 and 1.
    val = _conf_logits([
        [0.9, 0.8, 0.8, 0.7, 0.6, 0.55],  # exit 0: 2nd most confident is .8 -> T0 = .8; the tie makes 3 exit
        [0.99, 0.99, 0.99, 0.6, 0.9, 0.7],  # exit 1: ex 3, 4, 5 remain (.6, .9, .7): the 2nd is .7 -> T1 = .7
        [0.6, 0.6, 0.6, 0.6, 0.6, 0.6],
    ])  # fmt: skip
    t = fit_budget_thresholds(val, 1.0)
    conf = 1 / (1 + np.exp(-np.abs(val[:, :, 0] - val[:, :, 1])))  # the two-class max softmax
    assert t[0] == pytest.approx(0.8) and t[0] == conf[0, 1]  # exactly a validation confidence
    assert t[1] == pytest.approx(0.7) and t[1] == conf[1, 5]
    assert t[2] == -np.inf


def test_fit_budget_thresholds_infinite_cases() -> None:
    # q = 0.05, K = 3: P = (.950, .0475, .0024); N = 6 -> ranks 5, floor(.285) = 0 -> +inf at exit 1.
    val = _conf_logits([[0.9, 0.85, 0.8, 0.75, 0.7, 0.65], [0.9] * 6, [0.9] * 6])
    t = fit_budget_thresholds(val, 0.05)
    assert t[0] == pytest.approx(0.7) and t[1] == np.inf and t[2] == -np.inf
    # q = 1: rank 2 at every exit; a five-way tie at exit 0 lets 5 exit, so exit 1's 2nd remaining example never
    # comes: +inf
    tied = _conf_logits([[0.8, 0.8, 0.8, 0.8, 0.8, 0.6], [0.9] * 6, [0.9] * 6])
    t = fit_budget_thresholds(tied, 1.0)
    assert t[0] == pytest.approx(0.8) and t[1] == np.inf and t[2] == -np.inf
    # one exit: everybody exits there
    np.testing.assert_array_equal(fit_budget_thresholds(val[:1], 1.0), [-np.inf])
    # first_exit: exit 0 is never taken and the fractions spread over exits 1 and 2 (q = 1: rank 3 at exit 1)
    t = fit_budget_thresholds(_conf_logits([[0.99] * 6, [0.9, 0.8, 0.7, 0.6, 0.6, 0.55], [0.6] * 6]), 1.0,
                              first_exit=1)  # fmt: skip
    assert t[0] == np.inf and t[1] == pytest.approx(0.7) and t[2] == -np.inf
    with pytest.raises(ValueError, match="first_exit"):
        fit_budget_thresholds(val, 1.0, first_exit=3)


def test_apply_thresholds_hand_made() -> None:
    # thresholds (.8, .7, -inf), costs (10, 20, 40); label 0 throughout
    #   ex 0: exit 0 at .85, right      ex 1: exit 0 at .8 (a tie exits), wrong
    #   ex 2: exit 1 at .7, right       ex 3: below both, exit 2, right
    logits = _conf_logits(
        [[0.85, 0.8, 0.6, 0.6], [0.6, 0.6, 0.7, 0.65], [0.6, 0.6, 0.6, 0.55]],
        [[0, 1, 1, 1], [1, 1, 0, 1], [1, 1, 1, 0]],
    )
    val = _conf_logits([[0.8, 0.9], [0.7, 0.9], [0.6, 0.6]])
    thresholds = np.array([_max_conf(val, 0, 0), _max_conf(val, 1, 0), -np.inf])  # the same floats as the .8, .7
    point = apply_thresholds(logits, [0, 0, 0, 0], thresholds, [10, 20, 40])
    assert point["accuracy"] == pytest.approx(0.75)
    assert point["exit_fractions"] == pytest.approx([0.5, 0.25, 0.25])
    assert point["mean_cost"] == pytest.approx(0.5 * 10 + 0.25 * 20 + 0.25 * 40)
    # +inf everywhere but the last: everyone answers at the last exit (ex 3 alone is right there)
    point = apply_thresholds(logits, [0, 0, 0, 0], [np.inf, np.inf, -np.inf], [10, 20, 40])
    assert point == {"accuracy": 0.25, "mean_cost": 40.0, "exit_fractions": [0.0, 0.0, 1.0]}
    # nobody passes a finite last threshold: the last exit answers anyway
    assert apply_thresholds(logits, [0, 0, 0, 0], [1.0, 1.0, 1.0], [10, 20, 40])["mean_cost"] == 40.0
    with pytest.raises(ValueError, match="thresholds must be 3"):
        apply_thresholds(logits, [0, 0, 0, 0], [0.5, np.nan, 0.1], [10, 20, 40])
    with pytest.raises(ValueError, match="costs"):
        apply_thresholds(logits, [0, 0, 0, 0], thresholds, [10, -1, 40])


def _max_conf(logits: np.ndarray, exit: int, example: int) -> float:
    z = logits[exit, example] - logits[exit, example].max()
    return float(1 / np.exp(z).sum())


def _reference_budgeted(val: np.ndarray, test: np.ndarray, labels: np.ndarray, costs: list, q: float) -> tuple:
    """A transcription of MSDNet-PyTorch's dynamic_eval_find_threshold and dynamic_eval_with_threshold."""
    k_exits, n_val, _ = val.shape

    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p = np.array([q ** (k + 1) for k in range(k_exits)])
    p = p / p.sum()
    max_preds = softmax(val).max(axis=2)
    sorted_idx = np.argsort(-max_preds, axis=1, kind="stable")
    filtered = np.zeros(n_val)
    thresholds = np.full(k_exits, 1e8)
    for k in range(k_exits - 1):
        count, out_n = 0, math.floor(n_val * p[k] + 1e-9)
        for i in range(n_val):
            ori = sorted_idx[k][i]
            if filtered[ori] == 0:
                count += 1
                if count == out_n:
                    thresholds[k] = max_preds[k][ori]
                    break
        filtered += max_preds[k] >= thresholds[k]
    thresholds[-1] = -1e8
    test_conf, test_pred = softmax(test).max(axis=2), test.argmax(axis=2)
    right, exits = 0, np.zeros(k_exits)
    for i in range(test.shape[1]):
        for k in range(k_exits):
            if test_conf[k][i] >= thresholds[k]:
                right += int(test_pred[k][i] == labels[i])
                exits[k] += 1
                break
    return right / test.shape[1], float(exits @ np.asarray(costs, dtype=float)) / test.shape[1]


@pytest.mark.parametrize("seed", range(4))
def test_budgeted_curve_matches_the_reference_code(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k_exits, num_classes = int(rng.integers(2, 6)), int(rng.integers(2, 6))
    drift = np.arange(k_exits)[:, None, None]

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, num_classes, n)
        logits = rng.normal(size=(k_exits, n, num_classes)) + drift * np.eye(num_classes)[labels]
        return np.round(logits, 1), labels  # rounding makes ties in confidence

    (val, _), (test, labels) = split(int(rng.integers(5, 60))), split(int(rng.integers(5, 60)))
    costs = np.cumsum(rng.integers(1, 100, k_exits)).tolist()
    curve = budgeted_curve(val, test, labels, costs)
    assert curve["q"] == [p / 20 for p in range(1, 40)]
    for q, acc, cost, fractions in zip(curve["q"], curve["accuracy"], curve["mean_cost"], curve["exit_fractions"]):
        ref_acc, ref_cost = _reference_budgeted(val, test, labels, costs, q)
        assert acc == pytest.approx(ref_acc) and cost == pytest.approx(ref_cost)
        assert sum(fractions) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ"):
        budgeted_curve(val[:1], test, labels, costs)


def test_absolute_cost_auc_shares_one_axis():
    from cascadenet.evaluation.metrics import absolute_cost_auc

    # exits at 2 and 4 with accuracies 0.6 and 0.8, 10 classes, range [0, 8]: chance over [0, 2], 0.6 over [2, 4],
    # the last answer held over [4, 8]
    assert absolute_cost_auc([0.6, 0.8], [2, 4], 10, 8) == pytest.approx((0.1 * 2 + 0.6 * 2 + 0.8 * 4) / 8)
    # on its own range it is cost_auc
    assert absolute_cost_auc([0.6, 0.8], [2, 4], 10, 4) == pytest.approx(cost_auc([0.6, 0.8], [2, 4], 10))
    # a range shorter than the model: exits beyond it never arrive
    assert absolute_cost_auc([0.6, 0.8], [2, 4], 10, 3) == pytest.approx((0.1 * 2 + 0.6 * 1) / 3)
    assert absolute_cost_auc([0.6, 0.8], [2, 4], 10, 1) == pytest.approx(0.1)
    # the own-normalised area rewards a model that spends more; the shared axis does not: B is A at twice the cost
    a, b = ([0.5, 0.9], [1, 2]), ([0.5, 0.9], [2, 4])
    assert cost_auc(*a, 10) == cost_auc(*b, 10)
    assert absolute_cost_auc(*a, 10, 4) > absolute_cost_auc(*b, 10, 4)
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="max_cost must be a finite number > 0"):
            absolute_cost_auc([0.5], [1], 10, bad)


def test_fallback_last_or_most_confident():
    from cascadenet.evaluation.metrics import apply_thresholds, budgeted_curve, threshold_curve

    # one example, three exits: confident and right at exit 0 (0.7 < the threshold 0.9), unsure and wrong at 1, 2
    logits = np.log(np.array([[[0.7, 0.3]], [[0.4, 0.6]], [[0.45, 0.55]]]))
    labels = np.array([0])
    last = apply_thresholds(logits, labels, [0.9, 0.9, -np.inf], [1, 2, 3])
    assert last["accuracy"] == 0.0 and last["exit_fractions"] == [0, 0, 1]  # exits at the last, answers with it
    conf = apply_thresholds(logits, labels, [0.9, 0.9, np.inf], [1, 2, 3], fallback="most-confident")
    assert conf["accuracy"] == 1.0 and conf["mean_cost"] == 3.0  # answers with exit 0, having paid for all three
    curve = threshold_curve(logits, labels, [0.95], fallback="most-confident")
    assert curve["accuracy"] == [1.0] and curve["mean_step"] == [2.0]
    assert threshold_curve(logits, labels, [0.95])["accuracy"] == [0.0]
    # exits before first_exit are never the answer
    assert threshold_curve(logits, labels, [0.95], first_step=1, fallback="most-confident")["accuracy"] == [0.0]
    assert budgeted_curve(logits, logits, labels, [1, 2, 3], q=[1.0], first_exit=1, fallback="most-confident")[
        "accuracy"] == [0.0]  # fmt: skip
    with pytest.raises(ValueError, match="unknown fallback 'first'"):
        apply_thresholds(logits, labels, [0.9, 0.9, 0.9], [1, 2, 3], fallback="first")
