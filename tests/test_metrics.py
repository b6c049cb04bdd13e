"""Tests for cascadenet.metrics on hand-made trajectories, properties and a loop reference."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cascadenet.metrics import (
    anytime_auc,
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
