"""Figures comparing the anytime behaviour of evaluated runs (from eval.json dicts; no torch).

Cost axes are linear, not logarithmic: a cascade's step 0 costs 0 MACs, which a log axis cannot show (it
silently drops the point), and the MACs and latency AUCs of eval.json are areas over exactly these linear,
normalised axes, so the picture shows what the numbers measure. (A symlog axis would keep 0 but stretch the
costs below its linear threshold, exaggerating the cheapest exits.)
"""

from __future__ import annotations

import io
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..utils.files import atomic_write, new_folder

__all__ = ["plot_runs", "plot_mean_curves", "plot_reliability"]

_PANEL_SIZE = (5.0, 4.0)  # inches per panel
_DPI = 150

# The x axis of each kind of cost panel: its eval.json key and its label.
_AXES = {
    "macs": ("macs_per_step", "cumulative MACs per example (serial hardware)"),
    "latency": ("parallel_latency_blocks", "latency in blocks (parallel hardware)"),
    "layers": ("latency_layers", "latency in layers on the critical path (parallel hardware)"),
    "step": (None, "exit (internal time step)"),
}
_BANDS = ("minmax", "std")


def _check_run(name: Any, result: Any) -> None:
    """Raises ValueError if one (name, eval dict) pair lacks what the panels draw."""
    if not isinstance(name, str):
        raise ValueError(f"run name must be a string, got {type(name).__name__}")
    if not isinstance(result, dict):
        raise ValueError(f"run {name!r}: eval result must be a dict, got {type(result).__name__}")
    for key in ("accuracy_per_step", "threshold_curve"):
        if key not in result:
            raise ValueError(f"run {name!r}: eval result lacks {key!r}")
    for key in ("macs_per_step", "parallel_latency_blocks"):
        if key in result and len(result[key]) != len(result["accuracy_per_step"]):
            raise ValueError(
                f"run {name!r}: {key} has {len(result[key])} entries "
                f"but accuracy_per_step has {len(result['accuracy_per_step'])}"
            )


def _splits(results: Sequence[dict]) -> str:
    """'test split', or 'test, val splits' when the results mix splits (a first-release eval.json is the test's)."""
    names = list(dict.fromkeys(str(r.get("split", "test")) for r in results))
    return f"{', '.join(names)} split{'s' if len(names) > 1 else ''}"


def _save(fig: Any, out_path: str | pathlib.Path, overwrite: bool = True) -> pathlib.Path:
    """Draw in memory, then write atomically: a full disk or a kill leaves the old figure (or none), never a torn
    or empty one; without ``overwrite`` a file that appeared meanwhile is not replaced either."""
    out_path = _figure_path(out_path)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=_DPI, format=out_path.suffix[1:])
    with new_folder(out_path.parent):  # a failed write leaves no new empty folder
        atomic_write(out_path, buffer.getvalue(), overwrite=overwrite)
    return out_path


def _figure_path(out_path: str | pathlib.Path) -> pathlib.Path:
    """The figure's file, its format named by its suffix (``-o curves`` would be written as ``curves.png``)."""
    from matplotlib.backend_bases import FigureCanvasBase

    out_path = pathlib.Path(out_path)
    formats = FigureCanvasBase.get_supported_filetypes()
    if out_path.suffix[1:].lower() not in formats:
        raise ValueError(f"{out_path}: name the figure with its format's suffix (.png, .pdf, .svg, ...), got "
                         f"{out_path.suffix or 'none'}")  # fmt: skip
    return out_path


def _budgeted(result: dict) -> dict | None:
    """The budgeted-batch curve of an eval dict, or None (absent, null, or empty)."""
    curve = result.get("budgeted_batch")
    return curve if isinstance(curve, dict) and curve.get("q") else None


