"""Tests for cascadenet.evaluation.plotting.plot_runs."""

from __future__ import annotations

import pathlib
import struct

import numpy as np
import pytest

from cascadenet.evaluation.metrics import summarize
from cascadenet.evaluation.plotting import plot_mean_curves, plot_runs

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _eval_dict(seed: int, *, macs: bool, feedforward: bool) -> dict:
    rng = np.random.default_rng(seed)
    num_steps, num_examples, num_classes = 4, 50, 5
    labels = rng.integers(0, num_classes, num_examples)
    drift = 1.5 * np.eye(num_classes)[labels] * np.arange(num_steps)[:, None, None]  # (T, N, C)
    result = summarize(rng.normal(size=(num_steps, num_examples, num_classes)) + drift, labels)
    if macs:
        result["macs_per_step"] = [1e6 * (t + 1) for t in range(num_steps)]
    if feedforward:
        result["feedforward_accuracy"] = 0.8
    return result


def _png_width(path: pathlib.Path) -> int:
    """Image width from the IHDR chunk, which follows the 8-byte signature and the chunk's length and type."""
    return struct.unpack(">I", path.read_bytes()[16:20])[0]


def _check_png(path: pathlib.Path) -> None:
    data = path.read_bytes()
    assert data[:8] == _PNG_SIGNATURE
    assert len(data) > 5_000


@pytest.mark.parametrize("num_runs", [1, 3])
@pytest.mark.parametrize("macs", [False, True])
def test_plot_runs_writes_png(tmp_path: pathlib.Path, num_runs: int, macs: bool) -> None:
    runs = [(f"run {i}", _eval_dict(i, macs=macs, feedforward=i == 0)) for i in range(num_runs)]
    out = tmp_path / "nested" / "dir" / "runs.png"  # parents do not exist yet
    returned = plot_runs(runs, out, title="test" if macs else None)
    assert returned == out
    _check_png(out)


def test_plot_runs_macs_panel_only_when_every_run_has_macs(tmp_path: pathlib.Path) -> None:
    with_macs = [("a", _eval_dict(0, macs=True, feedforward=False)), ("b", _eval_dict(1, macs=True, feedforward=False))]
    mixed = [with_macs[0], ("b", _eval_dict(1, macs=False, feedforward=False))]
    three_panels = plot_runs(with_macs, tmp_path / "three.png")
    two_panels = plot_runs(mixed, tmp_path / "two.png")
    _check_png(two_panels)
    assert _png_width(three_panels) > _png_width(two_panels)


