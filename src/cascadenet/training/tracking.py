"""Experiment tracking of a training run (``--log csv,tensorboard``), the best-validation weights and early stopping.

Back-ends, each imported only when asked for:

- ``csv``: ``train_log.csv`` in the run directory, one row per optimizer step (``step, epoch, loss, lr``: the
  step's loss and the learning rate it was taken with), and ``val_log.csv``, one row per epoch (``epoch, step,
  train_loss, val_anytime_auc, val_accuracy_exit_0, ...``);
- ``tensorboard``: the same scalars (``train/loss``, ``train/lr``, ``val/anytime_auc``, ``val/accuracy_exit_k``)
  in ``RUN/tensorboard`` through ``torch.utils.tensorboard`` (needs the ``tensorboard`` package:
  ``pip install cascadenet[tracking]``).

A resumed run continues the same logs: rows past its checkpoint (written after it by a killed process) are dropped
first, so the logs hold every step once. Per-step losses are read in groups of ten steps, where the loop reads
them anyway (no extra synchronisation per step on a GPU).

``--keep-best`` writes ``model-best.safetensors`` beside the final weights whenever the validation anytime AUC
improves, and ``--early-stop N`` ends training when it has not improved for N epochs (the final weights are then
the last epoch's, not recalibrated). Both are decided from ``metrics.jsonl``, so a resumed run decides the same.
"""

from __future__ import annotations

import csv
import importlib.util
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..utils.files import atomic_write

__all__ = ["BACKENDS", "BEST", "Tracker", "backends", "best_epoch", "stopped_early"]

BACKENDS = ("csv", "tensorboard")
BEST = "model-best.safetensors"
TRAIN_LOG = "train_log.csv"
VAL_LOG = "val_log.csv"


def backends(spec: str | None) -> list[str]:
    """The back-ends ``--log`` names (comma-separated), checked: an unknown name, or tensorboard without its
    package, is a ``ValueError`` of one line (raised before anything is written)."""
    if not spec:
        return []
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown --log back-end {unknown[0]!r}; valid choices: {', '.join(BACKENDS)}")
    if "tensorboard" in names and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("--log tensorboard needs the tensorboard package: pip install tensorboard (or use --log csv)")
    return list(dict.fromkeys(names))


def best_epoch(rows: Sequence[dict[str, Any]]) -> int | None:
    """The epoch of the best validation anytime AUC among the metrics rows (the first on a tie)."""
    best = None
    for r in rows:
        auc = r.get("val_anytime_auc")
        if isinstance(auc, (int, float)) and (best is None or auc > best[1]):
            best = (r["epoch"], auc)
    return None if best is None else best[0]


def stopped_early(rows: Sequence[dict[str, Any]], patience: int | None) -> bool:
    """Whether ``--early-stop patience`` ends the run after these metrics rows."""
    if not patience or not rows:
        return False
    best = best_epoch(rows)
    return best is not None and rows[-1]["epoch"] - best >= patience


class Tracker:
    """The run's logs, opened at the position the run starts from (``step`` optimizer steps, ``epoch`` epochs)."""

    def __init__(self, run_dir: Path, names: list[str], step: int, epoch: int) -> None:
        self.run_dir = run_dir
        self.csv = "csv" in names
        self.pending: list[tuple[int, int, torch.Tensor, float]] = []
        self.writer = None
        if self.csv:
            _trim(run_dir / TRAIN_LOG, "step", step)
            _trim(run_dir / VAL_LOG, "epoch", epoch)
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step + 1 if step else None)

    def batch(self, step: int, epoch: int, loss: torch.Tensor, lr: float) -> None:
        """One optimizer step (its loss stays on the device until ``flush``)."""
        self.pending.append((step, epoch, loss.detach(), lr))

    def flush(self) -> None:
        if not self.pending:
            return
        losses = torch.stack([p[2] for p in self.pending]).float().cpu().tolist()
        rows = [(step, epoch, loss, lr) for (step, epoch, _, lr), loss in zip(self.pending, losses)]
        self.pending = []
        if self.csv:
            _append(self.run_dir / TRAIN_LOG, ["step", "epoch", "loss", "lr"], rows)
        if self.writer is not None:
            for step, _, loss, lr in rows:
                self.writer.add_scalar("train/loss", loss, step)
                self.writer.add_scalar("train/lr", lr, step)

    def epoch(self, row: dict[str, Any]) -> None:
        """An epoch's metrics row (validation accuracy per exit and anytime AUC)."""
        self.flush()
        acc = row["val_accuracy_per_step"]
        if self.csv:
            header = [
                "epoch",
                "step",
                "train_loss",
                "val_anytime_auc",
                *(f"val_accuracy_exit_{k}" for k in range(len(acc))),
            ]
            _append(self.run_dir / VAL_LOG, header,
                    [[row["epoch"], row["step"], row["train_loss"], row["val_anytime_auc"], *acc]])  # fmt: skip
        if self.writer is not None:
            self.writer.add_scalar("val/anytime_auc", row["val_anytime_auc"], row["step"])
            for k, a in enumerate(acc):
                self.writer.add_scalar(f"val/accuracy_exit_{k}", a, row["step"])
            self.writer.flush()

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _append(path: Path, header: list[str], rows: Sequence[Sequence[Any]]) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(header)
        w.writerows(rows)


def _trim(path: Path, key: str, last: int) -> None:
    """Drop the rows of a log past ``last`` (by its ``key`` column): what a killed process wrote after the
    checkpoint the run resumes from."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or key not in rows[0]:
        return
    col = rows[0].index(key)
    kept = [rows[0]] + [r for r in rows[1:] if len(r) > col and r[col].isdigit() and int(r[col]) <= last]
    if len(kept) != len(rows):
        buffer = io.StringIO()
        csv.writer(buffer).writerows(kept)
        atomic_write(path, buffer.getvalue().encode())
