"""Prediction on image files (``cascadenet predict RUN PATH...``): no labels, no dataset; each image gets the class
name, its probability, the exit it stopped at and the multiply-accumulates spent, written as CSV or JSON.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..evaluation.early_exit import Predictions, predict
from ..evaluation.policies import Policy
from ..utils.device import resolve_device
from ..utils.files import atomic_write
from .images import expand_paths
from .loading import load_model

__all__ = ["FIELDS", "check_output", "predict_files", "format_records"]

# the columns of a CSV (the keys of each JSON record), in order
FIELDS = ("path", "class", "label", "probability", "exit", "macs")


def check_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse, before any work, an output that is not .csv or .json, or that exists without ``overwrite``."""
    path = Path(path)
    if path.suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"{path}: --output for image files takes a .csv or .json file name")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it (nothing was written)")
    if not path.parent.is_dir():
        raise ValueError(f"{path}: the folder {path.parent} of --output does not exist")
    return path


def predict_files(
    source: str | os.PathLike,
    paths: Sequence[str | os.PathLike],
    *,
    policy: Policy | None = None,
    budget: float | None = None,
    deadline: float | None = None,
    batch_size: int = 64,
    device: str = "auto",
    output: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Predict image files, folders (searched recursively) and glob patterns with a trained model's early exit.

    Args:
        source: a run directory or a weights file (``load_model``).
        paths: image files, folders and patterns (``images.expand_paths``).
        policy, budget: as for ``cascadenet.predict``.
        deadline: seconds per batch of ``batch_size`` images (``cascadenet.predict``'s ``deadline``).
        output: a ``.csv`` or ``.json`` file of one record per image (``FIELDS``); never replaces an existing file
            unless ``overwrite``.

    Returns:
        ``{"records": [...], "num_images", "mean_exit", "mean_macs", "wall_seconds", "output"}``; each record
        has ``path``, ``class`` (name), ``label`` (index), ``probability``, ``exit`` and ``macs``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if output is not None:
        output = check_output(output, overwrite)
    files = expand_paths(paths)
    if not files:
        raise ValueError("no image files given")
    model = load_model(source, map_location=resolve_device(device))
    dev = next(model.parameters()).device
    parts: list[Predictions] = []
    start = time.perf_counter()
    for i in tqdm(range(0, len(files), batch_size), desc="predict", disable=not progress, leave=False):
        x = model.preprocess(files[i : i + batch_size]).to(dev)
        parts.append(predict(model, x, policy, budget=budget, deadline=deadline))
    wall = time.perf_counter() - start
    result = Predictions.cat(parts)
    records = _records(files, result, model.classes)
    if output is not None:
        atomic_write(output, _encode(records, Path(output).suffix.lower()), overwrite=overwrite)
    return {
        "records": records,
        "num_images": len(records),
        "mean_exit": float(result.steps.float().mean()),
        "mean_macs": float(result.macs.double().mean()),
        "wall_seconds": wall,
        "output": None if output is None else str(output),
    }


def _records(files: list[Path], result: Predictions, classes: list[str] | None) -> list[dict[str, Any]]:
    confidence = result.confidence.tolist()
    return [
        {
            "path": str(f),
            "class": classes[k] if classes and k < len(classes) else str(k),
            "label": k,
            "probability": p,
            "exit": s,
            "macs": m,
        }  # fmt: skip
        for f, k, p, s, m in zip(
            files, result.predictions.tolist(), confidence, result.steps.tolist(), result.macs.tolist()
        )  # fmt: skip
    ]


def _encode(records: list[dict[str, Any]], suffix: str) -> bytes:
    if suffix == ".json":
        return (json.dumps(records, indent=1) + "\n").encode()
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return text.getvalue().encode()


def format_records(summary: dict[str, Any], limit: int = 50) -> str:
    """The predictions on one screen: a line per image (the first ``limit``), then the means."""
    lines = [f"{'exit':>4} {'probability':>11} {'class':<16} path"]
    for r in summary["records"][:limit]:
        lines.append(f"{r['exit']:>4} {r['probability']:>11.4f} {r['class']:<16} {r['path']}")
    if summary["num_images"] > limit:
        lines.append(f"... {summary['num_images'] - limit} more (write them all with -o FILE.csv)")
    lines.append(f"{summary['num_images']} images: mean exit {summary['mean_exit']:.2f}, mean MMACs "
                 f"{summary['mean_macs'] / 1e6:.3f}, {summary['wall_seconds']:.2f} s")  # fmt: skip
    if summary["output"]:
        lines.append(f"wrote {summary['output']}")
    return "\n".join(lines)
