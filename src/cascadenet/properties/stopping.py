"""Stopping policies compared on a run's output trace: confidence, margin, stable argmax and a learned GRU.

For one trained run, the softmax trace (every exit's output) of its validation split fits every choice a policy
needs, and the test split reports the result (docs/properties.md, "Stopping policies"):

- rule policies (``cascadenet.evaluation.policies``): ``Confidence(q)``, ``Margin(m)``, ``StableArgmax(k)``;
- a learned policy (``GRUPolicy``): a small GRU reads the trace from the first informative exit on and says at
  each step the probability that the current answer is correct (``TARGETS``); it stops at the first step where
  that probability is ``>= tau``. It is fitted on one part of the validation split, the epochs chosen on the other;
- each policy's parameter sweep is a speed-accuracy curve. The parameter values are chosen on validation (from a
  fixed candidate grid, the values whose validation mean stopping steps are spread evenly), then the curve is
  measured on test: accuracy against mean stopping step and against mean MACs per example;
- areas use ``metrics.threshold_auc``'s normalisation (mean step / (T - 1); MACs / last-exit MACs, with
  ``metrics.cost_auc``'s chance before the first exit), every curve anchored at the two operating points all
  policies share: everyone answers at step 0, everyone at the last step;
- dominance per model: the largest area, and pointwise: one curve dominates another when it is nowhere lower by
  more than one test example's worth of accuracy (1 / N) and somewhere higher by more; otherwise they cross, and
  the share of the axis where each is ahead is reported.

No policy stops before the model's ``first_informative_exit``. The learned policy lives in
``cascadenet.properties.learned_policy``, the report in ``cascadenet.properties.stopping_report``; their names are
importable from here too.
"""

from __future__ import annotations

import io
import itertools
import json
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..evaluation import metrics
from ..evaluation.logits import dataset_logits
from ..evaluation.outputs import outputs_for
from ..evaluation.policies import Confidence, Margin, Policy, StableArgmax
from ..runs.load import load_run
from ..utils.files import atomic_write_all, new_folder
from .learned_policy import TARGETS, GRUConfig, GRUPolicy, TraceGRU, _check_first, _trace, fit_gru, stopping_targets
from .stopping_report import curves_figure, format_report

__all__ = [
    "GRUConfig",
    "GRUPolicy",
    "POLICIES",
    "TARGETS",
    "TraceGRU",
    "compare_curves",
    "curve_areas",
    "fit_gru",
    "format_report",
    "policy_curve",
    "policy_report",
    "stopping_analysis",
    "stopping_targets",
]

# The policies in report order, with the name of the parameter their sweep varies.
POLICIES = {"confidence": "threshold", "margin": "margin", "stable": "steps", "learned": "tau"}

# Candidate thresholds in [0, 1] (confidence, margin, the GRU's tau): an even grid, and values close to 1, where
# a trained model's confidences crowd (0.99, 0.999, ... 0.999999).
_FRACTIONS = np.unique(np.concatenate([np.linspace(0.0, 1.0, 101), 1.0 - np.geomspace(1e-2, 1e-6, 41)]))


def _rule_policy(kind: str, value: float) -> Policy:
    return {"confidence": Confidence, "margin": Margin, "stable": StableArgmax}[kind](value)


def _sweep_steps(kind: str, values: Sequence[float], probs: Tensor, first_step: int, net: TraceGRU | None) -> Tensor:
    """``(len(values), N)`` stopping steps of one policy for each parameter value."""
    if kind != "learned":
        return torch.stack([_rule_policy(kind, v).stopping_steps(probs, first_step).cpu() for v in values])
    # GRUPolicy(net, tau).stopping_steps for every tau, with the GRU run once (tested to agree)
    scores = net.scores(probs[first_step:]).cpu()  # (S, N)
    rows = []
    for tau in values:  # one value at a time: (values, S, N) at once can take gigabytes on a large test split
        holds = scores >= float(tau)  # as GRUPolicy.rule
        holds[-1] = True  # as Policy.stopping_steps: an example never stopped leaves at the last step
        rows.append(first_step + holds.int().argmax(dim=0).long())
    return torch.stack(rows)


