"""cascadenet.evaluation.statistics: the t tail against closed forms, the paired test, the bootstrap interval."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cascadenet.evaluation.statistics import (
    bootstrap_difference,
    compare,
    correct_at_budget,
    paired_t_test,
    t_two_sided_p,
)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 12.7, -4.0])
def test_t_tail_matches_closed_forms(t):
    assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(abs(t)), abs=1e-12)
    assert t_two_sided_p(t, 2) == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), abs=1e-12)


def test_t_tail_known_quantiles():
    # two-sided 5% critical values of Student's t (tables): df 1 12.706, 2 4.303, 10 2.228, 30 2.042
    for df, crit in ((1, 12.706), (2, 4.303), (10, 2.228), (30, 2.042)):
        assert t_two_sided_p(crit, df) == pytest.approx(0.05, abs=2e-4)
    assert t_two_sided_p(math.inf, 3) == 0.0


def test_paired_t_test():
    r = paired_t_test([0.9, 0.8, 0.7], [0.8, 0.75, 0.55])
    d = np.array([0.1, 0.05, 0.15])
    t = d.mean() / (d.std(ddof=1) / math.sqrt(3))
    assert r["mean"] == pytest.approx(0.1) and r["t"] == pytest.approx(t)
    assert r["p"] == pytest.approx(t_two_sided_p(t, 2))
    assert paired_t_test([0.5], [0.4])["p"] is None
    assert paired_t_test([0.5, 0.6], [0.4, 0.5])["p"] == 0.0  # the same difference twice
    assert paired_t_test([0.5, 0.6], [0.5, 0.6])["p"] == 1.0
    # two models at chance the same way, up to floating-point rounding: no difference, not a certain one
    assert paired_t_test([0.1, 0.1], [1 / 10 + 1e-17, 1000 / 10000])["p"] == 1.0
    with pytest.raises(ValueError, match="equally long"):
        paired_t_test([0.5, 0.6], [0.4])


def test_bootstrap_interval_covers_the_difference_and_excludes_zero_only_when_it_should():
    rng = np.random.default_rng(1)
    a = (rng.random(4000) < 0.9).astype(float)
    b = (rng.random(4000) < 0.8).astype(float)
    r = bootstrap_difference(a, b, resamples=500)
    assert r["low"] < r["difference"] < r["high"] and r["low"] > 0
    # the standard error of a paired difference of two independent Bernoullis: the interval is about +-1.96 se
    se = math.sqrt((0.9 * 0.1 + 0.8 * 0.2) / 4000)
    assert r["high"] - r["low"] == pytest.approx(2 * 1.96 * se, rel=0.2)
    same = bootstrap_difference(a, a, resamples=100)
    assert same["low"] == same["high"] == 0.0
    # reproducible, and seeds (rows) are averaged first
    assert bootstrap_difference(a, b, resamples=50) == bootstrap_difference(a, b, resamples=50)
    two = bootstrap_difference(np.stack([a, a]), np.stack([b, b]), resamples=50)
    assert two["difference"] == pytest.approx(a.mean() - b.mean())


def test_correct_at_budget_and_compare():
    correct = np.array([[0, 1, 0, 0], [1, 1, 1, 0]])
    assert correct_at_budget(correct, [2.0, 5.0], 1.0, 10).tolist() == [0.1] * 4  # before the first exit: chance
    assert correct_at_budget(correct, [2.0, 5.0], 4.9, 10).tolist() == [0, 1, 0, 0]
    assert correct_at_budget(correct, [2.0, 5.0], 9.0, 10).tolist() == [1, 1, 1, 0]
    rng = np.random.default_rng(0)
    a, b = (rng.random((2, 3000)) < 0.9).astype(float), (rng.random((2, 3000)) < 0.5).astype(float)
    verdict = compare([0.91, 0.89], [0.5, 0.49], a, b, resamples=200)
    assert verdict["significant"] and verdict["paired"]["p"] < 0.05
    noisy = compare([0.91, 0.5], [0.5, 0.9], a, b, resamples=200)  # the seeds disagree: not significant
    assert not noisy["significant"]
