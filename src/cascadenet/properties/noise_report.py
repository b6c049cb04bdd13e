"""The report of ``cascadenet noise``: the markdown tables and the two figures of ``noise_robustness``'s result
(``cascadenet.properties.noise``), and the files ``noise_run`` writes."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

__all__ = ["OUTPUT_FILES", "format_report", "noise_figures", "report_contents"]

OUTPUT_FILES = ("noise.md", "noise.json", "noise-steps.png", "noise-final.png")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def format_report(result: dict[str, Any]) -> str:
    """The markdown report of ``noise_robustness``'s result (the JSON holds every number)."""
    methods = list(result["methods"])
    lines = [
        f"# Noise robustness: {result.get('run') or 'model'}",
        "",
        f"{result['num_examples']} examples of "
        + (f"the {result['split']} split" if result.get("split") else "the data")
        + (f" (a random subset, seed {result['seed']})" if result["max_examples"] else "")
        + f"; {result['num_steps']} steps per trajectory (the model's own: {result['model_num_steps']}; "
        f"settling time {result['settle_steps']}); noise seed {result['seed']}.",
        "",
        f"Noise: {result['noise']}. Every method sees the very same frames.",
        "",
        "| protocol | noisy steps | |",
        "|---|---|---|",
    ]
    for p, info in result["protocols"].items():
        steps = info["noisy_steps"]
        span = "all" if len(steps) == result["num_steps"] else f"{steps[0]}..{steps[-1]}" if steps else "none"
        clears = info.get("cascade_clears_at_step")
        extra = f"the cascade's output is clean again from step {clears}" if clears is not None else ""
        lines.append(f"| {p} ({info['description']}) | {span} | {extra} |")
    lines += ["", "| method | |", "|---|---|"]
    lines += [f"| {m} | {d} |" for m, d in result["methods"].items()]
    header = "| method | clean | " + " | ".join(f"sigma {s:g}" for s in result["sigmas"]) + " |"
    rule = "|---|---|" + "---|" * len(result["sigmas"])
    for p, entries in result["results"].items():
        for key, what in (("final_accuracy", "final accuracy"), ("mean_accuracy", "mean accuracy over steps")):
            lines += ["", f"## {p}: {what} (%)", "", header, rule]
            for m in methods:
                cells = [_pct(e["methods"][m][key]) for e in entries]
                lines.append(f"| {m} | {_pct(result['clean'][m][key])} | " + " | ".join(cells) + " |")
        if "last_noisy_step" in result["protocols"][p]:
            lines += ["", f"## {p}: recovery step (agreement with the clean run >= {result['recovered_agreement']:g} "
                      "from there on; - = not within the trajectory)", "", header.replace("| clean ", ""),
                      rule[:-4]]  # fmt: skip
            for m in methods:
                cells = ["-" if e["methods"][m]["recovery_step"] is None else str(e["methods"][m]["recovery_step"])
                         for e in entries]  # fmt: skip
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "![accuracy per step](noise-steps.png)", "", "![final accuracy against sigma](noise-final.png)", ""]
    return "\n".join(lines)


def noise_figures(result: dict[str, Any]) -> tuple[Any, Any]:
    """Two matplotlib figures (no pyplot): accuracy per step (a row per protocol, a column per sigma, a line per
    method, the clean cascade dotted, noisy steps shaded), and final accuracy against sigma (a panel per
    protocol, sigma 0 = clean frames)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    methods = list(result["methods"])
    colours = dict(zip(methods, colormaps["tab10"].colors))
    protocols = list(result["results"])
    sigmas = result["sigmas"]
    steps = np.arange(result["num_steps"])
    fig = Figure(figsize=(3.6 * len(sigmas), 2.8 * len(protocols) + 0.6))
    axes = fig.subplots(len(protocols), len(sigmas), squeeze=False, sharey=True)
    for i, p in enumerate(protocols):
        noisy = result["protocols"][p]["noisy_steps"]
        for j, entry in enumerate(result["results"][p]):
            ax = axes[i][j]
            if noisy and len(noisy) < len(steps):
                ax.axvspan(noisy[0] - 0.5, noisy[-1] + 0.5, color="grey", alpha=0.15, linewidth=0)
            clean = 100 * np.asarray(result["clean"]["cascade"]["accuracy_per_step"])
            ax.plot(steps, clean, color="black", linestyle=":", linewidth=1, label="cascade, clean")
            for m in methods:
                acc = 100 * np.asarray(entry["methods"][m]["accuracy_per_step"])
                ax.plot(steps, acc, color=colours[m], marker=".", markersize=3, label=m)
            ax.set_title(f"{p}, sigma {entry['sigma']:g}", fontsize="medium")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
            if i == len(protocols) - 1:
                ax.set_xlabel("step")
            if j == 0:
                ax.set_ylabel("accuracy (%)")
    axes[0][0].legend(fontsize="x-small")
    fig.suptitle(f"accuracy per step ({result['split']} split, {result['num_examples']} examples; shaded: noisy)")
    fig.tight_layout()

    final = Figure(figsize=(4.2 * len(protocols), 3.6))
    panels = final.subplots(1, len(protocols), squeeze=False, sharey=True)[0]
    for ax, p in zip(panels, protocols):
        entries = sorted(result["results"][p], key=lambda e: e["sigma"])
        xs = [0.0] + [e["sigma"] for e in entries if e["sigma"] > 0]
        for m in methods:
            ys = [result["clean"][m]["final_accuracy"]] + [e["methods"][m]["final_accuracy"] for e in entries
                                                           if e["sigma"] > 0]  # fmt: skip
            ax.plot(xs, 100 * np.asarray(ys), color=colours[m], marker="o", label=m)
        ax.set_title(p)
        ax.set_xlabel("sigma (pixel scale [0, 1])")
        ax.grid(True, alpha=0.3)
    panels[0].set_ylabel(f"accuracy at the last step, {result['num_steps'] - 1} (%)")
    panels[0].legend(fontsize="small")
    final.tight_layout()
    return fig, final


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=150)
    return buffer.getvalue()


def report_contents(result: dict[str, Any]) -> list[bytes]:
    """The contents of the report's files, in the order of ``OUTPUT_FILES``."""
    steps_fig, final_fig = noise_figures(result)
    return [format_report(result).encode(), (json.dumps(result, indent=2) + "\n").encode(), _png(steps_fig),
            _png(final_fig)]  # fmt: skip
