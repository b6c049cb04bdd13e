"""Anytime-prediction metrics computed from a trajectory of logits.

An anytime classifier emits logits at every internal time step, giving a trajectory of shape (T, N, C): T steps,
N examples, C classes, step 0 first. Everything here works in numpy and accepts numpy arrays or torch tensors.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

__all__ = [
    "anytime_auc",
    "normalized_time",
    "per_step_accuracy",
    "steps_to_fraction",
    "summarize",
    "threshold_auc",
    "threshold_curve",
]

# Accuracies are ratios k / N, and fraction * final rarely lands on one exactly (0.95 * 0.8 == 0.7600000000000001),
# so comparisons against such targets allow this much rounding slack.
_ATOL = 1e-12


def _to_numpy(x: Any) -> np.ndarray:
    """Converts a numpy array, torch tensor or sequence to a numpy array without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        # .numpy() rejects bfloat16, and float32 holds every half-precision value exactly.
        if x.is_floating_point():
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _check_trajectory(logits: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validates and converts a logit trajectory and its labels.

    Args:
        logits: Trajectory of shape (T, N, C).
        labels: Integer class labels of shape (N,).

    Returns:
        The logits as a float array and the labels as an int64 array.

    Raises:
        ValueError: If the shapes, dtypes or values are unusable.
    """
    logits = _to_numpy(logits)
    labels = _to_numpy(labels)
    if logits.ndim != 3:
        raise ValueError(f"logits must have shape (T, N, C), got ndim={logits.ndim} with shape {logits.shape}")
    if labels.ndim != 1:
        raise ValueError(f"labels must have shape (N,), got ndim={labels.ndim} with shape {labels.shape}")
    if 0 in logits.shape:
        raise ValueError(f"logits must be non-empty, got shape {logits.shape}")
    num_classes = logits.shape[2]
    if labels.shape[0] != logits.shape[1]:
        raise ValueError(f"labels has {labels.shape[0]} entries but logits has {logits.shape[1]} examples")
    if not np.issubdtype(logits.dtype, np.floating) and not np.issubdtype(logits.dtype, np.integer):
        raise ValueError(f"logits must be real numbers, got dtype {logits.dtype}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if not np.all(np.isfinite(logits)):
        raise ValueError("logits contain NaN or infinite values")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    return logits, labels.astype(np.int64, copy=False)


def _check_thresholds(thresholds: Any) -> np.ndarray:
    """Validates confidence thresholds, defaulting to 101 evenly spaced values in [0, 1]."""
    if thresholds is None:
        return np.linspace(0.0, 1.0, 101)
    q = np.asarray(_to_numpy(thresholds), dtype=np.float64)
    if q.ndim != 1 or q.size == 0:
        raise ValueError(f"thresholds must be a non-empty 1-D sequence, got shape {q.shape}")
    if not np.all(np.isfinite(q)) or q.min() < 0.0 or q.max() > 1.0:
        raise ValueError(f"thresholds must lie in [0, 1], got range [{q.min()}, {q.max()}]")
    return q


def _check_accuracy(accuracy_per_step: Any) -> np.ndarray:
    """Validates a per-step accuracy curve: non-empty, 1-D, values in [0, 1]."""
    acc = np.asarray(_to_numpy(accuracy_per_step), dtype=np.float64)
    if acc.ndim != 1 or acc.size == 0:
        raise ValueError(f"accuracy_per_step must be a non-empty 1-D sequence, got shape {acc.shape}")
    if not np.all(np.isfinite(acc)) or acc.min() < 0.0 or acc.max() > 1.0:
        raise ValueError(f"accuracy_per_step must lie in [0, 1], got range [{acc.min()}, {acc.max()}]")
    return acc


def _check_num_steps(num_steps: int) -> int:
    """Validates a step count as a positive integer."""
    try:
        steps = operator.index(num_steps)
    except TypeError:
        raise ValueError(f"num_steps must be an integer, got {num_steps!r}") from None
    if steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {steps}")
    return steps


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    """Trapezoidal integral, written out because np.trapz/np.trapezoid differ across supported numpy versions."""
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)


def _max_softmax(logits: np.ndarray) -> np.ndarray:
    """Maximum softmax probability per step and example.

    The largest shifted logit is exactly 0, so the max probability is 1 / sum(exp(shifted)) and the full softmax
    never needs materialising; the shift keeps exp from overflowing.
    """
    shifted = logits.astype(np.float64) - logits.max(axis=2, keepdims=True).astype(np.float64)  # (T, N, C)
    return 1.0 / np.exp(shifted).sum(axis=2)  # (T, N)


def per_step_accuracy(logits: Any, labels: Any) -> np.ndarray:
    """Fraction of examples classified correctly at each step.

    Args:
        logits: Trajectory of shape (T, N, C); the prediction is the argmax over classes.
        labels: Integer class labels of shape (N,).

    Returns:
        Accuracy in [0, 1] at each step, shape (T,).

    Raises:
        ValueError: If the inputs are malformed.
    """
    logits, labels = _check_trajectory(logits, labels)
    correct = logits.argmax(axis=2) == labels  # (T, N)
    return correct.mean(axis=1)


def normalized_time(num_steps: int) -> np.ndarray:
    """Step index rescaled to [0, 1], i.e. step / (T - 1).

    Args:
        num_steps: Number of steps T (>= 1).

    Returns:
        Shape (T,) array from 0 to 1; [0.0] when T == 1.

    Raises:
        ValueError: If num_steps is not a positive integer.
    """
    return np.linspace(0.0, 1.0, _check_num_steps(num_steps))


def anytime_auc(accuracy_per_step: Any) -> float:
    """Area under per-step accuracy against normalised time step / (T - 1), by the trapezoidal rule.

    Args:
        accuracy_per_step: Accuracy in [0, 1] at each step, shape (T,).

    Returns:
        The area, in [0, 1]; accuracy_per_step[0] when T == 1.

    Raises:
        ValueError: If the accuracies are empty, not 1-D or outside [0, 1].
    """
    acc = _check_accuracy(accuracy_per_step)
    if acc.size == 1:
        return float(acc[0])
    return _trapezoid(acc, normalized_time(acc.size))


def threshold_curve(logits: Any, labels: Any, thresholds: Any = None, first_step: int = 0) -> dict[str, list[float]]:
    """Speed-accuracy trade-off of the confidence-threshold stopping policy.

    For each threshold q, every example stops at the first step whose max softmax probability is >= q, or at the last
    step if none is. The first such step is where the running max of the confidence first reaches q, and because that
    running max never decreases, the stopping step is the number of steps whose running max is still below q.

    Args:
        logits: Trajectory of shape (T, N, C).
        labels: Integer class labels of shape (N,).
        thresholds: Confidence thresholds in [0, 1]; defaults to np.linspace(0, 1, 101). Output keeps their order.
        first_step: The policy may not stop before this step. Steps whose output cannot depend on the input (step 0
            of a cascade whose stem is delayed) give the same, possibly confident, answer for every example;
            stopping there would be answering before looking.

    Returns:
        {"thresholds", "mean_step", "accuracy"}: per threshold, the threshold, the mean stopping step (0-based, in
        steps) and the accuracy of the predictions made at the stopping steps.

    Raises:
        ValueError: If the inputs are malformed or a threshold lies outside [0, 1].
    """
    logits, labels = _check_trajectory(logits, labels)
    q = _check_thresholds(thresholds)
    num_steps, num_examples = logits.shape[:2]
    if not 0 <= first_step < num_steps:
        raise ValueError(f"first_step must be in [0, {num_steps}), got {first_step}")
    correct = logits.argmax(axis=2) == labels  # (T, N)
    running_conf = np.maximum.accumulate(_max_softmax(logits[first_step:]), axis=0)  # (T - first_step, N)
    examples = np.arange(num_examples)

    mean_step, accuracy = [], []
    for threshold in q:
        stop = first_step + np.minimum((running_conf < threshold).sum(axis=0), num_steps - 1 - first_step)  # (N,)
        mean_step.append(float(stop.mean()))
        accuracy.append(float(correct[stop, examples].mean()))
    return {"thresholds": [float(t) for t in q], "mean_step": mean_step, "accuracy": accuracy}


def threshold_auc(curve: dict[str, Any], num_steps: int) -> float:
    """Area under the threshold curve's accuracy against normalised mean stopping time mean_step / (T - 1).

    Points are sorted by normalised time; points sharing a time are merged into one whose accuracy is their mean
    (the mean, not the max, so repeating a threshold cannot bias the area). The curve is extended horizontally to
    time 0 with the leftmost accuracy and to time 1 with the rightmost, then integrated by the trapezoidal rule.

    Args:
        curve: Output of threshold_curve (needs "mean_step" and "accuracy").
        num_steps: Number of steps T of the trajectory the curve came from.

    Returns:
        The area, in [0, 1].

    Raises:
        ValueError: If the curve is malformed or inconsistent with num_steps.
    """
    steps = _check_num_steps(num_steps)
    try:
        mean_step = np.asarray(curve["mean_step"], dtype=np.float64)
        acc = np.asarray(curve["accuracy"], dtype=np.float64)
    except (KeyError, TypeError) as err:
        raise ValueError(f"curve must be a dict with 'mean_step' and 'accuracy' lists ({err})") from None
    if mean_step.ndim != 1 or mean_step.size == 0 or mean_step.shape != acc.shape:
        raise ValueError(
            f"curve 'mean_step' and 'accuracy' must be non-empty 1-D and equal length, "
            f"got shapes {mean_step.shape} and {acc.shape}"
        )
    acc = _check_accuracy(acc)
    if not np.all(np.isfinite(mean_step)) or mean_step.min() < 0.0 or mean_step.max() > steps - 1 + _ATOL:
        raise ValueError(
            f"curve 'mean_step' must lie in [0, {steps - 1}], got range [{mean_step.min()}, {mean_step.max()}]"
        )

    time = mean_step / (steps - 1) if steps > 1 else np.zeros_like(mean_step)
    x, group = np.unique(np.clip(time, 0.0, 1.0), return_inverse=True)  # sorted, ties merged
    y = np.bincount(group, weights=acc) / np.bincount(group)
    x = np.concatenate([[0.0], x, [1.0]])
    y = np.concatenate([y[:1], y, y[-1:]])
    return _trapezoid(y, x)


def steps_to_fraction(accuracy_per_step: Any, fraction: float) -> int | None:
    """First step whose accuracy reaches a fraction of the final-step accuracy.

    Args:
        accuracy_per_step: Accuracy in [0, 1] at each step, shape (T,).
        fraction: Target as a fraction (>= 0) of the final accuracy, e.g. 0.95.

    Returns:
        The 0-based step, or None if no step reaches the target (only possible for fraction > 1). A final accuracy of
        0 makes the target 0, reached at step 0.

    Raises:
        ValueError: If the accuracies are malformed or fraction is negative or not finite.
    """
    acc = _check_accuracy(accuracy_per_step)
    if not np.isfinite(fraction) or fraction < 0:
        raise ValueError(f"fraction must be a finite number >= 0, got {fraction!r}")
    reached = acc >= fraction * acc[-1] - _ATOL  # (T,)
    return int(reached.argmax()) if reached.any() else None


def summarize(logits: Any, labels: Any, thresholds: Any = None, first_step: int = 0) -> dict[str, Any]:
    """All anytime metrics of a trajectory as plain JSON-serialisable Python types.

    Args:
        logits: Trajectory of shape (T, N, C).
        labels: Integer class labels of shape (N,).
        thresholds: Confidence thresholds for threshold_curve; defaults to np.linspace(0, 1, 101).
        first_step: The threshold policy's earliest stopping step (see threshold_curve). When it is > 0, the area
            under the threshold curve is anchored at (step 0, accuracy at step 0).

    Returns:
        {"num_steps", "num_examples", "accuracy_per_step", "anytime_auc", "threshold_curve", "threshold_auc",
        "steps_to_50pct_final", "steps_to_95pct_final", "final_accuracy"}.

    Raises:
        ValueError: If the inputs are malformed.
    """
    logits, labels = _check_trajectory(logits, labels)
    num_steps, num_examples = logits.shape[:2]
    acc = per_step_accuracy(logits, labels)
    curve = threshold_curve(logits, labels, thresholds, first_step=first_step)
    # Answering at once (step 0) is always possible, so the area starts from step 0's accuracy rather than
    # extending the policy's first point back to time 0 (which would credit steps the policy skips).
    anchored = curve if first_step == 0 else {
        "mean_step": [0.0, *curve["mean_step"]], "accuracy": [float(acc[0]), *curve["accuracy"]]
    }  # fmt: skip
    return {
        "num_steps": int(num_steps),
        "num_examples": int(num_examples),
        "accuracy_per_step": [float(a) for a in acc],
        "anytime_auc": anytime_auc(acc),
        "threshold_curve": curve,
        "threshold_auc": threshold_auc(anchored, num_steps),
        "steps_to_50pct_final": steps_to_fraction(acc, 0.5),
        "steps_to_95pct_final": steps_to_fraction(acc, 0.95),
        "final_accuracy": float(acc[-1]),
        "policy_first_step": int(first_step),
    }
