"""The report of ``cascadenet typicality``: the markdown tables, the terminal summary and the figure of
:func:`cascadenet.properties.typicality.typicality`'s result."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["format_report", "format_summary"]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def format_report(result: dict[str, Any]) -> str:
    """The markdown report of :func:`typicality`."""
    lines = [
        "# Typicality: are typical examples classified sooner?",
        "",
        f"{result['num_examples']} examples of the {result['dataset']} {result['split']} split; typicality: "
        f"{_score_source(result['scores'])}.",
        f"Bins are typicality quantiles, 1 = least typical, {result['num_bins']} = most typical. Settle step: the "
        "first step from which the example stays correct (never before the first informative exit; an example "
        "wrong at the last step counts as E, the number of exits). Spearman: rank correlation of the score with "
        "that step (ties averaged); negative means typical examples settle sooner.",
        "",
        "| bin | n | score min | score max | score mean |",
        "|---|---|---|---|---|",
    ]
    for b in result["bins"]:
        lines.append(f"| {b['bin']} | {b['n']} | {_num(b['score_min'], '.3f')} | {_num(b['score_max'], '.3f')} | "
                     f"{_num(b['score_mean'], '.3f')} |")  # fmt: skip
    lines += _settle_table(result)
    for p, q in enumerate(result["thresholds"]):
        lines += _policy_table(result, p, q)
    for r in result["runs"]:
        lines += _accuracy_table(r)
    lines += ["", "Figure: `typicality.png` (accuracy against step per bin, one panel per run). Every number: "
              "`typicality.json`.", ""]  # fmt: skip
    return "\n".join(lines)


def _score_source(src: dict[str, Any]) -> str:
    """Where the report's scores came from, in words."""
    if src["kind"] == "file":
        return f"scores from `{src['path']}`"
    o = src["options"]
    return (
        f"built-in hold-out consistency estimator ({o['folds']} folds x {o['repeats']} repeats, {o['model']}, "
        f"{o['epochs']} epochs, seed {o['seed']}; ties broken by the mean held-out probability of the label; "
        f"cache `{src['cache']}`{', reused' if src['reused'] else ''})"
    )


def _settle_table(result: dict[str, Any]) -> list[str]:
    """The runs side by side: mean settle step per bin, and the Spearman correlation of score and settle step."""
    runs = result["runs"]
    lines = ["", "## Side by side", "", "Mean settle step per bin (fraction never settled in brackets), and the "
             "Spearman correlation of score and settle step.", ""]  # fmt: skip
    lines.append("| bin | " + " | ".join(f"{r['name']} (E={r['num_exits']})" for r in runs) + " |")
    lines.append("|---|" + "---|" * len(runs))
    for b in range(result["num_bins"]):
        cells = [f"{_num(r['bins'][b]['mean_settle_step'])} ({_pct(r['bins'][b]['never_settled'])}%)" for r in runs]
        lines.append(f"| {b + 1} | " + " | ".join(cells) + " |")
    lines.append("| Spearman | " + " | ".join(_num(r["spearman_score_settle"], ".3f") for r in runs) + " |")
    lines.append("| Spearman (bin, as binned) | " + " | ".join(_num(r.get("spearman_bin_settle"), ".3f")
                                                            for r in runs) + " |")  # fmt: skip
    lines += ["", "Among the examples correct at the last step only (their settle step is observed, none imputed): "
              "mean settle step per bin, and the Spearman correlation of score and settle step.", "",
              "| bin | " + " | ".join(r["name"] for r in runs) + " |", "|---|" + "---|" * len(runs)]  # fmt: skip
    for b in range(result["num_bins"]):
        cells = [_num(r["bins"][b].get("mean_settle_step_final_correct")) for r in runs]
        lines.append(f"| {b + 1} | " + " | ".join(cells) + " |")
    lines.append("| Spearman | " + " | ".join(_num(r.get("spearman_score_settle_final_correct"), ".3f")
                                             for r in runs) + " |")  # fmt: skip
    lines += ["", "Censored analysis (never settled = censored at the end): per bin, the fraction not yet settled "
              "after each step (survival), first run.", ""]  # fmt: skip
    first = runs[0]
    E = first["num_exits"]
    lines += ["| bin | " + " | ".join(f"after {t}" for t in range(E)) + " |", "|---|" + "---|" * E]
    for b in range(result["num_bins"]):
        surv = first["bins"][b].get("survival") or [None] * E
        lines.append(f"| {b + 1} | " + " | ".join(_pct(v) for v in surv) + " |")
    return lines