def test_plot_runs_overwrites(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "runs.png"
    out.write_bytes(b"stale")
    plot_runs([("a", _eval_dict(0, macs=False, feedforward=True))], str(out))
    _check_png(out)


def test_plot_runs_rejects_empty(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        plot_runs([], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plot_runs_rejects_missing_keys(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="threshold_curve"):
        plot_runs([("a", {"accuracy_per_step": [0.5, 0.6]})], tmp_path / "x.png")


# ---------------------------------------------------------------------------------------------------------------
# Cost panels, splits and the mean curves of a reproduction report: the plotted data is checked, not pixels.


def _costed(seed: int, *, split: str = "test", budgeted: bool = True, steps: int = 4) -> dict:
    """An eval dict of a cascade-like model: step 0 costs 0 MACs and one block of latency."""
    rng = np.random.default_rng(seed)
    result = {
        "split": split,
        "accuracy_per_step": sorted(rng.uniform(0.2, 0.9, steps).tolist()),
        "threshold_curve": {"thresholds": [0.0, 1.0], "mean_step": [0.0, steps - 1.0], "accuracy": [0.2, 0.8]},
        "macs_per_step": [0, *[1e6 * (t + 1) + seed * 1e4 for t in range(steps - 1)]],
        "parallel_latency_blocks": [float(t + 1) for t in range(steps)],
        "budgeted_batch": None,
    }
    if budgeted:
        result["budgeted_batch"] = {"fit_split": "val", "q": [0.05, 1.0, 1.95],
                                    "accuracy": [0.5, 0.7, 0.6 + seed / 100], "mean_macs": [2e6, 1e6, 2.5e6],
                                    "mean_latency": [2.0, 1.5, 3.0]}  # fmt: skip
    return result


def test_plot_runs_cost_panels_keep_step_zero_on_linear_axes(tmp_path: pathlib.Path) -> None:
    from cascadenet.evaluation.plotting import _runs_figure

    a, b = _costed(0), _costed(1, split="val", budgeted=False)
    fig = _runs_figure([("a", a), ("b", b)], None)
    acc_ax, _, macs_ax, latency_ax = fig.axes
    assert macs_ax.get_xscale() == latency_ax.get_xscale() == "linear"
    first = macs_ax.lines[0]
    assert first.get_xdata()[0] == 0 and list(first.get_xdata()) == a["macs_per_step"]
    np.testing.assert_allclose(first.get_ydata(), 100 * np.asarray(a["accuracy_per_step"]))
    # a's budgeted-batch curve, dotted and sorted by cost; b has none
    dotted = [line for line in macs_ax.lines if line.get_linestyle() == ":"]
    assert len(dotted) == 1 and list(dotted[0].get_xdata()) == [1e6, 2e6, 2.5e6]
    np.testing.assert_allclose(dotted[0].get_ydata(), [70, 50, 60])
    assert list(latency_ax.lines[0].get_xdata()) == a["parallel_latency_blocks"]
    assert "(test, val splits)" in acc_ax.get_title() and "val" in latency_ax.get_title()
    single = _runs_figure([("a", a)], None)
    assert "(test split)" in single.axes[0].get_title()
    with pytest.raises(ValueError, match="parallel_latency_blocks has 2 entries"):
        plot_runs([("a", {**a, "parallel_latency_blocks": [1, 2]})], tmp_path / "x.png")


def test_plot_mean_curves_means_and_bands(tmp_path: pathlib.Path) -> None:
    from cascadenet.evaluation.plotting import _mean_curves_figure

    seeds = [_costed(s) for s in range(3)]
    acc = 100 * np.array([r["accuracy_per_step"] for r in seeds])
    macs = np.array([r["macs_per_step"] for r in seeds])
    out = plot_mean_curves({"td": seeds, "ce": [_costed(7)]}, tmp_path / "new" / "mean.png", budgeted=True)
    _check_png(out)

    fig = _mean_curves_figure({"td": seeds}, "macs", "minmax", True, None)
    ax = fig.axes[0]
    mean_line, budget_line = ax.lines
    assert mean_line.get_xdata()[0] == 0  # step 0, 0 MACs, is drawn
    np.testing.assert_allclose(mean_line.get_xdata(), macs.mean(axis=0))
    np.testing.assert_allclose(mean_line.get_ydata(), acc.mean(axis=0))
    band = ax.collections[0].get_paths()[0].vertices  # the polygon between the lower and the upper edge
    for x, low, high in zip(macs.mean(axis=0), acc.min(axis=0), acc.max(axis=0)):
        ys = band[np.isclose(band[:, 0], x), 1]
        assert ys.min() == pytest.approx(low) and ys.max() == pytest.approx(high)
    assert budget_line.get_linestyle() == "--"
    np.testing.assert_allclose(budget_line.get_xdata(), [1e6, 2e6, 2.5e6])
    np.testing.assert_allclose(budget_line.get_ydata(), [70, 50, 61])  # q = 1.95's accuracy: mean of .60, .61, .62
    assert "test split" in ax.get_title() and "min-max" in ax.get_title()

    std = _mean_curves_figure({"td": seeds}, "latency", "std", False, None).axes[0]
    band = std.collections[0].get_paths()[0].vertices
    ys = band[np.isclose(band[:, 0], 1.0), 1]  # latency 1: step 0
    spread = acc[:, 0].std(ddof=1)
    assert ys.min() == pytest.approx(acc[:, 0].mean() - spread) and ys.max() == pytest.approx(acc[:, 0].mean() + spread)
    step = _mean_curves_figure({"td": seeds}, "step", "minmax", False, "mine").axes[0]
    assert list(step.lines[0].get_xdata()) == [0, 1, 2, 3] and step.get_title() == "mine"


@pytest.mark.parametrize(
    ("groups", "kwargs", "match"),
    [
        ({}, {}, "non-empty mapping"),
        ({"td": []}, {}, "group 'td': needs a non-empty list"),
        ({"td": [_costed(0)]}, {"axis": "flops"}, "unknown axis 'flops'"),
        ({"td": [_costed(0)]}, {"band": "iqr"}, "unknown band 'iqr'"),
        ({"td": [_costed(0), _costed(1, steps=5)]}, {}, "4 and 5 exits cannot be averaged"),
        ({"td": [_costed(0)]}, {"axis": "step", "budgeted": True}, "needs a cost axis"),
        ({"td": [_costed(0), _costed(1, budgeted=False)]}, {"budgeted": True}, "eval 1: no budgeted-batch curve"),
        ({"td": [{"accuracy_per_step": [0.5]}]}, {}, "lacks 'macs_per_step'"),
        ({"td": [_costed(0)], 3: [_costed(1)]}, {}, "labels must be strings"),
    ],
)
def test_plot_mean_curves_refuses_bad_input(tmp_path: pathlib.Path, groups: dict, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plot_mean_curves(groups, tmp_path / "x.png", **kwargs)
    assert not (tmp_path / "x.png").exists()
