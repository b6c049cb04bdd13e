"""Scores of an anytime model's output trace for out-of-distribution detection, and the metrics that judge them
(``cascadenet.properties.ood`` runs them on a trained run).

A cascade produces a prediction at every step, so an input leaves a *trace*: how confident each exit is, how
often the prediction changes, when it settles. The scores here are computed from that trace.

Conventions (fixed here, since libraries differ):

- in-distribution is the positive class, and every score is oriented so that higher means "more
  in-distribution" (an entropy enters as minus the entropy, a settling step as minus the step);
- AUROC is the Mann-Whitney statistic: the probability that a random in-distribution example scores above a
  random out-of-distribution one, ties counting one half (so a constant score has AUROC 0.5 exactly);
- FPR at 95% TPR (ODIN, Liang et al. 2018): the threshold is the highest one that still accepts
  (``score >= threshold``) at least 95% of the in-distribution examples, i.e. the ``ceil(0.95 n)``-th largest
  in-distribution score; the FPR is the share of out-of-distribution examples it accepts (ties accepted);
- the exits before ``model.first_informative_exit`` cannot see the input and are left out of every trace.

Scores (:data:`SCORES`): the last exit's maximum softmax probability (MSP, the baseline of Hendrycks & Gimpel
2017), MSP averaged over the exits, minus the last and the mean entropy, minus the settling step, minus the
number of prediction flips, the energy score (log-sum-exp of the last exit's logits), and a logistic regression on
trace features (:class:`LogisticDetector`), with its ablation on the last exit's features only (``learned_last``,
:func:`last_exit_features`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BASELINE",
    "SCORES",
    "TPR",
    "LogisticDetector",
    "auroc",
    "fpr_at_tpr",
    "last_exit_features",
    "roc_curve",
    "settle_steps",
    "step_profiles",
    "trace_features",
    "trace_scores",
]

# Every score is higher for in-distribution inputs.
SCORES: dict[str, str] = {
    "msp": "max softmax probability at the last exit (the MSP baseline)",
    "msp_mean": "max softmax probability averaged over the exits",
    "entropy_last": "minus the entropy of the last exit's softmax",
    "entropy_mean": "minus the softmax entropy averaged over the exits",
    "settle": "minus the exit from which the prediction never changes again",
    "flips": "minus the number of prediction changes from one exit to the next",
    "energy": "log-sum-exp of the last exit's logits (minus the free energy; Liu et al. 2020)",
    "learned": "logistic regression on trace features (fitted on other OOD sources)",
    "learned_last": "the same logistic regression on the last exit's features only (MSP, entropy), fitted on the "
    "same sets: what the trace adds beyond the last exit is learned minus learned_last",
}
BASELINE = "msp"
TPR = 0.95


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def _pair(in_scores: Any, out_scores: Any) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(in_scores, dtype=np.float64).ravel()
    b = np.asarray(out_scores, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        raise ValueError("AUROC and FPR need at least one in-distribution and one out-of-distribution score")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("scores must be finite numbers (got NaN or infinity)")
    return a, b


def auroc(in_scores: Any, out_scores: Any) -> float:
    """Area under the ROC curve, in-distribution positive: P(in > out) + P(in = out) / 2 over all pairs, the
    Mann-Whitney U statistic divided by ``n_in * n_out`` (from average ranks, so ties count one half)."""
    a, b = _pair(in_scores, out_scores)
    _, inverse, counts = np.unique(np.concatenate([a, b]), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2)[inverse]  # 1-based ranks, tied values sharing their average
    u = ranks[: a.size].sum() - a.size * (a.size + 1) / 2
    return float(u / (a.size * b.size))


def fpr_at_tpr(in_scores: Any, out_scores: Any, tpr: float = TPR) -> float:
    """False-positive rate at ``tpr`` true-positive rate (ODIN's FPR95 for 0.95), in-distribution positive.

    The threshold is the highest that accepts (``score >= threshold``) at least ``tpr`` of the in-distribution
    scores: the ``ceil(tpr * n_in)``-th largest of them. Returns the share of out-of-distribution scores it
    accepts (a tie with the threshold is accepted)."""
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    a, b = _pair(in_scores, out_scores)
    k = max(1, math.ceil(tpr * a.size - 1e-9))  # 0.95 * 20 is 19.000000000000004 in floating point
    threshold = np.sort(a)[::-1][k - 1]
    return float((b >= threshold).mean())


def roc_curve(in_scores: Any, out_scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, from (0, 0) to (1, 1), accepting ``score >= threshold``. Its
    trapezoid area is :func:`auroc` (a tie is a diagonal segment: half credit)."""
    a, b = _pair(in_scores, out_scores)
    thresholds = np.unique(np.concatenate([a, b]))[::-1]
    tpr = np.searchsorted(np.sort(-a), -thresholds, side="right") / a.size  # share of a >= threshold
    fpr = np.searchsorted(np.sort(-b), -thresholds, side="right") / b.size
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


# ----------------------------------------------------------------------------------------------------------------
# The trace


def step_profiles(logits: Tensor, first_exit: int = 0) -> dict[str, np.ndarray]:
    """Per exit from ``first_exit`` on, per example: ``msp`` (max softmax), ``entropy`` (nats) and ``pred``
    (argmax), each ``(S, N)`` with S = E - first_exit, from logits ``(E, N, C)``."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be (exits, examples, classes), got shape {tuple(logits.shape)}")
    if not 0 <= first_exit < logits.shape[0]:
        raise ValueError(f"first_exit {first_exit} is not one of the {logits.shape[0]} exits")
    log_p = torch.log_softmax(logits[first_exit:].double(), dim=-1)  # (S, N, C)
    p = log_p.exp()
    entropy = -(p * log_p).sum(-1)
    return {"msp": p.amax(-1).numpy(), "entropy": entropy.clamp_min(0).numpy(), "pred": p.argmax(-1).numpy()}


def settle_steps(preds: np.ndarray) -> np.ndarray:
    """For predictions ``(S, N)`` along the trace, the first index from which each example's prediction never
    changes again (0 when it never changes)."""
    changed = preds[1:] != preds[:-1]  # (S-1, N): changed[k] means the prediction changed at step k + 1
    if changed.shape[0] == 0:
        return np.zeros(preds.shape[1], dtype=np.int64)
    last = changed.shape[0] - np.argmax(changed[::-1], axis=0)  # the step of the last change
    return np.where(changed.any(axis=0), last, 0).astype(np.int64)


def trace_scores(logits: Tensor, first_exit: int = 0) -> dict[str, np.ndarray]:
    """The trace scores of :data:`SCORES` (all but ``learned``) of logits ``(E, N, C)``, each ``(N,)``, higher
    for in-distribution inputs."""
    prof = step_profiles(logits, first_exit)
    return {
        "msp": prof["msp"][-1],
        "msp_mean": prof["msp"].mean(0),
        "entropy_last": -prof["entropy"][-1],
        "entropy_mean": -prof["entropy"].mean(0),
        "settle": -settle_steps(prof["pred"]).astype(np.float64),
        "flips": -(prof["pred"][1:] != prof["pred"][:-1]).sum(0).astype(np.float64),
        "energy": torch.logsumexp(logits[-1].double(), dim=-1).numpy(),
    }


def trace_features(logits: Tensor, first_exit: int = 0) -> np.ndarray:
    """Features of the learned detector, ``(N, 2S + 2)``: the max softmax at each exit, the entropy at each exit
    (over log C, so in [0, 1]), the number of flips and the settling step (each over S - 1)."""
    prof = step_profiles(logits, first_exit)
    steps = max(prof["pred"].shape[0] - 1, 1)
    flips = (prof["pred"][1:] != prof["pred"][:-1]).sum(0) / steps
    settle = settle_steps(prof["pred"]) / steps
    entropy = prof["entropy"] / math.log(max(logits.shape[-1], 2))
    return np.concatenate([prof["msp"].T, entropy.T, flips[:, None], settle[:, None]], axis=1)


def last_exit_features(features: np.ndarray) -> np.ndarray:
    """The columns of :func:`trace_features` that describe the last exit alone (its max softmax and entropy),
    ``(N, 2)``: the learned detector's ablation without the trace."""
    features = np.asarray(features)
    steps = (features.shape[1] - 2) // 2
    return features[:, [steps - 1, 2 * steps - 1]]


@dataclasses.dataclass
class LogisticDetector:
    """Logistic regression on standardised features: ``score(x) = w . (x - mean) / std + b`` (the log-odds of
    in-distribution, so ranks never tie where a probability would round to 1)."""

    weight: np.ndarray
    bias: float
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, in_features: np.ndarray, out_features: np.ndarray, l2: float = 1e-3, steps: int = 50):
        """Fit in-distribution (label 1) against out-of-distribution (label 0) features, the two classes weighted
        equally whatever their sizes, with an L2 penalty ``l2 * |w|^2 / 2`` on the weights. Deterministic: Newton's
        method with backtracking from zero (the penalty makes the loss strictly convex, so separable data
        converges too); what varies with a seed is only the data it is given."""
        if len(in_features) == 0 or len(out_features) == 0:
            raise ValueError("the detector needs in-distribution and out-of-distribution examples to fit")
        x = np.concatenate([in_features, out_features]).astype(np.float64)
        mean, std = x.mean(0), x.std(0)
        std = np.where(std > 1e-12, std, 1.0)  # a constant feature stays 0 after standardising
        xb = np.concatenate([(x - mean) / std, np.ones((len(x), 1))], axis=1)  # the last column is the bias
        sign = np.concatenate([np.ones(len(in_features)), -np.ones(len(out_features))])  # +1 in, -1 out
        sample = np.concatenate([np.full(len(in_features), 0.5 / len(in_features)),
                                 np.full(len(out_features), 0.5 / len(out_features))])  # fmt: skip
        ridge = np.full(xb.shape[1], l2)
        ridge[-1] = 0.0  # the bias is not penalised

        def loss(theta: np.ndarray) -> float:
            return float(sample @ np.logaddexp(0.0, -sign * (xb @ theta)) + 0.5 * ridge @ theta**2)

        theta = np.zeros(xb.shape[1])
        for _ in range(steps):
            margin = sign * (xb @ theta)
            p_wrong = 0.5 * (1 - np.tanh(margin / 2))  # sigmoid(-margin), without overflow
            grad = xb.T @ (-sign * sample * p_wrong) + ridge * theta
            hess = (xb.T * (sample * p_wrong * (1 - p_wrong))) @ xb + np.diag(ridge + 1e-12)
            step = np.linalg.solve(hess, grad)
            rate, current = 1.0, loss(theta)
            while loss(theta - rate * step) > current - 1e-4 * rate * (grad @ step) and rate > 1e-8:
                rate /= 2
            theta = theta - rate * step
            if np.abs(rate * step).max() < 1e-10:
                break
        return cls(theta[:-1].copy(), float(theta[-1]), mean, std)

    def score(self, features: np.ndarray) -> np.ndarray:
        """The log-odds of in-distribution for each row of ``features``."""
        return ((np.asarray(features, dtype=np.float64) - self.mean) / self.std) @ self.weight + self.bias
