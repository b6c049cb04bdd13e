"""Uncertainty of a difference between two models measured on the same test examples with the same seeds.

Two complementary views (``cascadenet reproduce`` reports both for its headline comparisons):

- ``paired_t_test``: the per-seed differences (seed s of model A against seed s of model B), their mean and a
  two-sided paired t-test: the variation from one training run to the next. With 2 or 3 seeds the test has 1 or
  2 degrees of freedom, so only large, consistent differences reach p < 0.05.
- ``bootstrap_difference``: a percentile bootstrap confidence interval over test examples of the difference in
  accuracy (averaged over seeds), the examples resampled with replacement, the same draw for both models (the
  comparison is paired): the variation from the finite test set.

A difference is called significant when the bootstrap interval excludes 0 and the paired test gives p < alpha;
either alone is reported as well. Plain numpy; no SciPy (the t distribution's tail is the regularised
incomplete beta function, computed here by its continued fraction).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["bootstrap_difference", "compare", "correct_at_budget", "paired_t_test", "t_two_sided_p"]


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """Two-sided tail probability of Student's t with ``df`` degrees of freedom: P(|T| >= |t|)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if math.isinf(t):
        return 0.0
    if math.isnan(t):
        return float("nan")
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def paired_t_test(a: Any, b: Any) -> dict[str, Any]:
    """Per-seed paired differences ``a[s] - b[s]``: their mean, standard deviation, t statistic and two-sided
    p-value (None with fewer than 2 seeds; 0 when every difference is the same non-zero number, 1 when all are 0).

    Raises:
        ValueError: if the two sequences differ in length or are empty.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError(f"paired values must be two equally long non-empty lists, got {x.shape} and {y.shape}")
    d = x - y
    n = d.size
    out: dict[str, Any] = {"n": int(n), "differences": d.tolist(), "mean": float(d.mean())}
    if n < 2:
        return {**out, "sd": None, "t": None, "p": None}
    sd = float(d.std(ddof=1))
    if sd <= 1e-12 * max(1.0, float(np.abs(d).max())):  # equal differences, up to rounding
        t = 0.0 if abs(d.mean()) <= 1e-12 else math.copysign(math.inf, d.mean())
    else:
        t = float(d.mean() / (sd / math.sqrt(n)))
    return {**out, "sd": sd, "t": t, "p": t_two_sided_p(t, n - 1)}


def bootstrap_difference(
    correct_a: Any, correct_b: Any, *, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Percentile bootstrap interval over examples of mean(correct_a) - mean(correct_b).

    Args:
        correct_a, correct_b: per example (and optionally per seed, shape ``(S, N)``) whether the model was right:
            0/1, or a probability (chance where no exit had completed); seeds are averaged first.
        resamples: bootstrap draws of N examples with replacement (the same draw for both models).
        level: the interval's coverage.
        seed: the draws' random seed (the interval is reproducible).

    Returns:
        {"difference", "low", "high", "level", "resamples"}.
    """
    a, b = np.atleast_2d(np.asarray(correct_a, np.float64)), np.atleast_2d(np.asarray(correct_b, np.float64))
    if a.shape[1:] != b.shape[1:] or a.shape[1] == 0:
        raise ValueError(f"the two models must be scored on the same examples, got {a.shape} and {b.shape}")
    if not 0.0 < level < 1.0 or resamples < 1:
        raise ValueError(f"level must be in (0, 1) and resamples >= 1, got {level} and {resamples}")
    diff = a.mean(axis=0) - b.mean(axis=0)  # (N,)
    n = diff.size
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // n)
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        means[start:stop] = diff[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return {"difference": float(diff.mean()), "low": float(low), "high": float(high), "level": level,
            "resamples": int(resamples)}  # fmt: skip


def correct_at_budget(correct: Any, costs: Any, budget: float, num_classes: int) -> np.ndarray:
    """Per example, whether the answer held at ``budget`` is right: the last exit whose cost is <= budget, or
    chance (1 / num_classes) before the first exit. ``correct`` is ``(E, N)`` (per exit and example)."""
    c = np.asarray(correct, dtype=np.float64)
    k = int(np.searchsorted(np.asarray(costs, np.float64), budget + 1e-9, side="right")) - 1
    return np.full(c.shape[1], 1.0 / num_classes) if k < 0 else c[k]


def compare(
    per_seed_a: list[float], per_seed_b: list[float], correct_a: Any, correct_b: Any, *, alpha: float = 0.05,
    resamples: int = 2000,
) -> dict[str, Any]:  # fmt: skip
    """One comparison: the paired per-seed test, the bootstrap interval over examples, and the verdict
    (significant: the interval excludes 0 and p < alpha; p is None with one seed, and then the interval alone)."""
    test = paired_t_test(per_seed_a, per_seed_b)
    boot = bootstrap_difference(correct_a, correct_b, resamples=resamples)
    outside = boot["low"] > 0 or boot["high"] < 0
    significant = outside and (test["p"] is None or test["p"] < alpha)
    return {"paired": test, "bootstrap": boot, "significant": bool(significant), "alpha": alpha}