def policy_curve(steps: Tensor, probs: Tensor, labels: Tensor, macs: Sequence[float]) -> dict[str, list[float]]:
    """Accuracy, mean stopping step and mean MACs per example of each row of stopping steps ``(V, N)``."""
    pred = probs.argmax(dim=-1).cpu()  # (T, N)
    correct = pred.gather(0, steps) == labels.cpu()  # (V, N)
    cost = torch.as_tensor(macs, dtype=torch.float64)[steps]  # (V, N)
    return {
        "accuracy": correct.double().mean(dim=1).tolist(),
        "mean_step": steps.double().mean(dim=1).tolist(),
        "mean_macs": cost.mean(dim=1).tolist(),
    }


def _choose(candidates: Sequence[float], val_mean_step: Sequence[float], points: int) -> list[float]:
    """The candidates whose validation mean stopping steps are nearest to ``points`` evenly spaced targets between
    the smallest and largest, each once, in order of mean step."""
    ms = np.asarray(val_mean_step, dtype=np.float64)
    targets = np.linspace(ms.min(), ms.max(), points)
    picked = sorted({int(np.argmin(np.abs(ms - t))) for t in targets}, key=lambda i: (ms[i], i))
    return [candidates[i] for i in picked]


def _anchored(x: Sequence[float], acc: Sequence[float], x0: float, acc0: float, acc_last: float):
    """The curve with the two operating points every policy has: (x0, accuracy at step 0), (1, last step's)."""
    return [x0, *x, 1.0], [acc0, *acc, acc_last]


def curve_areas(
    curve: dict[str, Sequence[float]], accuracy_per_step: Sequence[float], macs: Sequence[float], num_classes: int
) -> dict[str, float]:
    """Normalised areas of a policy's curve (see the module docstring): ``steps_auc`` is ``metrics.threshold_auc``
    of the curve anchored at (step 0, accuracy at step 0) and (step T - 1, last accuracy); ``macs_auc`` the same
    against mean MACs / last-exit MACs, anchored at (step 0's MACs, its accuracy), with chance accuracy below step
    0's cost as in ``metrics.cost_auc`` (0 for a cascade, whose step 0 costs nothing)."""
    acc_step = list(accuracy_per_step)
    T = len(acc_step)
    full = float(macs[-1])
    x, y = _anchored([s / (T - 1) if T > 1 else 0.0 for s in curve["mean_step"]], curve["accuracy"], 0.0,
                     acc_step[0], acc_step[-1])  # fmt: skip
    steps_auc = metrics.threshold_auc({"mean_step": x, "accuracy": y}, 2)  # x is already mean_step / (T - 1)
    if full <= 0:  # every exit free: as cost_auc, the area is the last exit's accuracy
        return {"steps_auc": steps_auc, "macs_auc": float(acc_step[-1])}
    c0 = float(macs[0]) / full
    x, y = _anchored([min(m / full, 1.0) for m in curve["mean_macs"]], curve["accuracy"], c0, acc_step[0],
                     acc_step[-1])  # fmt: skip
    area = metrics.threshold_auc({"mean_step": x, "accuracy": y}, 2)
    # threshold_auc extends the leftmost point (c0, accuracy at step 0) flat to 0; below c0 nothing has been
    # computed, so cost_auc's convention holds there: chance
    area -= (acc_step[0] - 1.0 / num_classes) * c0
    return {"steps_auc": steps_auc, "macs_auc": float(area)}


