"""Figures comparing the anytime behaviour of evaluated runs."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["plot_runs"]

_PANEL_SIZE = (5.0, 4.0)  # inches per panel
_DPI = 150


def _check_run(name: Any, result: Any) -> None:
    """Raises ValueError if one (name, eval dict) pair lacks what the panels draw."""
    if not isinstance(name, str):
        raise ValueError(f"run name must be a string, got {type(name).__name__}")
    if not isinstance(result, dict):
        raise ValueError(f"run {name!r}: eval result must be a dict, got {type(result).__name__}")
    for key in ("accuracy_per_step", "threshold_curve"):
        if key not in result:
            raise ValueError(f"run {name!r}: eval result lacks {key!r}")
    if "macs_per_step" in result and len(result["macs_per_step"]) != len(result["accuracy_per_step"]):
        raise ValueError(
            f"run {name!r}: macs_per_step has {len(result['macs_per_step'])} entries "
            f"but accuracy_per_step has {len(result['accuracy_per_step'])}"
        )


def plot_runs(
    results: Sequence[tuple[str, dict]], out_path: str | pathlib.Path, *, title: str | None = None
) -> pathlib.Path:
    """Draws per-step accuracy, the threshold-policy trade-off and (if available) accuracy against cost.

    Panels: (1) accuracy at each internal time step; (2) accuracy against mean stopping step of the
    confidence-threshold policy; (3) only if every run has "macs_per_step", accuracy at each step against cumulative
    MACs on a log axis. Each run keeps one colour across panels; a run's "feedforward_accuracy", if present, is a
    dashed horizontal line in that colour. Accuracies are fractions in [0, 1] and are drawn as percentages.

    Args:
        results: (run name, eval dict) pairs; each eval dict has the keys of cascadenet.metrics.summarize and
            optionally "macs_per_step" (cumulative multiply-accumulates per step) and "feedforward_accuracy".
        out_path: Where to save the figure (format from the suffix); parent directories are created and an existing
            file is overwritten.
        title: Optional figure title.

    Returns:
        The path the figure was written to.

    Raises:
        ValueError: If results is empty or a run lacks the needed keys.
    """
    if len(results) == 0:
        raise ValueError("results is empty: nothing to plot")
    for pair in results:
        if len(pair) != 2:
            raise ValueError(f"each result must be a (run name, eval dict) pair, got {len(pair)} items")
        _check_run(*pair)

    # Imported here so that importing cascadenet stays fast. A bare Figure renders through Agg without pyplot, so it
    # never needs a display and never switches the backend of a caller's interactive session.
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    with_macs = all("macs_per_step" in result for _, result in results)
    num_panels = 3 if with_macs else 2
    fig = Figure(figsize=(_PANEL_SIZE[0] * num_panels, _PANEL_SIZE[1]))
    axes = fig.subplots(1, num_panels, squeeze=False)[0]
    # tab10 keeps colours distinct for typical comparisons; beyond 10 runs spread them along a continuous map.
    colours = colormaps["tab10"].colors if len(results) <= 10 else colormaps["turbo"](np.linspace(0, 1, len(results)))

    for (name, result), colour in zip(results, colours):
        acc = 100.0 * np.asarray(result["accuracy_per_step"], dtype=np.float64)  # (T,)
        axes[0].plot(np.arange(acc.size), acc, marker="o", color=colour, label=name)

        curve = result["threshold_curve"]
        order = np.argsort(curve["mean_step"], kind="stable")  # threshold order need not be monotone in time
        mean_step = np.asarray(curve["mean_step"], dtype=np.float64)[order]
        curve_acc = 100.0 * np.asarray(curve["accuracy"], dtype=np.float64)[order]
        axes[1].plot(mean_step, curve_acc, marker=".", color=colour, label=name)

        if with_macs:
            axes[2].plot(np.asarray(result["macs_per_step"], dtype=np.float64), acc, marker="o", color=colour)

        if result.get("feedforward_accuracy") is not None:
            for ax in axes:
                ax.axhline(100.0 * float(result["feedforward_accuracy"]), color=colour, linestyle="--", linewidth=1)

    axes[0].set_xlabel("internal time step (1 step = 1 block of latency)")
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    axes[0].set_title("accuracy per step")
    axes[1].set_xlabel("mean stopping step (internal time steps)")
    axes[1].set_title("confidence-threshold policy")
    if with_macs:
        axes[2].set_xscale("log")
        axes[2].set_xlabel("cumulative MACs (serial hardware)")
        axes[2].set_title("accuracy vs compute")
    for ax in axes:
        ax.set_ylabel("accuracy (%)")
        ax.grid(True, alpha=0.3)

    handles, labels = axes[0].get_legend_handles_labels()
    if any(result.get("feedforward_accuracy") is not None for _, result in results):
        handles.append(Line2D([], [], color="grey", linestyle="--", linewidth=1))
        labels.append("feed-forward (dashed)")
    axes[0].legend(handles, labels, fontsize="small")

    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()

    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=_DPI)
    return out_path
