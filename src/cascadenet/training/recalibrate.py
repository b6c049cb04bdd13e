"""Batch-norm statistics that match the weights ("precise BN").

Training keeps each batch norm's running statistics as an exponential moving average of batch statistics taken
while the weights moved, so at the end they describe weights a few hundred steps old. Usually the lag does not
matter. In a cascade with the stem delayed it does: the early steps' states do not depend on the input (nearly
constant fields whose variance is far below eps), and evaluation divides their deviation from a lagging running
mean by ``sqrt(running_var + eps)``, amplifying the lag by up to ``1/sqrt(eps)``: the early steps' softmax
saturates on one class for every input. ``recalibrate_bn`` recomputes every layer's statistics (every slot of a
temporal batch norm) as the plain average over a few batches at the final weights, as
``torch.optim.swa_utils.update_bn`` and fvcore's precise BN do; see docs/semantics.md.

- ``recalibrate_bn(model, batches)``: the library function, for any model holding batch norms.
- ``training_batches(...)``: batches drawn as training draws them (augmentation included) from a generator of
  their own, so that training's final recalibration and ``cascadenet recalibrate`` reproduce each other;
  ``run_training_batches(run_dir, ...)``: the same from a run directory (``cascadenet recalibrate``, and the EWS
  variants of ``cascadenet noise``).
- ``recalibrate_run(run_dir)``: ``cascadenet recalibrate``: new weights beside a finished run's.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..data import streaming
from ..data.datasets import ImageSet, load_dataset
from ..data.loader import iterate_batches, train_val_split
from ..evaluation.runtime import autocast, resolve_device
from ..models.checkpoint import WEIGHTS, CheckpointError, load_model, read_metadata, save_weights
from ..models.norm import TemporalBatchNorm2d
from ..runs.config import CONFIG, TrainConfig

__all__ = [
    "recalibrate_bn",
    "training_batches",
    "run_training_batches",
    "recalibrate_run",
    "RECALIBRATED",
    "RECALIBRATION_SEED",
]

RECALIBRATED = "model-recalibrated.safetensors"
# Added to the run's seed for the recalibration batches: a generator of their own, so that they neither depend on
# nor disturb the training generator's state (a resumed run draws the same ones).
RECALIBRATION_SEED = 0x5EED_BA7C


def _norm_layers(model: nn.Module) -> list[nn.Module]:
    """Every batch norm with running statistics: temporal ones (each slot) and PyTorch's (other families)."""
    return [
        m
        for m in model.modules()
        if isinstance(m, TemporalBatchNorm2d) or (isinstance(m, _BatchNorm) and m.track_running_stats)
    ]