def _merged(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted by x, points sharing an x merged into their mean accuracy (as threshold_auc does)."""
    xs, group = np.unique(np.asarray(x, dtype=np.float64), return_inverse=True)
    ys = np.bincount(group, weights=np.asarray(y, dtype=np.float64)) / np.bincount(group)
    return xs, ys


def _ahead(xa: np.ndarray, ya: np.ndarray, xb: np.ndarray, yb: np.ndarray, tol: float) -> tuple[float, float]:
    """Shares of the common x range where curve a is above curve b by more than tol, and below by more than tol.
    Both are linear between knots, so their difference is linear on each interval of the union of knots."""
    lo, hi = max(xa[0], xb[0]), min(xa[-1], xb[-1])
    if hi <= lo:
        return 0.0, 0.0
    xs = np.unique(np.concatenate([xa, xb, [lo, hi]]))
    xs = xs[(xs >= lo) & (xs <= hi)]
    d = np.interp(xs, xa, ya) - np.interp(xs, xb, yb)
    above = below = 0.0
    for x0, x1, d0, d1 in zip(xs[:-1], xs[1:], d[:-1], d[1:]):
        above += (x1 - x0) * _share_over(d0, d1, tol)
        below += (x1 - x0) * _share_over(-d0, -d1, tol)
    return above / (hi - lo), below / (hi - lo)


def _share_over(d0: float, d1: float, tol: float) -> float:
    """Share of [0, 1] where the linear function from d0 to d1 exceeds tol."""
    if d0 > tol and d1 > tol:
        return 1.0
    if d0 <= tol and d1 <= tol:
        return 0.0
    cross = (tol - d0) / (d1 - d0)  # where it meets tol
    return 1.0 - cross if d1 > tol else cross


def compare_curves(curves: dict[str, tuple[Sequence[float], Sequence[float]]], tol: float) -> dict[str, Any]:
    """Pointwise comparison of (x, accuracy) curves over the same axis.

    Each pair: ``"a dominates b"`` when a is nowhere below b by more than ``tol`` and somewhere above by more;
    ``"cross"`` when each is ahead somewhere, with the share of the common range where each leads; ``"equal"``
    when neither leads anywhere. The ``dominant`` policy dominates every other (None when none does).
    """
    merged = {k: _merged(*v) for k, v in curves.items()}
    pairs, beats = [], {k: 0 for k in curves}
    for a, b in itertools.combinations(curves, 2):
        above, below = _ahead(*merged[a], *merged[b], tol)
        if above > 0 and below == 0:
            verdict, winner = f"{a} dominates {b}", a
        elif below > 0 and above == 0:
            verdict, winner = f"{b} dominates {a}", b
        else:
            verdict, winner = ("cross" if above > 0 else "equal"), None
        if winner is not None:
            beats[winner] += 1
        pairs.append({"a": a, "b": b, "verdict": verdict, "a_ahead": above, "b_ahead": below})
    dominant = [k for k, v in beats.items() if v == len(curves) - 1]
    return {"tolerance": tol, "pairs": pairs, "dominant": dominant[0] if dominant else None}


def stopping_analysis(
    val_logits: Any,
    val_labels: Any,
    test_logits: Any,
    test_labels: Any,
    *,
    first_step: int,
    macs: Sequence[float],
    points: int = 21,
    operating_fraction: float = 0.99,
    gru: GRUConfig = GRUConfig(),  # noqa: B008 (frozen: immutable)
    seed: int = 0,
) -> dict[str, Any]:
    """Every policy's curve, areas and operating point, chosen on the validation trace and reported on the test
    trace, and which policy dominates (see the module docstring). Test labels are used only to score.

    Args:
        val_logits, test_logits: ``(T, N, C)`` logits of every exit (the softmax is taken here).
        val_labels, test_labels: ``(N,)`` labels.
        first_step: no policy stops before it (``model.first_informative_exit``).
        macs: cumulative MACs per example of each exit (``model.exit_costs(...).macs``).
        points: parameter values kept per policy (fewer when the candidates give fewer distinct mean steps).
        operating_fraction: each policy's operating point is its parameter with the smallest validation mean step
            whose validation accuracy is ``>=`` this fraction of the last step's validation accuracy.
        gru: the learned policy's configuration; seed: its split and initialisation.

    Returns:
        A JSON-serialisable dict: per policy the chosen ``values``, the ``val`` and ``test`` curves, ``steps_auc``,
        ``macs_auc`` and ``operating_point`` (learned: also ``gru``, the fit's record); ``comparison`` per axis.
    """
    val_probs, val_y = _trace(torch.as_tensor(val_logits).float().softmax(-1), val_labels, "val_logits")
    test_probs, test_y = _trace(torch.as_tensor(test_logits).float().softmax(-1), test_labels, "test_logits")
    T, _, C = test_probs.shape
    if val_probs.shape[0] != T or val_probs.shape[2] != C:
        raise ValueError(f"the validation trace has (exits, classes) {(val_probs.shape[0], val_probs.shape[2])}, "
                         f"the test trace {(T, C)}")  # fmt: skip
    first_step = _check_first(first_step, T)
    macs = [float(m) for m in metrics._check_costs(macs, T, "macs")]
    if isinstance(points, bool) or not isinstance(points, numbers.Integral) or points < 2:
        raise ValueError(f"points must be an integer >= 2, got {points!r}")
    if not 0 < operating_fraction <= 1:
        raise ValueError(f"operating_fraction must be in (0, 1], got {operating_fraction!r}")

    net, record = fit_gru(val_probs, val_y, first_step, gru, seed)
    hold = torch.tensor(record.pop("holdout_index"))
    val_acc = metrics.per_step_accuracy(val_probs, val_y)
    test_acc = metrics.per_step_accuracy(test_probs, test_y)
    candidates = _candidates(net, val_probs[first_step:, hold], T - first_step)
    policies: dict[str, Any] = {}
    for kind, param in POLICIES.items():
        # the learned policy's choices are made on the examples its fit held out: on the others its scores are
        # optimistic; the rule policies fit nothing, so they use the whole validation split
        vp, vy = (val_probs[:, hold], val_y[hold]) if kind == "learned" else (val_probs, val_y)
        policies[kind] = _policy_result(kind, param, candidates[kind], vp, vy, test_probs, test_y, test_acc, macs,
                                        first_step, net, points, operating_fraction)  # fmt: skip
    policies["learned"]["gru"] = record
    return {
        "num_steps": T,
        "num_classes": C,
        "first_step": first_step,
        "macs_per_step": macs,
        "val_examples": int(val_y.numel()),
        "test_examples": int(test_y.numel()),
        "accuracy_per_step": {"val": val_acc.tolist(), "test": test_acc.tolist()},
        "operating_fraction": operating_fraction,
        "policies": policies,
        "comparison": _comparison(policies, test_acc, macs, 1.0 / test_y.numel(), T),
    }


def _candidates(net: TraceGRU, held_probs: Tensor, num_stable: int) -> dict[str, list[float]]:
    """Each policy's candidate parameter values: the threshold grid (the GRU's with the quantiles of its scores on
    the held-out trace ``held_probs``, as they may crowd anywhere in [0, 1]), and 1 .. ``num_stable`` steps."""
    held_scores = net.scores(held_probs).flatten().double().cpu().numpy()
    learned = np.unique(np.concatenate([_FRACTIONS, np.quantile(held_scores, np.linspace(0, 1, 101))]))
    return {"confidence": _FRACTIONS.tolist(), "margin": _FRACTIONS.tolist(),
            "stable": list(range(1, num_stable + 1)), "learned": learned.tolist()}  # fmt: skip


def _policy_result(
    kind: str, param: str, candidates: list[float], vp: Tensor, vy: Tensor, test_probs: Tensor, test_y: Tensor,
    test_acc: np.ndarray, macs: list[float], first_step: int, net: TraceGRU, points: int, operating_fraction: float,
) -> dict[str, Any]:  # fmt: skip
    """One policy: its parameter values chosen on the validation trace ``vp``, its validation and test curves, the
    test curve's areas, and its operating point (the cheapest value reaching the fraction of the last step's
    validation accuracy)."""
    cand_curve = policy_curve(_sweep_steps(kind, candidates, vp, first_step, net), vp, vy, macs)
    values = _choose(candidates, cand_curve["mean_step"], points)
    val_curve = policy_curve(_sweep_steps(kind, values, vp, first_step, net), vp, vy, macs)
    test_curve = policy_curve(_sweep_steps(kind, values, test_probs, first_step, net), test_probs, test_y, macs)
    last_acc = float(metrics.per_step_accuracy(vp, vy)[-1])
    ok = [i for i, a in enumerate(val_curve["accuracy"]) if a >= operating_fraction * last_acc - 1e-12]
    i = ok[0] if ok else int(np.argmax(val_curve["accuracy"]))  # values are in order of val mean step
    return {
        "parameter": param,
        "values": values,
        "val": val_curve,
        "test": test_curve,
        **curve_areas(test_curve, test_acc, macs, test_probs.shape[2]),
        "operating_point": {
            param: values[i],
            "val_accuracy": val_curve["accuracy"][i],
            **{k: v[i] for k, v in test_curve.items()},
        },  # fmt: skip
    }


def _comparison(
    policies: dict[str, Any], test_acc: np.ndarray, macs: list[float], tol: float, T: int
) -> dict[str, Any]:
    """Per axis (mean step, mean MACs), the policy of the largest area and the pointwise comparison of the test
    curves, each anchored at the operating points every policy shares."""
    full = macs[-1] if macs[-1] > 0 else 1.0
    comparison = {}
    for axis, key, scale, x0 in (("step", "mean_step", max(T - 1, 1), 0.0), ("macs", "mean_macs", full, macs[0])):
        curves = {k: _anchored([v / scale for v in p["test"][key]], p["test"]["accuracy"], x0 / scale,
                               float(test_acc[0]), float(test_acc[-1])) for k, p in policies.items()}  # fmt: skip
        areas = {k: p[f"{'steps' if axis == 'step' else 'macs'}_auc"] for k, p in policies.items()}
        comparison[axis] = {"best_by_area": max(areas, key=areas.get), **compare_curves(curves, tol)}
    return comparison


OUTPUTS = ("stopping.md", "stopping.json", "stopping.png")


def policy_report(
    run_dirs: Sequence[str | os.PathLike],
    *,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    device: str = "auto",
    batch_size: int = 500,
    seed: int = 0,
    data_root: str | None = None,
    progress: bool = False,
    gru: GRUConfig = GRUConfig(),  # noqa: B008 (frozen: immutable)
    calibrated: bool | None = None,
    poe: bool = False,
) -> Path:
    """``cascadenet policy``: ``stopping_analysis`` of each run (validation split to fit, test split to report),
    written to ``out`` as stopping.md, stopping.json and stopping.png; returns the report's path. ``calibrated`` /
    ``poe``: the policies read the temperature-scaled exits (None: when the run has them) or the product of experts
    (``cascadenet.evaluation.outputs``).

    ``out`` defaults to ``RUN_DIR/stopping`` for one run and must be given for several. Existing report files are
    never replaced without ``overwrite`` (checked before any work).
    """
    if not run_dirs:
        raise ValueError("give at least one RUN_DIR")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be an integer >= 0, got {seed!r}")
    if out is None:
        if len(run_dirs) > 1:
            raise ValueError("--out is needed with several RUN_DIRs (by default the report goes into the run)")
        out = Path(run_dirs[0]) / "stopping"
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    existing = [str(out / name) for name in OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} exist; pass --overwrite to replace them (nothing was written)")
    runs = []
    for run_dir in run_dirs:
        val = load_run(run_dir, split="val", data_root=data_root, device=device)
        test = load_run(run_dir, split="test", data_root=data_root, device=device)
        model = test.model
        options = {"batch_size": batch_size, "progress": progress}
        val_logits = dataset_logits(val.model, val.data, val.mean, val.std, amp=val.amp, desc="val", **options)
        test_logits = dataset_logits(model, test.data, test.mean, test.std, amp=test.amp, desc="test", **options)
        costs = model.exit_costs(tuple(test.data.images.shape[1:]))
        outputs = outputs_for(run_dir, model, len(costs.macs), calibrated=calibrated, poe=poe)
        val_logits, test_logits = outputs.transform(val_logits), outputs.transform(test_logits)
        analysis = stopping_analysis(val_logits, val.data.labels.cpu(), test_logits, test.data.labels.cpu(),
                                     first_step=model.first_informative_exit, macs=costs.macs, gru=gru,
                                     seed=seed)  # fmt: skip
        runs.append({"run": Path(run_dir).name, "path": str(run_dir), "family": model.config.family,
                     "outputs": outputs.name or "raw", **analysis})  # fmt: skip
    record = {"seed": seed, "runs": runs}
    buffer = io.BytesIO()
    curves_figure(runs).savefig(buffer, format="png", dpi=120)
    files = {out / "stopping.json": (json.dumps(record, indent=2) + "\n").encode(), out / "stopping.png":
             buffer.getvalue(), out / "stopping.md": format_report(record).encode()}  # fmt: skip
    with new_folder(out):  # a failed write leaves neither a new empty folder nor half a report
        atomic_write_all(files, overwrite=overwrite)
    return out / "stopping.md"
