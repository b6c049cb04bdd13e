"""``cascadenet recalibrate``: precise batch norm for a finished run (``recalibrate_run``), and the forward pass
whose statistics training's running averages estimate (``calibration_forward``).

Why the statistics need recomputing after training: ``cascadenet.models.precise_bn`` and docs/semantics.md.
The operation itself is ``cascadenet.models.precise_bn.recalibrate_bn``; the batches are drawn by
``cascadenet.runs.data.training_batches``, as training's own final recalibration draws them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..models.checkpoint import WEIGHTS, CheckpointError, load_model, read_metadata, save_weights
from ..models.precise_bn import recalibrate_bn
from ..runs.config import CONFIG, TrainConfig
from ..runs.data import run_training_batches
from ..utils.device import autocast, resolve_device
from ..utils.files import check_writable
from ..utils.progress import logged

__all__ = ["recalibrate_run", "calibration_forward", "RECALIBRATED"]

RECALIBRATED = "model-recalibrated.safetensors"


def recalibrate_run(
    run_dir: str | os.PathLike,
    *,
    batches: int | None = None,
    output: str = RECALIBRATED,
    overwrite: bool = False,
    data_root: str | None = None,
    device: str = "auto",
) -> tuple[Path, dict[str, int]]:
    """``cascadenet recalibrate``: recompute the batch-norm statistics of a finished run's final weights over
    training batches (drawn as training's own recalibration draws them) and write them beside the old ones.

    The new file has the weights file's metadata plus ``"recalibration": {"batches", "examples"}``; evaluate it
    with ``evaluate(run_dir, weights=output)``. An existing file is replaced only with ``overwrite``, and the run's
    own weights (``model.safetensors``) never.

    Args:
        run_dir: a run directory with its final weights (``model.safetensors``).
        batches: how many training batches (default: the run's ``recalibrate_batches``, or 4 when that is 0).
        output: the file name, in the run directory (``.safetensors``; not ``model.safetensors``).
        overwrite: replace an existing ``output`` (an earlier recalibration's).
        data_root: the dataset folder, if it moved since training.
        device: cpu, cuda, cuda:N or auto.

    Returns:
        The path written and the recalibration record.

    Raises:
        FileExistsError: the output exists and ``overwrite`` is False (nothing was written).
        CheckpointError: not a finished run directory, or unreadable weights.
        ValueError: a bad option.
    """
    run_dir = Path(run_dir)
    if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int) or batches < 1):
        raise ValueError(f"--batches must be a positive integer, got {batches!r}")
    if not output or Path(output).name != output or not output.endswith(".safetensors"):
        raise ValueError(f"--output {output!r}: a .safetensors file name (written in the run directory)")
    if not (run_dir / CONFIG).is_file():
        raise CheckpointError(f"{run_dir}: no {CONFIG} here: not a run directory")
    source = run_dir / WEIGHTS
    if not source.is_file():
        raise CheckpointError(f"{run_dir}: no {WEIGHTS} here (training has not finished)")
    target = run_dir / output
    if output == WEIGHTS or (target.exists() and target.samefile(source)):  # (samefile: a case-blind file system)
        # the weights everything else is measured against: never replaced, --overwrite or not
        raise ValueError(f"--output {output}: the run's own weights are never replaced; name another file")
    if target.exists() and not overwrite:
        stem = output.removesuffix(".safetensors")
        raise FileExistsError(
            f"{target} exists (nothing was written): name another file with --output {stem}-2.safetensors, or "
            "pass --overwrite to replace it"
        )
    check_writable(run_dir, output)
    cfg = TrainConfig.from_file(run_dir / CONFIG)
    count = batches or cfg.recalibrate_batches or 4
    dev = resolve_device(device)
    data = run_training_batches(run_dir, count, data_root=data_root, device=dev)
    meta = read_metadata(source)
    model = load_model(source, map_location=dev)
    amp = dev.type == "cuda" if cfg.amp is None else cfg.amp
    channels_last = dev.type == "cuda" if cfg.channels_last is None else cfg.channels_last
    batches_in = logged(data(), count, f"recalibrate: {count} batches")  # a line every half minute
    record = recalibrate_bn(model, batches_in, forward=calibration_forward(cfg, amp, channels_last))
    meta = {k: v for k, v in meta.items() if k != "model_config"}
    save_weights(target, model, {**meta, "recalibration": record}, overwrite=overwrite)
    return target, record


def calibration_forward(cfg: TrainConfig, amp: bool, channels_last: bool) -> Callable[[nn.Module, Tensor], Any]:
    """The forward pass whose statistics training's running averages estimate: the feed-forward network for
    ``--loss final`` (which writes every slot), else the model's trajectory; under autocast as training runs."""

    def run(model: nn.Module, x: Tensor) -> Any:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feedforward = getattr(model, "feedforward", None) if cfg.loss == "final" else None
        with autocast(x.device.type, amp):
            return feedforward(x) if feedforward is not None else model(x)

    return run
