"""Anytime-prediction metrics computed from a trajectory of logits.

An anytime classifier emits logits at every internal time step, giving a trajectory of shape (T, N, C): T steps,
N examples, C classes, step 0 first. Everything here works in numpy and accepts numpy arrays or torch tensors.
"Step" and "exit" are the same thing here: a multi-exit network's exit e is step e of its trajectory.

Three areas summarise a trajectory (evaluate.py's docstring and the README define them for users):

- ``anytime_auc``: trapezoid of accuracy against ``t / (T - 1)``; kept as the first release defined it, but it
  treats every step as equally expensive, so it cannot compare models whose exits cost different amounts;
- ``absolute_cost_auc``: the area under "at budget b you hold the answer of the last exit completed within b;
  before the first exit, chance (1 / num_classes); after the last exit, its answer" over one absolute range
  [0, max_cost] shared by every model compared (e.g. the largest full cost among them), divided by max_cost.
  This is the comparison across models and families: every model is judged on the same axis, and a model that
  spends more is not rewarded for stretching its own.
- ``cost_auc``: the same step function over the model's own range [0, its last exit's cost], normalised by that
  cost. Each model gets its own axis, so it describes one model's shape and must not be compared across models
  whose full costs differ (a model that spends more stretches its axis and looks better).
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

__all__ = [
    "BUDGET_Q",
    "FALLBACKS",
    "absolute_cost_auc",
    "accuracy_at_budgets",
    "anytime_auc",
    "apply_thresholds",
    "budget_exit_fractions",
    "budgeted_curve",
    "cost_auc",
    "cost_summary",
    "first_step_reaching",
    "fit_budget_thresholds",
    "mean_confidence_per_step",
    "normalized_time",
    "per_step_accuracy",
    "steps_to_fraction",
    "summarize",
    "threshold_auc",
    "threshold_curve",
]

# What an example that passes no exit's threshold answers: the last exit's prediction (this project's default,
# and what every report uses), or the prediction of its most confident exit (SDN's reference code). Either way it
# has run every exit, so its cost is the last exit's.
FALLBACKS = ("last", "most-confident")

# The budgeted-batch protocol's grid (MSDNet, adaptive_inference.py): q = p / 20 for p = 1..39, so exit
# fractions range from "almost everyone at the first exit" (q = 0.05) to "almost everyone at the last" (1.95).
BUDGET_Q: tuple[float, ...] = tuple(p / 20 for p in range(1, 40))

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


def _check_logits(logits: Any, name: str = "logits") -> np.ndarray:
    """Validates and converts a logit trajectory of shape (T, N, C) that comes without labels."""
    logits = _to_numpy(logits)
    if logits.ndim != 3:
        raise ValueError(f"{name} must have shape (T, N, C), got ndim={logits.ndim} with shape {logits.shape}")
    if 0 in logits.shape:
        raise ValueError(f"{name} must be non-empty, got shape {logits.shape}")
    if not np.issubdtype(logits.dtype, np.floating) and not np.issubdtype(logits.dtype, np.integer):
        raise ValueError(f"{name} must be real numbers, got dtype {logits.dtype}")
    if not np.all(np.isfinite(logits)):
        raise ValueError(f"{name} contain NaN or infinite values")
    return logits


def _check_costs(costs: Any, num_steps: int, name: str = "costs", monotone: bool = True) -> np.ndarray:
    """Validates per-exit costs: one finite value >= 0 per step, non-decreasing when ``monotone`` (cumulative
    costs: an exit never costs less than the exits before it)."""
    c = np.asarray(_to_numpy(costs), dtype=np.float64)
    if c.ndim != 1 or c.size != num_steps:
        raise ValueError(f"{name} must have one entry per step ({num_steps}), got shape {c.shape}")
    if not np.all(np.isfinite(c)) or c.min() < 0.0:
        raise ValueError(f"{name} must be finite and >= 0, got {c.tolist()}")
    if monotone and np.any(np.diff(c) < 0):
        raise ValueError(f"{name} must be cumulative (non-decreasing from exit to exit), got {c.tolist()}")
    return c


def _check_num_classes(num_classes: int) -> int:
    """Validates a class count (chance accuracy is 1 / num_classes)."""
    try:
        n = operator.index(num_classes)
    except TypeError:
        raise ValueError(f"num_classes must be an integer, got {num_classes!r}") from None
    if n < 1:
        raise ValueError(f"num_classes must be >= 1, got {n}")
    return n


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
    out = np.empty(logits.shape[:2])
    for t, step in enumerate(logits):  # one step at a time: a float64 copy of all of (T, N, C) can be gigabytes
        shifted = step.astype(np.float64) - step.max(axis=1, keepdims=True).astype(np.float64)  # (N, C)
        out[t] = 1.0 / np.exp(shifted).sum(axis=1)
    return out  # (T, N)


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


def _check_fallback(fallback: str) -> str:
    if fallback not in FALLBACKS:
        raise ValueError(f"unknown fallback {fallback!r}; valid choices: {', '.join(FALLBACKS)}")
    return fallback


def threshold_curve(
    logits: Any, labels: Any, thresholds: Any = None, first_step: int = 0, fallback: str = "last"
) -> dict[str, list[float]]:
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
        fallback: the answer of an example no step stops (``FALLBACKS``): the last step's (default) or that of its
            most confident step from ``first_step`` on (SDN's reference); it stops at the last step either way.

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
    _check_fallback(fallback)
    correct = logits.argmax(axis=2) == labels  # (T, N)
    conf = _max_softmax(logits[first_step:])  # (T - first_step, N)
    running_conf = np.maximum.accumulate(conf, axis=0)
    examples = np.arange(num_examples)
    confident = first_step + conf.argmax(axis=0)  # each example's most confident step

    mean_step, accuracy = [], []
    for threshold in q:
        passes = running_conf[-1] >= threshold  # some step stops the example
        stop = first_step + np.minimum((running_conf < threshold).sum(axis=0), num_steps - 1 - first_step)  # (N,)
        answer = stop if fallback == "last" else np.where(passes, stop, confident)
        mean_step.append(float(stop.mean()))
        accuracy.append(float(correct[answer, examples].mean()))
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


def mean_confidence_per_step(logits: Any) -> np.ndarray:
    """Mean over examples of the max softmax probability at each step.

    Args:
        logits: Trajectory of shape (T, N, C).

    Returns:
        Shape (T,) array in [1 / C, 1].

    Raises:
        ValueError: If the logits are malformed.
    """
    return _max_softmax(_check_logits(logits)).mean(axis=1)


def _anytime_step(acc: np.ndarray, costs: np.ndarray, budgets: np.ndarray, chance: float) -> np.ndarray:
    """Accuracy held at each budget: that of the last exit whose cost is <= the budget, else chance.

    ``searchsorted(side="right")`` counts the exits whose cost is <= b, so among exits of equal cost the later one
    counts as completed (it is free once the earlier one is done).
    """
    done = np.searchsorted(costs, budgets, side="right")  # exits completed within each budget
    return np.where(done > 0, acc[np.maximum(done - 1, 0)], chance)


def accuracy_at_budgets(accuracy_per_step: Any, costs: Any, budgets: Any, num_classes: int) -> np.ndarray:
    """Anytime accuracy at absolute cost budgets: the accuracy of the last exit completed within each budget, or
    chance (1 / num_classes) for a budget below the first exit's cost.

    Args:
        accuracy_per_step: Accuracy in [0, 1] at each step, shape (T,).
        costs: Cumulative cost of producing each step (e.g. MACs), non-decreasing, shape (T,).
        budgets: Budgets in the same unit as ``costs`` (finite, >= 0), any order.
        num_classes: Number of classes (chance accuracy is its inverse).

    Returns:
        The accuracy at each budget, in the budgets' order.

    Raises:
        ValueError: If the inputs are malformed.
    """
    acc = _check_accuracy(accuracy_per_step)
    c = _check_costs(costs, acc.size)
    b = np.asarray(_to_numpy(budgets), dtype=np.float64)
    if b.ndim != 1 or b.size == 0 or not np.all(np.isfinite(b)) or b.min() < 0.0:
        raise ValueError(f"budgets must be a non-empty 1-D sequence of finite numbers >= 0, got {b.tolist()}")
    return _anytime_step(acc, c, b, 1.0 / _check_num_classes(num_classes))


def cost_auc(accuracy_per_step: Any, costs: Any, num_classes: int) -> float:
    """Area under anytime accuracy against cost normalised by the last exit's cost, over budgets in [0, 1].

    At budget b you hold the answer of the last exit completed within b (cost <= b); before the first exit, chance
    (1 / num_classes). The curve is that step function, so the area is exact:
    ``chance * c[0] + sum_k acc[k] * (c[k+1] - c[k])`` with ``c = costs / costs[-1]``. The last exit completes at
    b = 1 and adds no area; an exit of cost 0 (a cascade's step 0 in MACs) is held from b = 0, with no chance part.
    When the last exit costs nothing, every exit is complete at once and the area is the last exit's accuracy.

    Args:
        accuracy_per_step: Accuracy in [0, 1] at each step, shape (T,).
        costs: Cumulative cost of each step (MACs, latency), non-decreasing, shape (T,).
        num_classes: Number of classes.

    Returns:
        The area, in [0, 1].

    Raises:
        ValueError: If the inputs are malformed.
    """
    acc = _check_accuracy(accuracy_per_step)
    c = _check_costs(costs, acc.size)
    chance = 1.0 / _check_num_classes(num_classes)
    if c[-1] == 0.0:
        return float(acc[-1])
    c = c / c[-1]
    return float(chance * c[0] + np.sum(acc[:-1] * np.diff(c)))


def absolute_cost_auc(accuracy_per_step: Any, costs: Any, num_classes: int, max_cost: float) -> float:
    """Area under anytime accuracy against absolute cost over [0, max_cost], divided by max_cost.

    At budget b you hold the answer of the last exit completed within b (cost <= b); before the first exit,
    chance (1 / num_classes); after the last exit, the last exit's answer. Exits beyond ``max_cost`` are never
    reached. With one ``max_cost`` for every model compared, the areas share one axis (unlike ``cost_auc``).
    ``absolute_cost_auc(acc, c, n, c[-1]) == cost_auc(acc, c, n)`` when the last exit costs more than 0.

    Args:
        accuracy_per_step: Accuracy in [0, 1] at each step, shape (T,).
        costs: Cumulative cost of each step (MACs, latency), non-decreasing, shape (T,).
        num_classes: Number of classes.
        max_cost: The end of the shared range, a finite number > 0.

    Returns:
        The area, in [0, 1].

    Raises:
        ValueError: If the inputs are malformed or max_cost is not a finite number > 0.
    """
    acc = _check_accuracy(accuracy_per_step)
    c = _check_costs(costs, acc.size)
    chance = 1.0 / _check_num_classes(num_classes)
    if (
        isinstance(max_cost, bool)
        or not isinstance(max_cost, (int, float, np.number))
        or not (np.isfinite(max_cost) and max_cost > 0)
    ):
        raise ValueError(f"max_cost must be a finite number > 0, got {max_cost!r}")
    m = float(max_cost)
    x = np.minimum(np.append(c, max(m, c[-1])), m)  # each exit's start, clipped to the range; the last held to m
    return float((chance * x[0] + np.sum(acc * np.diff(x))) / m)


def first_step_reaching(accuracy_per_step: Any, target: float) -> int | None:
    """First step whose accuracy reaches an absolute target (e.g. 0.5 for 50% accuracy).

    Args:
        accuracy_per_step: Accuracy in [0, 1] at each step, shape (T,).
        target: Accuracy to reach, in [0, 1].

    Returns:
        The 0-based step, or None if no step reaches it.

    Raises:
        ValueError: If the accuracies are malformed or the target lies outside [0, 1].
    """
    acc = _check_accuracy(accuracy_per_step)
    if not np.isfinite(target) or not 0.0 <= target <= 1.0:
        raise ValueError(f"target must be an accuracy in [0, 1], got {target!r}")
    reached = acc >= target - _ATOL
    return int(reached.argmax()) if reached.any() else None


def cost_summary(
    accuracy_per_step: Any,
    macs: Any,
    latency: Any,
    num_classes: int,
    reference_macs: float | None = None,
    budget_fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0),
) -> dict[str, Any]:
    """The cost-aware metrics of a per-step accuracy curve, as plain JSON-serialisable Python types.

    Args:
        accuracy_per_step: Accuracy in [0, 1] at each step, shape (T,).
        macs: Cumulative serial multiply-accumulates per example of each step, shape (T,).
        latency: Parallel latency of each step (non-decreasing), shape (T,).
        num_classes: Number of classes (chance accuracy 1 / num_classes before the first exit).
        reference_macs: The full serial cost that the budgets are fractions of (another model's, to compare two
            models at equal absolute cost); defaults to this model's own full cost, ``macs[-1]``.
        budget_fractions: The budgets as fractions of ``reference_macs``.

    Returns:
        {"chance_accuracy", "macs_auc", "latency_auc", "steps_to_50pct_accuracy", "steps_to_95pct_accuracy",
        "macs_to_50pct_accuracy", "macs_to_95pct_accuracy", "latency_to_50pct_accuracy",
        "latency_to_95pct_accuracy", "accuracy_at_budget": {"reference_macs", "fractions", "macs", "accuracy"}}.
        A target never reached is None in all three of its keys.

    Raises:
        ValueError: If the inputs are malformed or reference_macs is not a positive number.
    """
    acc = _check_accuracy(accuracy_per_step)
    m = _check_costs(macs, acc.size, "macs")
    lat = _check_costs(latency, acc.size, "latency")
    num_classes = _check_num_classes(num_classes)
    if reference_macs is None:
        reference = float(m[-1])
    elif isinstance(reference_macs, bool) or not isinstance(reference_macs, (int, float, np.number)):
        raise ValueError(f"reference_macs must be a number > 0, got {reference_macs!r}")
    else:
        reference = float(reference_macs)
        if not np.isfinite(reference) or reference <= 0:
            raise ValueError(f"reference_macs must be a number > 0, got {reference_macs!r}")
    fractions = np.asarray(budget_fractions, dtype=np.float64)
    budgets = fractions * reference
    out: dict[str, Any] = {
        "chance_accuracy": 1.0 / num_classes,
        "macs_auc": cost_auc(acc, m, num_classes),
        "latency_auc": cost_auc(acc, lat, num_classes),
    }
    for pct in (50, 95):
        step = first_step_reaching(acc, pct / 100)
        out[f"steps_to_{pct}pct_accuracy"] = step
        out[f"macs_to_{pct}pct_accuracy"] = None if step is None else _plain_number(np.asarray(macs)[step])
        out[f"latency_to_{pct}pct_accuracy"] = None if step is None else float(lat[step])
    out["accuracy_at_budget"] = {
        "reference_macs": reference,
        "fractions": [float(f) for f in fractions],
        "macs": [float(b) for b in budgets],
        "accuracy": [float(a) for a in _anytime_step(acc, m, budgets, 1.0 / num_classes)],
    }
    return out


def _plain_number(x: Any) -> int | float:
    """A numpy or torch scalar as a Python int (integral types) or float."""
    x = np.asarray(_to_numpy(x))
    return int(x) if np.issubdtype(x.dtype, np.integer) else float(x)


def budget_exit_fractions(q: float, num_exits: int) -> np.ndarray:
    """Target fraction of examples exiting at each exit in the budgeted-batch protocol: P_k proportional to q^k for
    k = 1..K, normalised to sum to 1 (q < 1 favours early exits, q > 1 late ones, q = 1 is uniform).

    Args:
        q: The protocol's ratio, a finite number > 0.
        num_exits: K, the number of exits the examples may take.

    Returns:
        Shape (K,) array summing to 1.

    Raises:
        ValueError: If q or num_exits is invalid.
    """
    k = _check_num_steps(num_exits)
    if isinstance(q, bool) or not np.isfinite(q) or q <= 0:
        raise ValueError(f"q must be a finite number > 0, got {q!r}")
    log_w = np.arange(1, k + 1) * np.log(q)
    w = np.exp(log_w - log_w.max())  # in log space: q^k overflows for large K and q > 1
    return w / w.sum()


def fit_budget_thresholds(val_logits: Any, q: float, *, first_exit: int = 0) -> np.ndarray:
    """Per-exit confidence thresholds of the budgeted-batch protocol (MSDNet), fitted on held-out logits.

    With target fractions P = budget_exit_fractions(q, K) over the exits the examples may take, for each exit k but
    the last: walk the examples that have not exited yet in descending confidence (max softmax) at exit k, and set
    T_k to the confidence of the floor(N * P_k)-th one, N being the whole set; every remaining example whose
    confidence at k is >= T_k exits there (ties at T_k all exit, so slightly more than N * P_k may). If that rank
    is 0 or fewer examples remain, T_k = +inf (nobody exits at k). The last exit's threshold is -inf (everyone
    left exits there). Labels are not used: fit on the validation split, never on the split you report.

    Args:
        val_logits: Held-out trajectory of shape (K, N, C).
        q: The protocol's ratio (see budget_exit_fractions).
        first_exit: Exits before it get +inf (nobody exits there) and are not counted in K: a cascade's step 0
            with the stem delayed answers the same for every example, and its equal confidences would all tie.

    Returns:
        Shape (K,) float array of thresholds, +inf for exits nobody takes, -inf at the last exit.

    Raises:
        ValueError: If the inputs are malformed.
    """
    return _fit_thresholds(_max_softmax(_check_logits(val_logits, "val_logits")), q, first_exit)


def _fit_thresholds(conf: np.ndarray, q: float, first_exit: int) -> np.ndarray:
    """fit_budget_thresholds on the (K, N) confidences."""
    num_exits, n = conf.shape
    if not 0 <= first_exit < num_exits:
        raise ValueError(f"first_exit must be in [0, {num_exits}), got {first_exit}")
    fractions = budget_exit_fractions(q, num_exits - first_exit)
    thresholds = np.full(num_exits, np.inf)
    exited = np.zeros(n, dtype=bool)
    for j, k in enumerate(range(first_exit, num_exits - 1)):
        # N * P_k may land a hair below a whole number (0.2 * 10 == 2.0000000000000004, 0.7 * 10 < 7): the slack
        # makes the floor that of the exact product.
        rank = int(np.floor(n * fractions[j] + 1e-9))
        remaining = np.sort(conf[k, ~exited])[::-1]  # descending
        if 0 < rank <= remaining.size:
            thresholds[k] = remaining[rank - 1]
        exited |= conf[k] >= thresholds[k]
    thresholds[-1] = -np.inf
    return thresholds


def apply_thresholds(
    test_logits: Any, labels: Any, thresholds: Any, costs: Any, fallback: str = "last"
) -> dict[str, Any]:
    """Each example exits at the first exit whose confidence (max softmax) is >= its threshold and answers with
    that exit's argmax; an example that passes none exits at the last exit and answers with the last exit's
    argmax (``fallback="last"``, the default) or its most confident exit's (``"most-confident"``, SDN's reference).

    Args:
        test_logits: Trajectory of shape (K, N, C).
        labels: Integer class labels of shape (N,).
        thresholds: One threshold per exit (may be +inf or -inf; not NaN), shape (K,).
        costs: Cumulative cost of each exit (e.g. MACs), finite and >= 0, shape (K,).

    Returns:
        {"accuracy": correct / N, "mean_cost": sum_k (fraction exiting at k) * costs[k],
        "exit_fractions": fraction of examples exiting at each exit}.

    Raises:
        ValueError: If the inputs are malformed.
    """
    logits, labels = _check_trajectory(test_logits, labels)
    num_exits, n = logits.shape[:2]
    t = np.asarray(_to_numpy(thresholds), dtype=np.float64)
    if t.shape != (num_exits,) or np.any(np.isnan(t)):
        raise ValueError(f"thresholds must be {num_exits} numbers (one per exit, no NaN), got {t.tolist()}")
    c = _check_costs(costs, num_exits, monotone=False)
    return _apply(_max_softmax(logits), logits.argmax(axis=2), labels, t, c, _check_fallback(fallback))


def _apply(
    conf: np.ndarray, pred: np.ndarray, labels: np.ndarray, t: np.ndarray, c: np.ndarray, fallback: str = "last",
    first_exit: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """apply_thresholds on the (K, N) confidences and predictions (the most confident fallback chooses among the
    exits from ``first_exit`` on)."""
    num_exits, n = conf.shape
    passes = conf >= t[:, None]  # (K, N)
    any_pass = passes.any(axis=0)
    exit_at = np.where(any_pass, passes.argmax(axis=0), num_exits - 1)  # (N,)
    answer = exit_at if fallback == "last" else np.where(any_pass, exit_at, first_exit + conf[first_exit:].argmax(0))
    correct = pred[answer, np.arange(n)] == labels
    fractions = np.bincount(exit_at, minlength=num_exits) / n
    return {
        "accuracy": float(correct.mean()),
        "mean_cost": float(fractions @ c),
        "exit_fractions": [float(f) for f in fractions],
    }


def budgeted_curve(
    val_logits: Any,
    test_logits: Any,
    test_labels: Any,
    costs: Any,
    *,
    first_exit: int = 0,
    q: Any = BUDGET_Q,
    fallback: str = "last",
) -> dict[str, list]:
    """The budgeted-batch accuracy/cost curve: for each q, thresholds fitted on ``val_logits``
    (fit_budget_thresholds), applied to the test split (apply_thresholds).

    Args:
        val_logits: Held-out trajectory (K, N_val, C) the thresholds are fitted on (its labels are not needed).
        test_logits: Trajectory (K, N, C) the curve is measured on.
        test_labels: Labels (N,) of test_logits.
        costs: Cumulative cost of each exit, shape (K,).
        first_exit: Exits before it are never taken (see fit_budget_thresholds).
        q: The ratios, by default the protocol's p / 20 for p = 1..39.
        fallback: what an example that passes no threshold answers (``FALLBACKS``; see apply_thresholds).

    Returns:
        {"q", "accuracy", "mean_cost", "exit_fractions"}: per q, the test accuracy, the mean cost per example and
        the fraction of examples exiting at each exit.

    Raises:
        ValueError: If the inputs are malformed or the two trajectories differ in exits or classes.
    """
    val = _check_logits(val_logits, "val_logits")
    test, labels = _check_trajectory(test_logits, test_labels)
    if val.shape[0] != test.shape[0] or val.shape[2] != test.shape[2]:
        raise ValueError(
            f"val_logits (exits, classes) = {(val.shape[0], val.shape[2])} differ from test_logits "
            f"{(test.shape[0], test.shape[2])}"
        )
    c = _check_costs(costs, test.shape[0], monotone=False)
    _check_fallback(fallback)
    qs = np.asarray(q, dtype=np.float64).reshape(-1)
    # the confidences once, not once per q
    val_conf, test_conf, test_pred = _max_softmax(val), _max_softmax(test), test.argmax(axis=2)
    out: dict[str, list] = {"q": [], "accuracy": [], "mean_cost": [], "exit_fractions": []}
    for ratio in qs:
        thresholds = _fit_thresholds(val_conf, float(ratio), first_exit)
        point = _apply(test_conf, test_pred, labels, thresholds, c, fallback, first_exit)
        out["q"].append(float(ratio))
        out["accuracy"].append(point["accuracy"])
        out["mean_cost"].append(point["mean_cost"])
        out["exit_fractions"].append(point["exit_fractions"])
    return out


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
        "steps_to_50pct_final", "steps_to_95pct_final", "final_accuracy", "policy_first_step",
        "mean_confidence_per_step"}.

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
        "mean_confidence_per_step": [float(c) for c in mean_confidence_per_step(logits)],
    }
