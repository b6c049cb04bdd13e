"""Tests for cascadenet.plotting.plot_runs."""

from __future__ import annotations

import pathlib
import struct

import numpy as np
import pytest

from cascadenet.metrics import summarize
from cascadenet.plotting import plot_runs

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
