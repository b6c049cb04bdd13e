"""Risk-controlled early-exit thresholds: the most aggressive confidence threshold whose risk is at most ``eps``
with probability at least ``1 - delta``, distribution-free (Learn-then-Test, Angelopoulos et al. 2021; applied to
early exit by Jazbec et al., "Fast yet Safe: Early-Exiting with Risk Control", NeurIPS 2024).

- Exit rule: one threshold lambda; an example leaves at the first exit ``>= first_exit`` whose confidence (max
  softmax of the outputs read, see ``cascadenet.evaluation.outputs``) is ``>= lambda``, else at the last exit.
- Two risks, each a 0/1 loss per example, so the risk is a probability:
  ``disagreement``: the early prediction differs from the last exit's (needs no labels, also at deployment);
  ``accuracy-drop``: the last exit is right and the early one wrong (max(0, correct_last - correct_early); its
  mean is at least the drop in accuracy).
- Calibration: on ``n`` held-out examples (the validation split), each threshold lambda of a grid ordered from the
  most conservative (1, then down to 0) is a hypothesis H_lambda: R(lambda) > eps, with the exact binomial
  p-value ``P(Binomial(n, eps) <= k)`` for k losses observed (valid for 0/1 losses: under H_lambda the count is
  stochastically larger). ``fixed-sequence`` testing walks the grid and stops at the first p-value above delta;
  ``bonferroni`` keeps every lambda with p <= delta / |grid|. Either way the family-wise error is at most delta, so
  the chosen (smallest kept) lambda has P(R(lambda) <= eps) >= 1 - delta over draws of the calibration set (i.i.d.
  or exchangeable with the test data). When no lambda is kept, every example runs to the last exit (risk 0).
- ``resplit_check``: the guarantee checked empirically on a finite pool of held-out examples (see its docstring
  for what a re-split can and cannot show).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "METHODS",
    "RISKS",
    "apply_threshold",
    "binomial_p_values",
    "example_losses",
    "resplit_check",
    "risk_controlled_threshold",
    "threshold_grid",
]

RISKS = ("disagreement", "accuracy-drop")
METHODS = ("fixed-sequence", "bonferroni")


def threshold_grid() -> np.ndarray:
    """The thresholds tried, most conservative first: 1, values crowding towards 1 (0.999999 ... 0.99), then
    0.99 ... 0 in steps of 0.01."""
    grid = np.unique(np.concatenate([np.linspace(0.0, 1.0, 101), 1.0 - np.geomspace(1e-2, 1e-6, 41)]))
    return grid[::-1].copy()


def _check(eps: float, delta: float, risk: str, method: str) -> None:
    for name, v in (("eps", eps), ("delta", delta)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
            raise ValueError(f"--{'risk' if name == 'eps' else name} must be a number in (0, 1), got {v!r}")
    if risk not in RISKS:
        raise ValueError(f"unknown risk {risk!r}; valid choices: {', '.join(RISKS)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid choices: {', '.join(METHODS)}")


def _confidence_and_prediction(logits: Any) -> tuple[np.ndarray, np.ndarray]:
    z = torch.as_tensor(logits)
    if z.dim() != 3:
        raise ValueError(f"logits must be (E, N, C), got shape {tuple(z.shape)}")
    conf, pred = z.double().softmax(-1).max(-1)
    return conf.numpy(), pred.numpy()


def _exits(conf: np.ndarray, thresholds: np.ndarray, first_exit: int) -> np.ndarray:
    """``(G, N)`` exit of every example under each threshold."""
    num_exits = conf.shape[0]
    if not 0 <= first_exit < num_exits:
        raise ValueError(f"first_exit must be in [0, {num_exits}), got {first_exit}")
    out = np.empty((len(thresholds), conf.shape[1]), dtype=np.int64)
    tail = conf[first_exit:-1]  # the exits an example may leave at early
    for g, lam in enumerate(thresholds):
        passes = tail >= lam
        out[g] = np.where(passes.any(axis=0), first_exit + passes.argmax(axis=0), num_exits - 1)
    return out


def example_losses(logits: Any, labels: Any, thresholds: Any, *, first_exit: int = 0, risk: str = "disagreement"):
    """``(losses, exits)``: the 0/1 loss ``(G, N)`` of every example under each threshold and its exit ``(G, N)``.
    ``labels`` may be None for the disagreement risk."""
    if risk not in RISKS:
        raise ValueError(f"unknown risk {risk!r}; valid choices: {', '.join(RISKS)}")
    conf, pred = _confidence_and_prediction(logits)
    exits = _exits(conf, np.asarray(thresholds, dtype=np.float64), first_exit)
    early = np.take_along_axis(pred, exits, axis=0) if exits.size else exits  # (G, N)
    final = pred[-1]
    if risk == "disagreement":
        return early != final, exits
    if labels is None:
        raise ValueError("the accuracy-drop risk needs labels")
    y = np.asarray(torch.as_tensor(labels).cpu().numpy())
    return (final == y) & (early != y), exits


def binomial_p_values(counts: Any, n: int, eps: float) -> np.ndarray:
    """``P(Binomial(n, eps) <= k)`` for each count k: the p-value of H: risk > eps after k losses in n examples."""
    return np.exp(_binomial_log_cdf(int(n), float(eps))[np.asarray(counts, dtype=np.int64)])


@functools.lru_cache(maxsize=64)
def _binomial_log_cdf(n: int, eps: float) -> np.ndarray:
    """``log P(Binomial(n, eps) <= k)`` for k = 0..n (computed once per (n, eps): the re-split check asks often)."""
    i = torch.arange(n + 1, dtype=torch.float64)
    log_pmf = (torch.lgamma(torch.tensor(n + 1.0, dtype=torch.float64)) - torch.lgamma(i + 1) - torch.lgamma(n - i + 1)
               + i * np.log(eps) + (n - i) * np.log1p(-eps))  # fmt: skip
    out = torch.logcumsumexp(log_pmf, 0).clamp(max=0.0).numpy()
    out.setflags(write=False)
    return out


def _choose(p_values: np.ndarray, delta: float, method: str) -> int | None:
    """Index of the chosen (last kept) threshold of the ordered grid, or None when none is kept."""
    if method == "fixed-sequence":
        failed = np.flatnonzero(p_values > delta)
        last = (failed[0] if failed.size else len(p_values)) - 1
        return int(last) if last >= 0 else None
    kept = np.flatnonzero(p_values <= delta / len(p_values))
    return int(kept[-1]) if kept.size else None


def risk_controlled_threshold(
    logits: Any,
    labels: Any = None,
    *,
    eps: float,
    delta: float,
    risk: str = "disagreement",
    first_exit: int = 0,
    method: str = "fixed-sequence",
    thresholds: Sequence[float] | None = None,
) -> dict[str, Any]:
    """The most aggressive threshold whose risk is ``<= eps`` with probability ``>= 1 - delta``, fitted on held-out
    ``(E, N, C)`` logits (the validation split; see the module docstring).

    Returns:
        ``threshold`` (None: no threshold passed, every example runs to the last exit), ``risk``, ``eps``,
        ``delta``, ``method``, ``num_examples``, ``calibration_risk`` (the chosen threshold's empirical risk on these
        examples), ``p_value`` (its p-value).
    """
    _check(eps, delta, risk, method)
    grid = threshold_grid() if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    losses, _ = example_losses(logits, labels, grid, first_exit=first_exit, risk=risk)
    n = losses.shape[1]
    if n == 0:
        raise ValueError("no examples to calibrate on")
    counts = losses.sum(axis=1)
    p = binomial_p_values(counts, n, eps)
    g = _choose(p, delta, method)
    return {
        "threshold": None if g is None else float(grid[g]),
        "risk": risk,
        "eps": eps,
        "delta": delta,
        "method": method,
        "num_examples": n,
        "calibration_risk": 0.0 if g is None else float(counts[g] / n),
        "p_value": None if g is None else float(p[g]),
    }


def apply_threshold(
    logits: Any, labels: Any, threshold: float | None, macs: Sequence[float], *, first_exit: int = 0
) -> dict[str, float]:
    """A threshold (None: always the last exit) on ``(E, N, C)`` logits: both risks, accuracy (and the last exit's),
    mean exit, mean MACs per example and the share of the last exit's MACs saved."""
    lam = np.array([np.inf if threshold is None else threshold])
    dis, exits = example_losses(logits, labels, lam, first_exit=first_exit, risk="disagreement")
    drop, _ = example_losses(logits, labels, lam, first_exit=first_exit, risk="accuracy-drop")
    _, pred = _confidence_and_prediction(logits)
    y = torch.as_tensor(labels).cpu().numpy()
    cost = np.asarray(macs, dtype=np.float64)[exits[0]]
    full = float(macs[-1])
    return {
        "disagreement": float(dis.mean()),
        "accuracy_drop": float(drop.mean()),
        "accuracy": float((np.take_along_axis(pred, exits, 0)[0] == y).mean()),
        "accuracy_last_exit": float((pred[-1] == y).mean()),
        "mean_exit": float(exits.mean()),
        "mean_macs": float(cost.mean()),
        "macs_saved": 1.0 - float(cost.mean()) / full if full > 0 else 0.0,
    }


def resplit_check(
    logits: Any,
    labels: Any,
    macs: Sequence[float],
    *,
    eps: Sequence[float],
    delta: float,
    calibration_size: int,
    splits: int = 100,
    risk: str = "disagreement",
    first_exit: int = 0,
    method: str = "fixed-sequence",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The guarantee checked on a pool of held-out examples ``(E, M, C)``: ``splits`` times, a random
    ``calibration_size`` of them calibrate the threshold and the other ``M - calibration_size`` test it.

    The guarantee is over draws of the calibration set from the distribution, with the risk that of the
    distribution. A finite pool re-split differs in one way that matters: the test part is the pool's complement,
    so a calibration part that happened to look safe leaves a test part that looks worse (test risk =
    (pool losses - calibration losses) / test size). With a calibration part that is a large share of the pool
    this anticorrelation pushes the share of violations above delta though the procedure is valid. Hence two
    numbers per eps: ``violations`` (test risk on the disjoint complement > eps: meaningful when the calibration
    part is a small share of the pool, and reported so) and ``violations_pool`` (the risk on the whole pool, the
    population the calibration set is drawn from: the quantity the guarantee is about when the pool is the
    distribution).

    Returns:
        per eps: ``eps``, ``delta``, ``violations``, ``violations_pool``, the mean and std over splits of the
        test risk and of ``macs_saved`` (share of the last exit's MACs), the mean threshold (None-chosen splits
        counted as no early exit), ``no_threshold`` (share of splits where none passed).
    """
    if isinstance(calibration_size, bool) or not isinstance(calibration_size, int) or calibration_size < 1:
        raise ValueError(f"calibration_size must be a positive integer, got {calibration_size!r}")
    grid = threshold_grid()
    losses, exits = example_losses(logits, labels, grid, first_exit=first_exit, risk=risk)
    m = losses.shape[1]
    if not calibration_size < m:
        raise ValueError(f"calibration_size must be < the pool's {m} examples, got {calibration_size}")
    macs = np.asarray(macs, dtype=np.float64)
    saved = 1.0 - macs[exits] / macs[-1] if macs[-1] > 0 else np.zeros(exits.shape)  # (G, M)
    pool_risk = losses.mean(axis=1)  # (G,)
    rng = np.random.default_rng(seed)
    draws = [rng.permutation(m) for _ in range(splits)]
    out = []
    for e in eps:
        _check(e, delta, risk, method)
        test_risk, pool, save, lams = [], [], [], []
        for perm in draws:
            cal, test = perm[:calibration_size], perm[calibration_size:]
            g = _choose(binomial_p_values(losses[:, cal].sum(axis=1), calibration_size, e), delta, method)
            if g is None:  # every example to the last exit: no risk, no saving
                test_risk.append(0.0)
                pool.append(0.0)
                save.append(0.0)
                lams.append(None)
                continue
            test_risk.append(float(losses[g, test].mean()))
            pool.append(float(pool_risk[g]))
            save.append(float(saved[g, test].mean()))
            lams.append(float(grid[g]))
        tr, sv = np.asarray(test_risk), np.asarray(save)
        out.append({
            "eps": float(e), "delta": float(delta), "risk": risk, "method": method, "splits": splits,
            "calibration_size": calibration_size, "test_size": m - calibration_size,
            "violations": float((tr > e).mean()), "violations_pool": float((np.asarray(pool) > e).mean()),
            "test_risk_mean": float(tr.mean()), "test_risk_std": float(tr.std()),
            "macs_saved_mean": float(sv.mean()), "macs_saved_std": float(sv.std()),
            "no_threshold": float(np.mean([lam is None for lam in lams])),
        })  # fmt: skip
    return out