def _first(batch: Any) -> Tensor:
    """The input of a batch given as ``x`` or as ``(x, y, ...)``."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, Tensor):
        raise TypeError(f"recalibrate_bn takes batches of tensors (or (x, y) pairs), got {type(x).__name__}")
    return x


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward: Callable[[nn.Module, Tensor], Any] | None = None,
) -> dict[str, int]:
    """Recompute the running statistics of every batch norm of ``model`` at its current weights.

    Each layer's statistics (each slot of a ``TemporalBatchNorm2d``, whose updates the step loop and the trajectory
    engine both make) are reset and replaced by the exact average of the batch statistics that the forward passes
    over ``batches`` fold into it: the mean of the batch means and of the unbiased batch variances (a cumulative
    average, ``momentum=None``, as ``torch.optim.swa_utils.update_bn``). A slot that several steps of one forward
    pass update (steps past the last slot, or a feed-forward pass that writes every slot) averages all of those
    updates equally. Statistics that no forward pass reaches keep their values. The passes run in training mode
    without gradients; afterwards every module's mode and every layer's momentum are as before. If the passes are
    interrupted (an error, Ctrl-C), the statistics are put back as they were.

    Args:
        model: any module; its batch norms are ``TemporalBatchNorm2d`` and ``nn.BatchNorm*`` (tracking statistics).
        batches: inputs ``x``, or ``(x, y)`` pairs (the labels are not used); moved to the model's device.
        forward: how to run the model on a batch (default ``model(x)``): e.g. the feed-forward pass for a model
            trained with ``--loss final``, or a pass under autocast.

    Returns:
        ``{"batches": n, "examples": m}``: what the statistics were computed from.

    Raises:
        ValueError: ``batches`` is empty.
    """
    layers = _norm_layers(model)
    param = next(itertools.chain(model.parameters(), model.buffers()), None)
    device = param.device if param is not None else None
    modes = [(m, m.training) for m in model.modules()]
    saved = [(m, m.momentum, {k: v.clone() for k, v in m.named_buffers(recurse=False)}) for m in layers]
    counts_before = [getattr(m, "slot_updates", None) for m in layers]
    run = forward or (lambda m, x: m(x))
    n_batches = n_examples = 0
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        for batch in batches:
            x = _first(batch)
            if device is not None:
                x = x.to(device, non_blocking=True)
            run(model, x)
            n_batches += 1
            n_examples += len(x)
        if n_batches == 0:
            raise ValueError("recalibrate_bn: no batches to compute the statistics from")
        for m, _, before in saved:
            _keep_unreached(m, before)
    except BaseException:
        for m, _, before in saved:  # the statistics as they were: no half-recalibrated model
            for k, v in m.named_buffers(recurse=False):
                v.copy_(before[k])
        for m, counts in zip(layers, counts_before):
            if counts is not None:
                m.slot_updates = counts
        raise
    finally:
        for m, momentum, _ in saved:
            m.momentum = momentum
        for m, training in modes:
            m.training = training
    return {"batches": n_batches, "examples": n_examples}


def _keep_unreached(m: nn.Module, before: dict[str, Tensor]) -> None:
    """Statistics that no forward pass updated keep their old values (not the reset's 0 and 1): e.g. the slots of
    residual branches that the serial scheme never computes, or a layer the forward pass does not use."""
    if isinstance(m, TemporalBatchNorm2d):
        for slot, n in enumerate(m.slot_updates):
            if n == 0:
                m.running_mean[slot] = before["running_mean"][slot]
                m.running_var[slot] = before["running_var"][slot]
    elif int(m.num_batches_tracked) == 0:
        for k, v in m.named_buffers(recurse=False):
            v.copy_(before[k])


def training_batches(
    train_set: ImageSet | streaming.FolderIndex,
    cfg: TrainConfig,
    mean: Tensor,
    std: Tensor,
    device: torch.device,
    count: int,
    *,
    batch_size: int | None = None,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[tuple[Tensor, Tensor]]:
    """``count`` batches drawn as training draws them (shuffled, augmented per ``cfg.augment``, of
    ``cfg.batch_size`` unless given, the last incomplete batch of an epoch dropped), from a generator seeded with
    ``cfg.seed + RECALIBRATION_SEED``: the same batches every time, whatever training's position. A training set
    with fewer than ``count`` batches is drawn again (a new permutation) until there are enough."""
    size = cfg.batch_size if batch_size is None else batch_size
    generator = torch.Generator().manual_seed(cfg.seed + RECALIBRATION_SEED)
    done = 0
    while done < count:
        if isinstance(train_set, streaming.FolderIndex):
            epoch = streaming.stream_batches(
                train_set, size, train=cfg.augment, shuffle=True, mean=mean, std=std, device=device,
                generator=generator, drop_last=True, shard=shard, workers=cfg.workers,
            )  # fmt: skip
        else:
            epoch = iterate_batches(train_set, size, shuffle=True, augment=cfg.augment, mean=mean, std=std,
                                    generator=generator, drop_last=True, shard=shard)  # fmt: skip
        before = done
        for batch in itertools.islice(epoch, count - done):
            done += 1
            yield batch
        if done == before:
            raise ValueError(f"batch size {size} is larger than the training set ({len(train_set)} examples)")


def recalibrate_run(
    run_dir: str | os.PathLike,
    *,
    batches: int | None = None,
    output: str = RECALIBRATED,
    data_root: str | None = None,
    device: str = "auto",
) -> tuple[Path, dict[str, int]]:
    """``cascadenet recalibrate``: recompute the batch-norm statistics of a finished run's final weights over
    training batches (drawn as training's own recalibration draws them) and write them beside the old ones.

    The new file has the weights file's metadata plus ``"recalibration": {"batches", "examples"}``; evaluate it
    with ``evaluate(run_dir, weights=output)``. An existing file is never replaced.

    Args:
        run_dir: a run directory with its final weights (``model.safetensors``).
        batches: how many training batches (default: the run's ``recalibrate_batches``, or 4 when that is 0).
        output: the file name, in the run directory (``.safetensors``).
        data_root: the dataset folder, if it moved since training.
        device: cpu, cuda, cuda:N or auto.

    Returns:
        The path written and the recalibration record.

    Raises:
        FileExistsError: the output exists (nothing was written).
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
    if target.exists():
        raise FileExistsError(f"{target} exists (nothing was written)")
    cfg = TrainConfig.from_file(run_dir / CONFIG)
    count = batches or cfg.recalibrate_batches or 4
    dev = resolve_device(device)
    data = run_training_batches(run_dir, count, data_root=data_root, device=dev)
    meta = read_metadata(source)
    model = load_model(source, map_location=dev)
    amp = dev.type == "cuda" if cfg.amp is None else cfg.amp
    channels_last = dev.type == "cuda" if cfg.channels_last is None else cfg.channels_last
    record = recalibrate_bn(model, data(), forward=calibration_forward(cfg, amp, channels_last))
    meta = {k: v for k, v in meta.items() if k != "model_config"}
    save_weights(target, model, {**meta, "recalibration": record}, overwrite=False)
    return target, record


def run_training_batches(
    run_dir: str | os.PathLike, count: int, *, data_root: str | None = None, device: str | torch.device = "cpu"
) -> Callable[[], Iterator[tuple[Tensor, Tensor]]]:
    """``count`` batches of a run's training part (never its validation or test split), normalised with the run's
    statistics and drawn as training's final recalibration draws them (``training_batches``): a function that
    returns a new iterator over the very same batches on every call. A run trained by several processes is
    drawn at its global batch (one process then sees the examples each batch-norm statistic saw).

    Raises:
        CheckpointError: no usable config.json.
        DataError: the dataset cannot be read (``data_root`` if it moved).
    """
    run_dir = Path(run_dir)
    cfg = TrainConfig.from_file(run_dir / CONFIG)
    stored = json.loads((run_dir / CONFIG).read_bytes())
    norm = stored.get("normalization") if isinstance(stored, dict) else None
    if not (isinstance(norm, dict) and isinstance(norm.get("mean"), list) and isinstance(norm.get("std"), list)):
        raise CheckpointError(f"{run_dir / CONFIG}: no normalization statistics (not written by cascadenet train?)")
    processes = stored.get("processes", 1) if isinstance(stored.get("processes", 1), int) else 1
    dev = torch.device(device)
    mean = torch.tensor(norm["mean"], dtype=torch.float32)
    std = torch.tensor(norm["std"], dtype=torch.float32)
    root = data_root or cfg.data_root
    if cfg.stream == "on":
        if root is None:
            raise ValueError("the run streamed an image folder: pass --data-root with its files")
        full: Any = streaming.index_folder(root, "train", cfg.image_size or streaming.DEFAULT_SIZE)
    else:
        full = load_dataset(cfg.dataset, root, "train", image_size=cfg.image_size, synthetic_size=cfg.synthetic_size,
                            seed=cfg.seed, holdout_classes=cfg.holdout_classes)  # fmt: skip
    train_set = train_val_split(full, cfg.val_fraction, seed=cfg.seed)[0]
    if isinstance(train_set, ImageSet):
        train_set = train_set.to(dev)
    return lambda: training_batches(train_set, cfg, mean, std, dev, count, batch_size=cfg.batch_size * processes)


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
