"""Stopping with guarantees, measured on trained runs: calibration per exit, conditional monotonicity (raw and
product of experts), risk-controlled thresholds and the empirical check of their guarantee (docs/guarantees.md).

``guarantees_analysis`` works on one run's validation and test logits; ``guarantees_report`` (``cascadenet
guarantees``) runs it over runs and writes guarantees.json and guarantees.md (means +- std over the runs of one
model, the runs named ``<model>-s<seed>``). ``risk_policy_run`` is ``cascadenet policy RUN --risk EPS --delta
DELTA``: the threshold fitted on the validation split, reported on the test split.

Everything is fitted on the validation split and scored on the test split; the re-split check pools only held-out
examples (validation + test), never training ones.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..evaluation import metrics
from ..evaluation.calibration import ece_per_exit, fit_temperatures
from ..evaluation.logits import dataset_logits
from ..evaluation.monotonicity import monotonicity
from ..evaluation.outputs import Outputs, outputs_for
from ..evaluation.risk import RISKS, apply_threshold, resplit_check, risk_controlled_threshold
from ..runs.load import load_run
from ..utils.files import atomic_write_all, new_folder

__all__ = [
    "EPS",
    "format_guarantees",
    "format_risk_policy",
    "guarantees_analysis",
    "guarantees_report",
    "risk_policy_run",
]

EPS = (0.01, 0.02, 0.05, 0.1)


def _run_logits(run_dir: str | os.PathLike, data_root: str | None, device: str, batch_size: int) -> dict[str, Any]:
    val = load_run(run_dir, split="val", data_root=data_root, device=device)
    test = load_run(run_dir, split="test", data_root=data_root, device=device)
    model = test.model
    return {
        "model": model,
        "val": dataset_logits(val.model, val.data, val.mean, val.std, batch_size=batch_size, amp=val.amp),
        "val_labels": val.data.labels.cpu(),
        "test": dataset_logits(model, test.data, test.mean, test.std, batch_size=batch_size, amp=test.amp),
        "test_labels": test.data.labels.cpu(),
        "macs": [float(m) for m in model.exit_costs(tuple(test.data.images.shape[1:])).macs],
    }


def _budgeted_at(curve: dict[str, list], full: float, fractions: Sequence[float]) -> list[float]:
    """The budgeted-batch curve's accuracy at fractions of the last exit's MACs (linear between its points)."""
    x = np.asarray(curve["mean_cost"]) / full
    order = np.argsort(x, kind="stable")
    return [float(np.interp(f, x[order], np.asarray(curve["accuracy"])[order])) for f in fractions]


def guarantees_analysis(
    val_logits: Any,
    val_labels: Any,
    test_logits: Any,
    test_labels: Any,
    macs: Sequence[float],
    *,
    first_exit: int,
    eps: Sequence[float] = EPS,
    delta: float = 0.1,
    splits: int = 500,
    calibration_sizes: Sequence[int] = (1000, 6000),
    seed: int = 0,
) -> dict[str, Any]:
    """One run: calibration, monotonicity, risk control (see the module docstring); JSON-serialisable."""
    val_logits, test_logits = torch.as_tensor(val_logits).double(), torch.as_tensor(test_logits).double()
    full = float(macs[-1])
    temps = fit_temperatures(val_logits, val_labels)
    scaled = Outputs(tuple(temps), first_exit=first_exit)
    calibration: dict[str, Any] = {"temperatures": temps}
    for name, transform in (("raw", Outputs(first_exit=first_exit)), ("calibrated", scaled)):
        val_out, test_out = transform.transform(val_logits), transform.transform(test_logits)
        summary = metrics.summarize(test_out, test_labels, first_step=first_exit)
        curve = metrics.budgeted_curve(val_out, test_out, test_labels, macs, first_exit=first_exit)
        calibration[name] = {
            "ece_per_exit": ece_per_exit(test_out, test_labels),
            "threshold_auc": summary["threshold_auc"],
            "budgeted_accuracy_at": _budgeted_at(curve, full, (0.25, 0.5, 0.75)),
        }
    # (temperatures barely change the product of experts: (relu(z) / T) ** w is relu(z) ** w times a constant of
    # the exit, which the normalisation removes, up to the floor; so PoE is measured on the raw exits only)
    # and what the product of experts costs the stopping policies (threshold AUC, budgeted batch), fitted and scored
    # on its own outputs like the calibrated ones above
    mono = {}
    for name, transform in (("raw", Outputs(first_exit=first_exit)), ("poe", Outputs(poe=True, first_exit=first_exit))):
        val_out, test_out = transform.transform(val_logits), transform.transform(test_logits)
        summary = metrics.summarize(test_out, test_labels, first_step=first_exit)
        curve = metrics.budgeted_curve(val_out, test_out, test_labels, macs, first_exit=first_exit)
        mono[name] = {**monotonicity(test_out, test_labels, first_exit=first_exit),
                      "threshold_auc": summary["threshold_auc"],
                      "budgeted_accuracy_at": _budgeted_at(curve, full, (0.25, 0.5, 0.75))}  # fmt: skip
    risk: dict[str, Any] = {"delta": delta, "fit": [], "resplit": []}
    pool = torch.cat([val_logits, test_logits], dim=1)
    pool_labels = torch.cat([torch.as_tensor(val_labels), torch.as_tensor(test_labels)])
    for kind in RISKS:
        for e in eps:
            fit = risk_controlled_threshold(
                val_logits, val_labels, eps=e, delta=delta, risk=kind, first_exit=first_exit
            )
            risk["fit"].append({**fit, "test": apply_threshold(test_logits, test_labels, fit["threshold"], macs,
                                                                first_exit=first_exit)})  # fmt: skip
        for size in calibration_sizes:
            if size < pool.shape[1]:
                risk["resplit"] += resplit_check(pool, pool_labels, macs, eps=eps, delta=delta,
                                                 calibration_size=size, splits=splits, risk=kind,
                                                 first_exit=first_exit, seed=seed)  # fmt: skip
    return {
        "first_exit": first_exit,
        "macs_per_exit": [float(m) for m in macs],
        "val_examples": int(val_logits.shape[1]),
        "test_examples": int(test_logits.shape[1]),
        "calibration": calibration,
        "monotonicity": mono,
        "risk": risk,
    }


OUTPUTS = ("guarantees.md", "guarantees.json")


def guarantees_report(
    run_dirs: Sequence[str | os.PathLike],
    *,
    out: str | os.PathLike,
    eps: Sequence[float] = EPS,
    delta: float = 0.1,
    splits: int = 500,
    calibration_sizes: Sequence[int] = (1000, 6000),
    seed: int = 0,
    overwrite: bool = False,
    data_root: str | None = None,
    device: str = "auto",
    batch_size: int = 500,
) -> Path:
    """``cascadenet guarantees``: ``guarantees_analysis`` of every run, written to ``out`` (guarantees.json and
    guarantees.md; never over existing files without ``overwrite``, checked before any work); returns the
    report's path."""
    if not run_dirs:
        raise ValueError("give at least one RUN_DIR")
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ValueError(f"--splits must be a positive integer, got {splits!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    existing = [str(out / n) for n in OUTPUTS if (out / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} exist; pass --overwrite to replace them (nothing was written)")
    runs = []
    for run_dir in run_dirs:
        d = _run_logits(run_dir, data_root, device, batch_size)
        model = d["model"]
        analysis = guarantees_analysis(d["val"], d["val_labels"], d["test"], d["test_labels"], d["macs"],
                                       first_exit=model.first_informative_exit, eps=eps, delta=delta, splits=splits,
                                       calibration_sizes=calibration_sizes, seed=seed)  # fmt: skip
        name = Path(run_dir).name
        runs.append({"run": name, "model": re.sub(r"-s\d+$", "", name), "family": model.config.family, **analysis})
    record = {"eps": list(eps), "delta": delta, "splits": splits, "seed": seed, "runs": runs}
    files = {out / "guarantees.json": (json.dumps(record, indent=2) + "\n").encode(),
             out / "guarantees.md": format_guarantees(record).encode()}  # fmt: skip
    with new_folder(out):  # a failed write leaves neither a new empty folder nor half a report
        atomic_write_all(files, overwrite=overwrite)
    return out / "guarantees.md"


