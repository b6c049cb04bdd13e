"""Calibration of every exit: expected calibration error, reliability diagrams, per-exit temperature scaling.

- Expected calibration error (ECE) of one exit: the examples sorted by confidence (max softmax) and cut into
  ``bins`` groups of (nearly) equal size ("equal mass": no bin is empty, as fixed-width bins are where a trained
  model's confidences crowd near 1); the sum over groups of |accuracy - mean confidence| weighted by the group's
  share of the examples. 0 is perfectly calibrated; in [0, 1].
- Temperature scaling (Guo et al., 2017): exit t's logits divided by one scalar T_t > 0 fitted on held-out data
  by minimising the negative log-likelihood. It never changes an exit's argmax, only its confidences.
  ``fit_temperatures`` fits one per exit on the validation split; ``calibrate_run`` (``cascadenet calibrate``) stores
  them with the run as ``temperatures.json``, which ``eval``, ``predict`` and ``policy`` use with ``--calibrated``
  (``cascadenet.evaluation.outputs``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.checkpoint import CheckpointError
from ..runs.load import check_run_dir, load_run
from ..utils.files import atomic_write
from .logits import dataset_logits

__all__ = [
    "BINS",
    "TEMPERATURES",
    "calibrate_run",
    "expected_calibration_error",
    "ece_per_exit",
    "fit_temperatures",
    "read_temperatures",
    "reliability",
]

BINS = 15
TEMPERATURES = "temperatures.json"
# log-temperatures are searched in [-_LOG_T, _LOG_T]: T from about 0.01 to 150
_LOG_T = 5.0


def _probs(logits: Any) -> torch.Tensor:
    return torch.as_tensor(logits).double().softmax(-1)


def _check_bins(bins: int, n: int) -> int:
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    if n < 1:
        raise ValueError("no examples")
    return min(bins, n)


def reliability(logits: Any, labels: Any, bins: int = BINS) -> dict[str, list[float]]:
    """One exit's reliability diagram over equal-mass bins: per bin the mean confidence, the accuracy and the
    share of examples. ``logits``: ``(N, C)``; ``labels``: ``(N,)``."""
    probs = _probs(logits)
    labels = torch.as_tensor(labels).long().cpu()
    if probs.dim() != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"logits must be (N, C) and labels (N,), got {tuple(probs.shape)} and {tuple(labels.shape)}")
    n = probs.shape[0]
    bins = _check_bins(bins, n)
    conf, pred = probs.max(dim=-1)
    order = torch.argsort(conf, stable=True)
    correct = (pred == labels).double()[order].numpy()
    conf = conf[order].numpy()
    groups = np.array_split(np.arange(n), bins)
    return {
        "confidence": [float(conf[g].mean()) for g in groups],
        "accuracy": [float(correct[g].mean()) for g in groups],
        "share": [len(g) / n for g in groups],
    }


def expected_calibration_error(logits: Any, labels: Any, bins: int = BINS) -> float:
    """The ECE of one exit's ``(N, C)`` logits over ``bins`` equal-mass bins (see the module docstring)."""
    r = reliability(logits, labels, bins)
    return float(sum(s * abs(a - c) for s, a, c in zip(r["share"], r["accuracy"], r["confidence"])))


def ece_per_exit(logits: Any, labels: Any, bins: int = BINS) -> list[float]:
    """The ECE of every exit of ``(E, N, C)`` logits."""
    logits = torch.as_tensor(logits)
    if logits.dim() != 3:
        raise ValueError(f"logits must be (E, N, C), got shape {tuple(logits.shape)}")
    return [expected_calibration_error(z, labels, bins) for z in logits]


def fit_temperatures(logits: Any, labels: Any) -> list[float]:
    """One temperature per exit of held-out ``(E, N, C)`` logits, minimising each exit's mean negative
    log-likelihood of ``labels`` over T in [e^-5, e^5].

    The NLL of logits / T is convex in 1 / T, so a ternary search on log T (unimodal there) finds the minimum; 60
    rounds narrow the interval below 1e-9 of a unit in log T.
    """
    z = torch.as_tensor(logits).double().cpu()
    y = torch.as_tensor(labels).long().cpu()
    if z.dim() != 3 or y.shape != z.shape[1:2]:
        raise ValueError(f"logits must be (E, N, C) and labels (N,), got {tuple(z.shape)} and {tuple(y.shape)}")
    if z.shape[1] == 0:
        raise ValueError("no examples to fit temperatures on")

    def nll(log_t: torch.Tensor) -> torch.Tensor:  # (E,) log-temperatures -> (E,) mean NLL
        scaled = z / log_t.exp()[:, None, None]
        return -scaled.log_softmax(-1).gather(2, y.expand(z.shape[0], -1)[..., None]).mean(dim=(1, 2))

    lo = torch.full((z.shape[0],), -_LOG_T, dtype=torch.float64)
    hi = torch.full((z.shape[0],), _LOG_T, dtype=torch.float64)
    for _ in range(60):
        a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        left = nll(a) < nll(b)  # the minimum is not in (b, hi]
        hi = torch.where(left, b, hi)
        lo = torch.where(left, lo, a)
    return [float(t) for t in ((lo + hi) / 2).exp()]


def read_temperatures(run_dir: str | os.PathLike, num_exits: int | None = None) -> list[float] | None:
    """The temperatures ``cascadenet calibrate`` stored with a run (None when it has none), checked to be one
    positive number per exit when ``num_exits`` is given."""
    path = Path(run_dir) / TEMPERATURES
    if not path.is_file():
        return None
    try:
        temps = json.loads(path.read_text())["temperatures"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a temperatures file written by `cascadenet calibrate` ({e})") from None
    if not isinstance(temps, list) or not all(isinstance(t, (int, float)) and t > 0 for t in temps):
        raise CheckpointError(f"{path}: 'temperatures' must be a list of positive numbers")
    if num_exits is not None and len(temps) != num_exits:
        raise CheckpointError(f"{path}: {len(temps)} temperatures for a model with {num_exits} exits "
                              "(run `cascadenet calibrate` again with --overwrite)")  # fmt: skip
    return [float(t) for t in temps]


def calibrate_run(
    run_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    data_root: str | None = None,
    batch_size: int = 500,
    device: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """``cascadenet calibrate``: per-exit temperatures fitted on the run's validation split, written to
    ``RUN_DIR/temperatures.json`` (with the validation ECE of every exit before and after); returns its content.
    An existing file is replaced only with ``overwrite`` (checked before any work)."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {batch_size!r}")
    path = run_dir / TEMPERATURES
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to fit the temperatures again")
    loaded = load_run(run_dir, split="val", data_root=data_root, device=device)
    logits = dataset_logits(loaded.model, loaded.data, loaded.mean, loaded.std, batch_size=batch_size,
                            amp=loaded.amp, progress=progress, desc="calibrate")  # fmt: skip
    labels = loaded.data.labels.cpu()
    temps = fit_temperatures(logits, labels)
    scaled = logits.double() / torch.tensor(temps, dtype=torch.float64)[:, None, None]
    record = {
        "temperatures": temps,
        "fit_split": "val",
        "num_examples": int(labels.numel()),
        "bins": BINS,
        "val_ece_per_exit": ece_per_exit(logits, labels),
        "val_ece_per_exit_calibrated": ece_per_exit(scaled, labels),
    }
    atomic_write(path, (json.dumps(record, indent=2) + "\n").encode(), overwrite=overwrite)
    return record