def plot_runs(
    results: Sequence[tuple[str, dict]],
    out_path: str | pathlib.Path,
    *,
    title: str | None = None,
    overwrite: bool = True,
) -> pathlib.Path:
    """Draws per-step accuracy, the threshold-policy trade-off and (if available) accuracy against cost.

    Panels: (1) accuracy at each exit; (2) accuracy against mean stopping step of the confidence-threshold
    policy; (3) only if every run has "macs_per_step", accuracy at each exit against cumulative MACs (linear
    axis, so a cascade's 0-MAC step 0 shows), with a run's budgeted-batch curve, where it has one, dotted in its
    colour; (4) only if every run has "parallel_latency_blocks", accuracy against parallel latency. Each run
    keeps one colour across panels; a run's "feedforward_accuracy", if present, is a dashed horizontal line in
    that colour. Accuracies are fractions in [0, 1] and are drawn as percentages. Panel titles name the split.

    Args:
        results: (run name, eval dict) pairs; each eval dict has the keys of cascadenet.evaluation.metrics.summarize and
            optionally "macs_per_step", "parallel_latency_blocks", "budgeted_batch", "feedforward_accuracy" and
            "split".
        out_path: Where to save the figure (format from the suffix); parent directories are created.
        title: Optional figure title.
        overwrite: Replace an existing ``out_path`` (with False it is refused before any drawing, as
            ``cascadenet plot`` does without --overwrite).

    Returns:
        The path the figure was written to.

    Raises:
        ValueError: If results is empty or a run lacks the needed keys.
        FileExistsError: ``out_path`` exists and ``overwrite`` is False (nothing was written).
    """
    _figure_path(out_path)  # before any drawing
    if not overwrite and pathlib.Path(out_path).exists():
        raise FileExistsError(f"{out_path} exists; pass --overwrite to replace it (nothing was written)")
    return _save(_runs_figure(results, title), out_path, overwrite)


def _runs_figure(results: Sequence[tuple[str, dict]], title: str | None) -> Any:
    """The figure of plot_runs (separate so that tests can read the plotted data)."""
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

    cost_axes = [axis for axis in ("macs", "latency") if all(_AXES[axis][0] in r for _, r in results)]
    num_panels = 2 + len(cost_axes)
    fig = Figure(figsize=(_PANEL_SIZE[0] * num_panels, _PANEL_SIZE[1]))
    axes = fig.subplots(1, num_panels, squeeze=False)[0]
    cost_panels = dict(zip(cost_axes, axes[2:]))
    # tab10 keeps colours distinct for typical comparisons; beyond 10 runs spread them along a continuous map.
    colours = colormaps["tab10"].colors if len(results) <= 10 else colormaps["turbo"](np.linspace(0, 1, len(results)))
    splits = _splits([r for _, r in results])

    for (name, result), colour in zip(results, colours):
        _plot_run(axes, cost_panels, name, result, colour)
    _label_panels(axes, cost_panels, splits)
    _legend(axes[0], "macs" in cost_panels, results)

    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _plot_run(axes: Any, cost_panels: dict[str, Any], name: str, result: dict, colour: Any) -> None:
    """One run's lines on every panel: accuracy per step, the threshold policy's curve, accuracy against each cost
    (with its budgeted-batch curve, dotted), and its feed-forward accuracy (dashed) across all."""
    acc = 100.0 * np.asarray(result["accuracy_per_step"], dtype=np.float64)  # (T,)
    axes[0].plot(np.arange(acc.size), acc, marker="o", color=colour, label=name)

    curve = result["threshold_curve"]
    order = np.argsort(curve["mean_step"], kind="stable")  # threshold order need not be monotone in time
    mean_step = np.asarray(curve["mean_step"], dtype=np.float64)[order]
    curve_acc = 100.0 * np.asarray(curve["accuracy"], dtype=np.float64)[order]
    axes[1].plot(mean_step, curve_acc, marker=".", color=colour, label=name)

    for axis, ax in cost_panels.items():
        ax.plot(np.asarray(result[_AXES[axis][0]], dtype=np.float64), acc, marker="o", color=colour, label=name)
        budgeted = _budgeted(result)
        if budgeted is not None and f"mean_{axis}" in budgeted:
            order = np.argsort(budgeted[f"mean_{axis}"], kind="stable")
            ax.plot(np.asarray(budgeted[f"mean_{axis}"], dtype=np.float64)[order],
                    100.0 * np.asarray(budgeted["accuracy"], dtype=np.float64)[order], linestyle=":",
                    color=colour, label=f"{name} (budgeted batch)")  # fmt: skip

    if result.get("feedforward_accuracy") is not None:
        for ax in axes:
            ax.axhline(100.0 * float(result["feedforward_accuracy"]), color=colour, linestyle="--", linewidth=1)