def _policy_table(result: dict[str, Any], p: int, q: float) -> list[str]:
    """The confidence policy at its ``p``-th threshold ``q``, runs side by side: mean stopping step and accuracy
    at the stop per bin and overall, and the Spearman correlation of score and stopping step."""
    runs = result["runs"]
    lines = ["", f"Confidence policy, threshold {q:g}: mean stopping step / accuracy at the stop (%).", ""]
    lines.append("| bin | " + " | ".join(r["name"] for r in runs) + " |")
    lines.append("|---|" + "---|" * len(runs))
    for b in range(result["num_bins"]):
        cells = [f"{_num(r['threshold_policy'][p]['mean_step_per_bin'][b])} / "
                 f"{_pct(r['threshold_policy'][p]['accuracy_per_bin'][b])}" for r in runs]  # fmt: skip
        lines.append(f"| {b + 1} | " + " | ".join(cells) + " |")
    overall = [r["threshold_policy"][p] for r in runs]
    lines.append("| all | " + " | ".join(f"{_num(o['mean_step'])} / {_pct(o['accuracy'])}" for o in overall) + " |")
    lines.append("| Spearman (score, stop) | " + " | ".join(
        _num(r["threshold_policy"][p]["spearman_score_stop"], ".3f") for r in runs) + " |")  # fmt: skip
    return lines


def _accuracy_table(r: dict[str, Any]) -> list[str]:
    """One run's accuracy per step and bin."""
    E = r["num_exits"]
    lines = ["", f"## {r['name']} ({r['family']}, {E} exits, first informative exit "
             f"{r['first_informative_exit']}): accuracy (%) per step", ""]  # fmt: skip
    lines.append("| bin | " + " | ".join(str(t) for t in range(E)) + " |")
    lines.append("|---|" + "---|" * E)
    for b, info in enumerate(r["bins"]):
        acc = info["accuracy_per_step"] or [None] * E
        lines.append(f"| {b + 1} | " + " | ".join(_pct(a) for a in acc) + " |")
    lines.append("| all | " + " | ".join(_pct(a) for a in r["accuracy_per_step"]) + " |")
    return lines


def format_summary(result: dict[str, Any]) -> str:
    """A few lines for the terminal: the Spearman correlations and where the report is."""
    lines = [f"typicality of {result['num_examples']} {result['split']} examples in {result['num_bins']} bins "
             f"({result['scores']['kind']} scores)"]  # fmt: skip
    for r in result["runs"]:
        settle = [b["mean_settle_step"] for b in r["bins"]]
        lines.append(f"{r['name']}: Spearman(score, settle step) {_num(r['spearman_score_settle'], '.3f')} "
                     f"(among final-correct {_num(r.get('spearman_score_settle_final_correct'), '.3f')}); "
                     f"mean settle step per bin {' '.join(_num(s) for s in settle)}")  # fmt: skip
    lines.append(f"report: {Path(result['out']) / 'typicality.md'}")
    return "\n".join(lines)


def _figure_png(result: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    _figure(result).savefig(buffer, format="png", dpi=150)
    return buffer.getvalue()


def _figure(result: dict[str, Any]) -> Any:
    """Accuracy against step per typicality bin, one panel per run; a last panel of the mean settle step and
    the mean stopping step (first threshold) per bin, one colour per run."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    runs, bins = result["runs"], result["num_bins"]
    fig = Figure(figsize=(5.0 * (len(runs) + 1), 4.0))
    axes = fig.subplots(1, len(runs) + 1, squeeze=False)[0]
    colours = colormaps["viridis"](np.linspace(0, 0.9, bins))
    for ax, r in zip(axes, runs):
        for b, info in enumerate(r["bins"]):
            if info["accuracy_per_step"] is None:
                continue
            acc = 100 * np.asarray(info["accuracy_per_step"])
            label = f"bin {b + 1}" + (" (least typical)" if b == 0 else " (most typical)" if b == bins - 1 else "")
            ax.plot(np.arange(acc.size), acc, marker=".", color=colours[b], label=label)
        ax.set_title(f"{r['name']}: accuracy per typicality bin", fontsize="medium")
        ax.set_xlabel("exit (internal time step)")
        ax.set_ylabel("accuracy (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    ax = axes[-1]
    x = np.arange(1, bins + 1)
    tab = colormaps["tab10"].colors
    for i, r in enumerate(runs):
        settle = [np.nan if b["mean_settle_step"] is None else b["mean_settle_step"] for b in r["bins"]]
        ax.plot(x, settle, marker="o", color=tab[i % 10], label=f"{r['name']}: settle step")
        pol = r["threshold_policy"][0]
        stop = [np.nan if s is None else s for s in pol["mean_step_per_bin"]]
        ax.plot(
            x, stop, marker="s", linestyle="--", color=tab[i % 10], label=f"{r['name']}: stop @ {pol['threshold']:g}"
        )
    ax.set_xlabel("typicality bin (1 = least typical)")
    ax.set_ylabel("mean step")
    ax.set_title("mean settle / stopping step per bin", fontsize="medium")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig
