"""Anytime evaluation of a trained run: per-step accuracy, the threshold policy's speed-accuracy curve,
areas under both, and the cost of every step in multiply-accumulates.

Definitions (also in the README):
- accuracy at step t: fraction of test examples whose argmax at step t is the label;
- anytime AUC: area under accuracy against normalised time t / (T - 1), trapezoidal, in [0, 1];
- threshold policy: for a threshold q, each example stops at the first step whose max softmax >= q (else at
  the last step), never before the first step that can see the input (step 1 with the stem delayed); the
  curve is accuracy against mean stopping step over a grid of q in [0, 1], and its area is taken against mean
  stopping step / (T - 1), starting from (0, accuracy at step 0) and extended flat to 1;
- steps to 50% / 95%: the first step whose accuracy reaches that fraction of the final step's accuracy;
- MACs: serial hardware, cumulative multiply-accumulates per example to produce steps 0..t (each distinct
  state computed once); parallel hardware, latency in blocks (one block per step).

Only the anytime-model interface (``cascadenet.anytime``) is used, so any model family evaluates the same way and
writes the same eval.json ("step" there means exit). What a family lacks is null: ``feedforward_accuracy`` and
``macs_feedforward`` without a ``feedforward`` method, ``scheme`` for a model that has no execution schemes.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import metrics
from .checkpoint import WEIGHTS, CheckpointError, atomic_write, load_model
from .datasets import load_dataset
from .loader import check_compatible, iterate_batches
from .registry import config_from_dict
from .runconfig import CONFIG, TrainConfig
from .runtime import dataset_logits, resolve_device

__all__ = ["evaluate", "eval_filename", "format_table"]


def eval_filename(
    scheme: str | None, model_scheme: str | None, num_steps: int | None, weights: str | None = None
) -> str:
    """``eval.json`` for the model's own scheme and length; ``eval-serial.json``, ``eval-T20.json`` otherwise.
    Weights other than ``model.safetensors`` add their name: ``model-recalibrated.safetensors`` ->
    ``eval-recalibrated.json``, ``other.safetensors`` -> ``eval-other.json``."""
    parts = []
    if weights and weights != WEIGHTS:
        stem = Path(weights).name.removesuffix(".safetensors")
        parts.append(stem.removeprefix("model-") or stem)
    if scheme and scheme != model_scheme:
        parts.append(scheme)
    if num_steps:
        parts.append(f"T{num_steps}")
    return "eval.json" if not parts else f"eval-{'-'.join(parts)}.json"


def evaluate(
    run_dir: str | os.PathLike,
    *,
    split: str = "test",
    scheme: str | None = None,
    num_steps: int | None = None,
    data_root: str | None = None,
    batch_size: int = 500,
    device: str = "auto",
    save_logits: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = False,
    weights: str | None = None,
) -> dict[str, Any]:
    """Evaluate a run on its dataset's test split; writes ``eval.json`` (or a scheme/length-specific name) in
    the run directory and returns its content.

    Args:
        run_dir: a run directory written by ``cascadenet train``.
        split: ``test`` (default) or ``train``.
        scheme: evaluate the same weights in another scheme (``parallel``/``serial``).
        num_steps: run this many steps instead of the model's own.
        data_root: override the dataset location stored in the run.
        save_logits: also store the trajectory logits ``(T, N, C)`` and labels in this ``.npz`` file.
        overwrite: allow ``save_logits`` to replace an existing file.
        weights: a weights file in the run directory to evaluate instead of ``model.safetensors`` (e.g.
            ``cascadenet recalibrate``'s ``model-recalibrated.safetensors``); the file name says so
            (``eval-recalibrated.json``).
    """
    run_dir = Path(run_dir)
    try:
        return _evaluate(run_dir, split, scheme, num_steps, data_root, batch_size, device, save_logits, overwrite,
                         progress, weights)  # fmt: skip
    except OSError as e:  # an unreadable run directory or data, a full disk: one line naming the file
        if isinstance(e, FileExistsError) and not e.strerror:
            raise
        raise CheckpointError(f"{e.filename or run_dir}: {e.strerror or e}") from None


def _evaluate(
    run_dir: Path,
    split: str,
    scheme: str | None,
    num_steps: int | None,
    data_root: str | None,
    batch_size: int,
    device: str,
    save_logits: str | os.PathLike | None,
    overwrite: bool,
    progress: bool,
    weights: str | None = None,
) -> dict[str, Any]:
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory")
    if not (run_dir / CONFIG).is_file():
        raise CheckpointError(f"{run_dir}: no {CONFIG} here: not a run directory")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
        raise ValueError(f"--num-steps must be a positive integer, got {num_steps!r}")
    if save_logits is not None:  # checked before the evaluation, not after it
        save_logits = Path(save_logits)
        if save_logits.suffix != ".npz":
            raise ValueError(f"{save_logits}: --save-logits takes a .npz file name")
        if save_logits.exists() and not overwrite:
            raise FileExistsError(f"{save_logits} exists; pass --overwrite to replace it (nothing was written)")
        if not save_logits.parent.is_dir():
            raise ValueError(f"{save_logits}: the folder {save_logits.parent} of --save-logits does not exist")
        if not os.access(save_logits.parent, os.W_OK | os.X_OK):
            raise ValueError(f"{save_logits}: the folder {save_logits.parent} of --save-logits is not writable")
    cfg = TrainConfig.from_file(run_dir / CONFIG)
    stored = json.loads((run_dir / CONFIG).read_bytes())  # from_file read it: it is a JSON object
    norm = stored.get("normalization") if isinstance(stored, dict) else None
    if not (isinstance(norm, dict) and isinstance(norm.get("mean"), list) and isinstance(norm.get("std"), list)):
        raise CheckpointError(f"{run_dir / CONFIG}: no normalization statistics (not written by cascadenet train?)")
    if weights is not None:
        if not weights.endswith(".safetensors") or Path(weights).name != weights:
            raise ValueError(f"--weights {weights!r}: the name of a .safetensors file in the run directory")
        if not (run_dir / weights).is_file():
            raise CheckpointError(f"{run_dir / weights}: no such weights file in the run directory")
    dev = resolve_device(device)
    model = load_model(run_dir if weights is None else run_dir / weights, map_location=dev)
    _check_model(run_dir, stored.get("model"), model.config)
    finished = (run_dir / "model.safetensors").is_file()
    # options of a model's run (cascades: scheme, num_steps), passed only when given: other families lack them
    run_options = {k: v for k, v in (("scheme", scheme), ("num_steps", num_steps)) if v is not None}

    ds = load_dataset(cfg.dataset, data_root or cfg.data_root, split, image_size=cfg.image_size,
                      synthetic_size=cfg.synthetic_size, seed=cfg.seed)  # fmt: skip
    check_compatible(ds, model.config.in_channels, model.config.num_classes)
    try:
        mean, std = torch.tensor(norm["mean"], dtype=torch.float32), torch.tensor(norm["std"], dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{run_dir / CONFIG}: unreadable normalization statistics ({e})") from None
    if mean.shape != (ds.num_channels,) or std.shape != (ds.num_channels,):
        raise CheckpointError(f"{run_dir / CONFIG}: normalization statistics for {mean.numel()} channels, but the "
                              f"data has {ds.num_channels}")  # fmt: skip
    ds = ds.to(dev)
    amp = dev.type == "cuda" if cfg.amp is None else cfg.amp
    input_size = tuple(ds.images.shape[1:])
    # refuse an option the model's family lacks up front, rather than catching a TypeError that could come from
    # anywhere inside the model
    lacking = [k for k in run_options if k not in inspect.signature(model.exit_costs).parameters]
    if lacking:
        raise ValueError(f"this {model.config.family} model takes no {' or '.join(lacking)} option")
    costs = model.exit_costs(input_size, **run_options)
    logits = dataset_logits(model, ds, mean, std, batch_size=batch_size, amp=amp, progress=progress,
                            desc="evaluate", **run_options)  # fmt: skip
    labels = ds.labels.cpu()
    feedforward = getattr(model, "feedforward", None)
    ff_accuracy = ff_macs = None
    if feedforward is not None:
        batches = iterate_batches(ds, batch_size, shuffle=False, augment=False, mean=mean, std=std)
        with torch.no_grad():
            ff = [feedforward(x).argmax(-1).cpu() for x, _ in batches]
        ff_accuracy = float((torch.cat(ff) == labels).float().mean())
        count = getattr(model, "feedforward_macs", None)
        ff_macs = count(input_size) if count is not None else None
    summary = metrics.summarize(logits, labels, first_step=model.first_informative_exit)
    model_scheme = getattr(model, "scheme", None)
    result = {
        "run": run_dir.name,
        "split": split,
        "scheme": scheme or model_scheme,
        "finished_training": finished,
        **({"weights": weights} if weights is not None else {}),
        **summary,
        "feedforward_accuracy": ff_accuracy,
        "macs_per_step": costs.macs,
        "parallel_latency_blocks": costs.latency,
        "macs_feedforward": ff_macs,
        "model": model.config.to_dict(),
    }
    name = eval_filename(scheme, model_scheme, num_steps, weights)
    if save_logits is not None:  # atomically, and never over a file that appeared meanwhile unless --overwrite
        buffer = io.BytesIO()
        np.savez_compressed(buffer, logits=logits.numpy(), labels=labels.numpy())
        atomic_write(save_logits, buffer.getvalue(), overwrite=overwrite)
    atomic_write(run_dir / name, (json.dumps(result, indent=2) + "\n").encode())
    return result


def _check_model(run_dir: Path, stored: Any, found: Any) -> None:
    """The weights in a run directory are those of the model its config.json describes."""
    if not isinstance(stored, dict):
        return  # no model record to compare with (a hand-made run directory)
    try:
        described = config_from_dict(stored)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{run_dir / CONFIG}: unreadable model configuration: {e}") from None
    if described != found:
        source = "model.safetensors" if (run_dir / "model.safetensors").is_file() else "checkpoint.pt"
        diff = (
            "; ".join(
                f"{f.name} {getattr(found, f.name)} vs {getattr(described, f.name)}"
                for f in dataclasses.fields(found)
                if type(found) is type(described) and getattr(found, f.name) != getattr(described, f.name)
            )
            or f"a {found.family} model vs a {described.family} model"
        )
        raise CheckpointError(
            f"{run_dir / source} holds another model than {run_dir / CONFIG} describes ({source} vs {CONFIG}: {diff})"
        )


def format_table(result: dict[str, Any]) -> str:
    """A short text table of an evaluation: accuracy and cost per step, then the summary numbers."""
    acc = result["accuracy_per_step"]
    macs = result["macs_per_step"]
    lines = [f"{result['run']} ({result['scheme']}, {result['num_examples']} {result['split']} examples)",
             f"{'step':>4} {'accuracy':>9} {'cum. MMACs':>11}"]  # fmt: skip
    for t, (a, m) in enumerate(zip(acc, macs)):
        lines.append(f"{t:>4} {100 * a:>8.2f}% {m / 1e6:>11.2f}")
    s50, s95 = result["steps_to_50pct_final"], result["steps_to_95pct_final"]
    if result.get("feedforward_accuracy") is not None:
        lines.append(
            f"feed-forward accuracy {100 * result['feedforward_accuracy']:.2f}% "
            f"({result['macs_feedforward'] / 1e6:.2f} MMACs)"
        )
    lines += [
        f"anytime AUC {result['anytime_auc']:.4f}   threshold-policy AUC {result['threshold_auc']:.4f}",
        f"first step reaching 50% / 95% of final accuracy: {s50} / {s95}",
    ]
    return "\n".join(lines)