def _label_panels(axes: Any, cost_panels: dict[str, Any], splits: str) -> None:
    """The panels' axis labels, titles and grids."""
    from matplotlib.ticker import MaxNLocator

    axes[0].set_xlabel("exit (internal time step; 1 step = 1 block of latency)")
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    axes[0].set_title(f"accuracy per step ({splits})")
    axes[1].set_xlabel("mean stopping step (internal time steps)")
    axes[1].set_title(f"confidence-threshold policy ({splits})")
    for axis, ax in cost_panels.items():
        ax.set_xlabel(_AXES[axis][1])
        ax.set_title(f"accuracy vs {'compute' if axis == 'macs' else 'parallel latency'} ({splits})")
    for ax in axes:
        ax.set_ylabel("accuracy (%)")
        ax.grid(True, alpha=0.3)


def _legend(ax: Any, macs_panel: bool, results: Sequence[tuple[str, dict]]) -> None:
    """The legend of the first panel: a line per run, and what the dashed and dotted lines mean where drawn."""
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    if any(result.get("feedforward_accuracy") is not None for _, result in results):
        handles.append(Line2D([], [], color="grey", linestyle="--", linewidth=1))
        labels.append("feed-forward (dashed)")
    if macs_panel and any(_budgeted(r) for _, r in results):
        handles.append(Line2D([], [], color="grey", linestyle=":"))
        labels.append("budgeted batch (dotted)")
    ax.legend(handles, labels, fontsize="small")


def plot_mean_curves(
    groups: Mapping[str, Sequence[dict]],
    path: str | pathlib.Path,
    axis: str = "macs",
    *,
    band: str = "minmax",
    budgeted: bool = False,
    title: str | None = None,
) -> pathlib.Path:
    """Mean anytime curves over seeds, one line per group, for a reproduction report.

    Each group (e.g. "CascadedTD", "SDN") is a list of eval dicts, one per seed, of models with the same exits.
    The line is the mean accuracy at each exit against the mean cost of that exit (MACs, latency or the exit
    index; linear axes, so a 0-cost step 0 shows); the shaded band is, per exit, the range of the seeds
    (``band="minmax"``, the default: with the usual handful of seeds a standard deviation is a poor estimate,
    and the range shows every seed) or the mean +- 1 sample standard deviation (``band="std"``, ddof 1; no
    width with one seed). With ``budgeted``, each group's budgeted-batch curve is drawn dashed: per q, the mean
    test accuracy against the mean of the mean cost (no band).

    Args:
        groups: label -> eval dicts (as written by cascadenet.evaluation.evaluate), one per seed.
        path: Where to save the figure (format from the suffix); parents are created, an existing file replaced.
        axis: "macs", "latency" (block units), "layers" (the critical path in layers) or "step".
        band: "minmax" or "std".
        budgeted: also draw the budgeted-batch curves (axis "macs" or "latency"; every eval must have one).
        title: Figure title; by default it names the axis and the split(s).

    Returns:
        The path the figure was written to.

    Raises:
        ValueError: If an argument is invalid, a group is empty, an eval lacks what is drawn, or a group's evals
            differ in their number of exits or budgeted-batch grid.
    """
    return _save(_mean_curves_figure(groups, axis, band, budgeted, title), path)