def _ms(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    v = np.asarray(values, dtype=np.float64) * scale
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}" if v.size > 1 else f"{v.mean():.{digits}f}"


def _policy(entries: list[dict]) -> str:
    """The threshold AUC and budgeted @25/50% cells of monotonicity entries (- in a report written before they
    were measured)."""
    if any("threshold_auc" not in m for m in entries):
        return "- | - | -"
    at = [_ms([m["budgeted_accuracy_at"][i] for m in entries]) for i in (0, 1)]
    return f"{_ms([m['threshold_auc'] for m in entries], digits=2)} | {at[0]} | {at[1]}"


def format_guarantees(record: dict[str, Any]) -> str:
    """The markdown report: per model (its runs' mean ± std, population std over seeds), the calibration, the
    monotonicity and the risk-control tables."""
    models: dict[str, list[dict]] = {}
    for run in record["runs"]:
        models.setdefault(run["model"], []).append(run)
    seeds = ", ".join(f"{m}: {len(r)}" for m, r in models.items())
    lines = ["# Stopping with guarantees", "", f"Runs per model: {seeds}. Numbers are mean ± std over the runs "
             "(population std), in %, test split unless said.", ""]  # fmt: skip
    lines += ["## Calibration", "", "ECE (15 equal-mass bins) averaged over the informative exits, before and after "
              "per-exit temperature scaling fitted on validation; the threshold policy's AUC and the budgeted-batch "
              "accuracy at 25/50% of the last exit's MACs with the raw and the calibrated exits.", "",
              "| model | ECE raw | ECE calibrated | threshold AUC raw | calibrated | budgeted @25% raw | calibrated "
              "| @50% raw | calibrated |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, runs in models.items():
        f = runs[0]["first_exit"]

        def cal(key: str, runs: list = runs, f: int = f) -> list[float]:
            return [float(np.mean(r["calibration"][key]["ece_per_exit"][f:])) for r in runs]

        def at(key: str, i: int, runs: list = runs) -> list[float]:
            return [r["calibration"][key]["budgeted_accuracy_at"][i] for r in runs]

        auc = {k: [r["calibration"][k]["threshold_auc"] for r in runs] for k in ("raw", "calibrated")}
        lines.append(f"| {name} | {_ms(cal('raw'), digits=2)} | {_ms(cal('calibrated'), digits=2)} | "
                     f"{_ms(auc['raw'], digits=2)} | {_ms(auc['calibrated'], digits=2)} | {_ms(at('raw', 0))} | "
                     f"{_ms(at('calibrated', 0))} | {_ms(at('raw', 1))} | {_ms(at('calibrated', 1))} |")  # fmt: skip
    margins = record["runs"][0]["monotonicity"]["raw"]["margins"]
    lines += ["", "## Conditional monotonicity", "", "Share of test examples whose true-class probability drops by "
              f"more than tau (tau = {', '.join(f'{m:g}' for m in margins)}) from an earlier exit to a later one, "
              "share whose argmax goes from right to wrong, and the mean accuracy over the informative exits and the "
              "last exit's; raw outputs and the product of experts (PoE). What PoE costs the stopping policies, fitted "
              "on its own outputs: the threshold policy's AUC and the budgeted-batch accuracy at 25/50% of the last "
              "exit's MACs.", "",
              "| model | outputs | " + " | ".join(f"drop > {m:g}" for m in margins) + " | right → wrong | mean acc. "
              "| last acc. | threshold AUC | budgeted @25% | @50% |",
              "|---|---|" + "---|" * (len(margins) + 6)]  # fmt: skip
    for name, runs in models.items():
        for kind in ("raw", "poe"):
            ms = [r["monotonicity"][kind] for r in runs]
            drops = " | ".join(_ms([m["drop_share"][i] for m in ms]) for i in range(len(margins)))
            lines.append(f"| {name} | {kind} | {drops} | {_ms([m['right_to_wrong'] for m in ms])} | "
                         f"{_ms([np.mean(m['accuracy_per_exit']) for m in ms])} | "
                         f"{_ms([m['accuracy_per_exit'][-1] for m in ms])} | {_policy(ms)} |")  # fmt: skip
    delta = record["delta"]
    lines += ["", "## Risk-controlled thresholds", "", f"delta = {delta}. Fitted on the validation split (fixed-"
              "sequence testing, exact binomial bound), reported on the test split: its risk and the share of the "
              "last exit's MACs saved.", "",
              "| model | risk | eps | test risk | MACs saved | test accuracy | last exit |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, runs in models.items():
        for i, fit in enumerate(runs[0]["risk"]["fit"]):
            tests = [r["risk"]["fit"][i]["test"] for r in runs]
            key = "disagreement" if fit["risk"] == "disagreement" else "accuracy_drop"
            lines.append(f"| {name} | {fit['risk']} | {fit['eps']:g} | {_ms([t[key] for t in tests], digits=2)} | "
                         f"{_ms([t['macs_saved'] for t in tests])} | {_ms([t['accuracy'] for t in tests])} | "
                         f"{_ms([t['accuracy_last_exit'] for t in tests])} |")  # fmt: skip
    lines += ["", "### The guarantee checked on re-splits", "", f"{record['splits']} random calibration/test "
              "re-splits of each run's held-out examples (validation + test); violations: share of splits whose "
              f"risk exceeds eps (must be <= delta = {delta}); on the disjoint test part, and on the whole pool "
              "(the population the calibration part is drawn from; see docs/guarantees.md for why both).", "",
              "| model | risk | calibration / test size | eps | violations (test part) | violations (pool) | mean "
              "test risk | MACs saved |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, runs in models.items():
        for i, row in enumerate(runs[0]["risk"]["resplit"]):
            rows = [r["risk"]["resplit"][i] for r in runs]
            lines.append(f"| {name} | {row['risk']} | {row['calibration_size']} / {row['test_size']} | "
                         f"{row['eps']:g} | {_ms([x['violations'] for x in rows])} | "
                         f"{_ms([x['violations_pool'] for x in rows])} | "
                         f"{_ms([x['test_risk_mean'] for x in rows], digits=2)} | "
                         f"{_ms([x['macs_saved_mean'] for x in rows])} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def risk_policy_run(
    run_dir: str | os.PathLike,
    *,
    eps: float,
    delta: float,
    risk: str = "disagreement",
    method: str = "fixed-sequence",
    calibrated: bool | None = None,
    poe: bool = False,
    data_root: str | None = None,
    device: str = "auto",
    batch_size: int = 500,
) -> dict[str, Any]:
    """``cascadenet policy RUN --risk EPS --delta DELTA``: the most aggressive confidence threshold whose risk is
    at most ``eps`` with probability ``>= 1 - delta``, fitted on the run's validation split (on the outputs chosen
    by ``calibrated`` / ``poe``; ``calibrated`` None: the temperatures when the run has them), and what it does on
    the test split."""
    d = _run_logits(run_dir, data_root, device, batch_size)
    model = d["model"]
    outputs = outputs_for(run_dir, model, d["val"].shape[0], calibrated=calibrated, poe=poe)
    val, test = outputs.transform(d["val"]), outputs.transform(d["test"])
    first = model.first_informative_exit
    fit = risk_controlled_threshold(val, d["val_labels"], eps=eps, delta=delta, risk=risk, first_exit=first,
                                    method=method)  # fmt: skip
    return {"run": Path(run_dir).name, "outputs": outputs.name or "raw", **fit,
            "test": apply_threshold(test, d["test_labels"], fit["threshold"], d["macs"], first_exit=first)}  # fmt: skip


def format_risk_policy(result: dict[str, Any]) -> str:
    """``risk_policy_run``'s result on one screen."""
    t = result["test"]
    key = "disagreement" if result["risk"] == "disagreement" else "accuracy_drop"
    lam = (
        "none passed: every example runs to the last exit"
        if result["threshold"] is None
        else f"{result['threshold']:g}"
    )
    return "\n".join([
        f"{result['run']} ({result['outputs']} outputs): {result['risk']} risk <= {result['eps']:g} with probability "
        f">= {1 - result['delta']:g} ({result['method']}, {result['num_examples']} validation examples)",
        f"threshold      {lam} (validation risk {100 * result['calibration_risk']:.2f}%)",
        f"test risk      {100 * t[key]:.2f}%",
        f"test accuracy  {100 * t['accuracy']:.2f}% (last exit {100 * t['accuracy_last_exit']:.2f}%)",
        f"MACs saved     {100 * t['macs_saved']:.1f}% of the last exit's (mean exit {t['mean_exit']:.2f})",
    ])  # fmt: skip
