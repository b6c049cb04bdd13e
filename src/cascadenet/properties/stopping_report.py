"""The report of ``cascadenet policy``: the markdown report of ``policy_report``'s record and its figure of the
speed-accuracy curves (``cascadenet.properties.stopping``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["curves_figure", "format_report"]

_LABELS = {"confidence": "confidence q", "margin": "margin m", "stable": "stable argmax k", "learned": "GRU tau"}


def curves_figure(runs: Sequence[dict[str, Any]]) -> Any:
    """Per run, test accuracy against mean stopping step and against mean MACs, one curve per policy, with the
    fixed exits (everyone at step t) in grey."""
    from matplotlib.figure import Figure  # without pyplot: no display, the caller's backend untouched

    fig = Figure(figsize=(10.0, 4.0 * len(runs)))
    axes = fig.subplots(len(runs), 2, squeeze=False)
    for row, run in zip(axes, runs):
        acc = 100 * np.asarray(run["accuracy_per_step"]["test"])
        fixed_x = (np.arange(acc.size), np.asarray(run["macs_per_step"]) / 1e6)
        for ax, key, x_fixed, scale in zip(row, ("mean_step", "mean_macs"), fixed_x, (1.0, 1e6)):
            ax.plot(x_fixed, acc, color="grey", linestyle="--", marker="o", markersize=3, label="fixed exit")
            for kind, policy in run["policies"].items():
                x = np.asarray(policy["test"][key]) / scale
                order = np.argsort(x, kind="stable")
                ax.plot(x[order], 100 * np.asarray(policy["test"]["accuracy"])[order], marker=".", label=_LABELS[kind])
            ax.set_ylabel("test accuracy (%)")
            ax.grid(True, alpha=0.3)
        row[0].set_xlabel("mean stopping step")
        row[1].set_xlabel("mean MMACs per example")
        row[0].set_title(f"{run['run']}: accuracy vs mean step")
        row[1].set_title(f"{run['run']}: accuracy vs mean compute")
        row[0].legend(fontsize="small")
    fig.tight_layout()
    return fig


def format_report(record: dict[str, Any]) -> str:
    """The markdown report of ``policy_report``'s record."""
    lines = [
        "# Stopping policies",
        "",
        "Parameters and the GRU fitted on each run's validation split; curves measured on its test split. Areas:",
        "accuracy against mean step / (T - 1) and against mean MACs / last-exit MACs, each curve anchored at",
        'everyone-at-step-0 and everyone-at-the-last-step (docs/properties.md, "Stopping policies").',
        "Operating point: the cheapest parameter whose validation accuracy reaches the stated fraction of the last",
        "step's. Pointwise dominance tolerates one test example (1 / N) of accuracy.",
        "",
        "![curves](stopping.png)",
    ]
    for run in record["runs"]:
        lines += _run_section(run)
    return "\n".join(lines) + "\n"


def _run_section(run: dict[str, Any]) -> list[str]:
    """One run's part of the report: the policies' areas and operating points, the last step alone, the dominance
    verdicts per axis, and the GRU's fit."""
    frac = run["operating_fraction"]
    lines = [
        "",
        f"## {run['run']} ({run['family']}, {run['num_steps']} exits, first informative exit "
        f"{run['first_step']}, {run.get('outputs', 'raw')} outputs, {run['val_examples']} val / {run['test_examples']} "
        "test examples)",
        "",
        f"| policy | steps AUC | MACs AUC | operating point ({100 * frac:g}% of last-step val accuracy) "
        "| test accuracy | mean step | mean MMACs |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, p in run["policies"].items():
        op = p["operating_point"]
        lines.append(f"| {kind} | {p['steps_auc']:.4f} | {p['macs_auc']:.4f} | {p['parameter']} = "
                     f"{op[p['parameter']]:.6g} | {100 * op['accuracy']:.2f}% | {op['mean_step']:.2f} | "
                     f"{op['mean_macs'] / 1e6:.3f} |")  # fmt: skip
    acc = run["accuracy_per_step"]["test"]
    # sampling error, to read the areas and the one-example tolerance of the dominance verdicts against
    se = math.sqrt(acc[-1] * (1 - acc[-1]) / run["test_examples"])
    lines += ["", f"Last step alone: {100 * acc[-1]:.2f}% at {run['macs_per_step'][-1] / 1e6:.3f} MMACs "
              f"(binomial standard error of such an accuracy: {100 * se:.2f} points).", ""]  # fmt: skip
    for axis, name in (("step", "mean step"), ("macs", "mean MACs")):
        c = run["comparison"][axis]
        dominant = c["dominant"] or "none (curves cross)"
        lines.append(f"- against {name}: largest area **{c['best_by_area']}**; dominates every other "
                     f"pointwise: **{dominant}**")  # fmt: skip
        for pair in c["pairs"]:
            if pair["verdict"] == "cross":
                lines.append(f"  - {pair['a']} vs {pair['b']}: cross ({pair['a']} ahead on "
                             f"{100 * pair['a_ahead']:.0f}% of the axis, {pair['b']} on "
                             f"{100 * pair['b_ahead']:.0f}%)")  # fmt: skip
            else:
                lines.append(f"  - {pair['a']} vs {pair['b']}: {pair['verdict']}")
    g = run["policies"]["learned"]["gru"]
    lines += [
        "",
        f"GRU (hidden {g['hidden']}, target `{g['target']}`): fitted on {g['fit_examples']} val examples, "
        f"{g['holdout_examples']} held out; best epoch {g['best_epoch']} of {g['epochs_run']}, held-out loss "
        f"{g['holdout_loss']:.4f}, per-step accuracy {100 * g['holdout_step_accuracy']:.1f}% (positive rate "
        f"{100 * g['holdout_positive_rate']:.1f}%).",
    ]
    return lines