def _group_curves(label: str, evals: Any, axis: str, budgeted: bool) -> tuple[np.ndarray, np.ndarray, Any]:
    """(accuracy (S, E), cost (S, E), budgeted (accuracy (S, Q), cost (S, Q)) or None) of one group's S seeds."""
    if isinstance(evals, (str, bytes, dict)) or not isinstance(evals, Sequence) or len(evals) == 0:
        raise ValueError(f"group {label!r}: needs a non-empty list of eval dicts (one per seed)")
    key = _AXES[axis][0]
    acc, cost, b_acc, b_cost, grids = [], [], [], [], []
    for i, result in enumerate(evals):
        if not isinstance(result, dict) or "accuracy_per_step" not in result:
            raise ValueError(f"group {label!r}, eval {i}: not an eval dict with 'accuracy_per_step'")
        a = np.asarray(result["accuracy_per_step"], dtype=np.float64)
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"group {label!r}, eval {i}: accuracy_per_step must be a non-empty list")
        if acc and a.size != acc[0].size:
            raise ValueError(f"group {label!r}: evals with {acc[0].size} and {a.size} exits cannot be averaged")
        if key is not None and key not in result:
            raise ValueError(f"group {label!r}, eval {i}: lacks {key!r} (needed for axis={axis!r})")
        c = np.arange(a.size, dtype=np.float64) if key is None else np.asarray(result[key], dtype=np.float64)
        if c.shape != a.shape:
            raise ValueError(f"group {label!r}, eval {i}: {key} has {c.size} entries, accuracy_per_step {a.size}")
        acc.append(a)
        cost.append(c)
        if budgeted:
            curve = _budgeted(result)
            if curve is None or f"mean_{axis}" not in curve:
                raise ValueError(f"group {label!r}, eval {i}: no budgeted-batch curve (budgeted=True needs one in "
                                 "every eval; the run held out no validation split?)")  # fmt: skip
            grids.append(list(curve["q"]))
            if grids[-1] != grids[0]:
                raise ValueError(f"group {label!r}: evals with different budgeted-batch q grids cannot be averaged")
            b_acc.append(np.asarray(curve["accuracy"], dtype=np.float64))
            b_cost.append(np.asarray(curve[f"mean_{axis}"], dtype=np.float64))
    return np.stack(acc), np.stack(cost), (np.stack(b_acc), np.stack(b_cost)) if budgeted else None


def _mean_curves_figure(groups: Any, axis: str, band: str, budgeted: bool, title: str | None) -> Any:
    """The figure of plot_mean_curves (separate so that tests can read the plotted data)."""
    if axis not in _AXES:
        raise ValueError(f"unknown axis {axis!r}; valid choices: {', '.join(_AXES)}")
    if band not in _BANDS:
        raise ValueError(f"unknown band {band!r}; valid choices: {', '.join(_BANDS)}")
    if budgeted and axis == "step":
        raise ValueError("budgeted=True needs a cost axis (macs or latency): budgeted-batch points have no exit")
    if not isinstance(groups, Mapping) or len(groups) == 0:
        raise ValueError("groups must be a non-empty mapping of label -> list of eval dicts")
    curves = {}
    for label, evals in groups.items():
        if not isinstance(label, str):
            raise ValueError(f"group labels must be strings, got {type(label).__name__}")
        curves[label] = _group_curves(label, evals, axis, budgeted)

    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(_PANEL_SIZE[0] * 1.4, _PANEL_SIZE[1] * 1.2))
    ax = fig.subplots()
    colours = colormaps["tab10"].colors if len(curves) <= 10 else colormaps["turbo"](np.linspace(0, 1, len(curves)))
    seeds = {label: len(groups[label]) for label in curves}
    for (label, (acc, cost, b)), colour in zip(curves.items(), colours):
        x, y = cost.mean(axis=0), 100.0 * acc.mean(axis=0)
        if band == "minmax":
            low, high = 100.0 * acc.min(axis=0), 100.0 * acc.max(axis=0)
        else:
            spread = 100.0 * (acc.std(axis=0, ddof=1) if len(acc) > 1 else np.zeros(acc.shape[1]))
            low, high = y - spread, y + spread
        ax.plot(x, y, marker="o", color=colour, label=f"{label} ({seeds[label]} seed{'s' * (seeds[label] > 1)})")
        ax.fill_between(x, low, high, color=colour, alpha=0.2, linewidth=0)
        if b is not None:
            b_x, b_y = b[1].mean(axis=0), 100.0 * b[0].mean(axis=0)
            order = np.argsort(b_x, kind="stable")
            ax.plot(b_x[order], b_y[order], linestyle="--", color=colour, label=f"{label}, budgeted batch")
    if axis == "step":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(_AXES[axis][1] + (" (mean over seeds)" if axis != "step" else ""))
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    what = "min-max over seeds" if band == "minmax" else "+-1 std over seeds"
    splits = _splits([r for evals in groups.values() for r in evals])
    ax.set_title(title if title is not None else f"mean accuracy per exit ({splits}; band: {what})")
    fig.tight_layout()
    return fig


def plot_reliability(
    results: Sequence[tuple[str, dict]],
    out_path: str | pathlib.Path,
    *,
    title: str | None = None,
    overwrite: bool = True,
) -> pathlib.Path:
    """Reliability diagrams of every exit of each evaluated run (one row per run, one panel per exit): accuracy
    against mean confidence over eval.json's equal-mass bins, raw and (when the run was calibrated before it was
    evaluated) temperature-scaled, with the diagonal of perfect calibration and each exit's ECE in its title."""
    from matplotlib.figure import Figure

    if not results:
        raise ValueError("no runs to plot")
    for name, result in results:
        if not isinstance(result, dict) or not (result.get("reliability") or {}).get("raw"):
            raise ValueError(f"run {name!r}: its evaluation has no reliability diagrams (evaluate it again with "
                             "this version of `cascadenet eval`)")  # fmt: skip
    cols = max(len(r["reliability"]["raw"]) for _, r in results)
    fig = Figure(figsize=(2.2 * cols, 2.4 * len(results)))
    axes = fig.subplots(len(results), cols, squeeze=False)
    for row, (name, result) in enumerate(results):
        rel = result["reliability"]
        for t in range(cols):
            ax = axes[row][t]
            if t >= len(rel["raw"]):
                ax.axis("off")
                continue
            ax.plot([0, 1], [0, 1], color="0.7", lw=0.8)
            ax.plot(rel["raw"][t]["confidence"], rel["raw"][t]["accuracy"], "o-", ms=2.5, lw=1, label="raw")
            text = f"ECE {100 * result['ece_per_exit'][t]:.1f}"
            if rel.get("calibrated"):
                c = rel["calibrated"][t]
                ax.plot(c["confidence"], c["accuracy"], "s-", ms=2.5, lw=1, label="temperature-scaled")
                text += f" / {100 * result['ece_per_exit_calibrated'][t]:.1f}"
            ax.set_title(f"exit {t}: {text}", fontsize=7)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.tick_params(labelsize=6)
            if t == 0:
                ax.set_ylabel(f"{name}\naccuracy", fontsize=7)
            if row == len(results) - 1:
                ax.set_xlabel("confidence", fontsize=7)
    axes[0][0].legend(fontsize=6, loc="upper left")
    fig.suptitle(title or f"reliability per exit ({_splits([r for _, r in results])}; ECE % raw / scaled)", fontsize=9)
    fig.tight_layout()
    return _save(fig, out_path, overwrite)
