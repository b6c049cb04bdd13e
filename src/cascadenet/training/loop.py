"""Training: one explicit loop, a resumable run directory, and the same code path on CPU and GPU.

A run directory holds
- ``config.json``: the resolved configuration (replay it with ``cascadenet train --config RUN/config.json``);
- ``checkpoint.pt``: model, optimizer, scheduler, RNG state, position and the epoch's running sums, written
  atomically at every epoch end before validating (and every ``checkpoint_every`` steps, and on Ctrl-C or
  SIGTERM), so a kill at any moment leaves the previous one;
- ``metrics.jsonl``: one line per epoch (train loss, throughput, validation accuracy per exit and AUC), rewritten
  atomically; a row lost to a kill after the epoch's checkpoint is recomputed on resume;
- ``model.safetensors``: the final weights, with the model configuration as metadata (and, with
  ``recalibrate_batches``, the batch-norm statistics recomputed at those weights: see
  ``cascadenet.training.recalibrate``);
- ``train.lock`` while a process trains it (``cascadenet.runs.lock``): one live process per run directory.

Resuming restores everything the loop depends on (the batch order of an epoch is drawn from a generator
whose state at the epoch start is saved, so resuming mid-epoch skips exactly the batches already done);
on CPU a resumed run ends with the same weights and the same metrics as an uninterrupted one. Before anything
is written, a resumed run checks that its checkpoint and weights hold the model its config.json describes and
that the data is the data it was trained on (``cascadenet.training.claim``). A new run that stops before its first
checkpoint leaves nothing. The set-up and the session it makes are in ``cascadenet.training.session``; this module
runs the loop over the session: epochs, checkpoints, validation and the metrics rows.

Training uses only the anytime-model interface (``cascadenet.models.anytime``): any registered model family trains here.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shlex
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import streaming
from ..data.loader import iterate_batches
from ..evaluation import metrics
from ..evaluation.logits import dataset_logits
from ..models.checkpoint import CHECKPOINT, WEIGHTS, save_checkpoint, save_weights
from ..models.precise_bn import recalibrate_bn
from ..runs.config import CONFIG, RESUMABLE, ConfigError, TrainConfig, changed_options, check_resume_overrides
from ..runs.data import training_batches
from ..utils.device import autocast
from ..utils.files import atomic_write
from . import distributed, tracking
from .claim import TrainingError, data_shape
from .interrupts import Interrupts, Terminated, catch_signals
from .optim import compute_loss, lr_at
from .recalibrate import calibration_forward
from .session import METRICS, _EpochStats, _release, _rng_state, _Session, _start, _write
from .session import _load_data as _load_data  # read here by tests, where it was before session.py

# TrainConfig, ConfigError, CONFIG, RESUMABLE and the resume policy live in runs/config.py (evaluation reads them
# without the training loop), TrainingError in claim.py and lr_at in optim.py; they are re-exported here, where
# the first release had them. The loop calls compute_loss through this module's name (tests patch it here), and so
# do save_checkpoint, recalibrate_bn, dataset_logits, _train_epoch and _release; the set-up is in session.py.
__all__ = [
    "CONFIG",
    "ConfigError",
    "RESUMABLE",
    "TrainConfig",
    "changed_options",
    "TrainingError",
    "ConfigError",
    "Terminated",
    "train",
    "lr_at",
    "RESUMABLE",
    "check_resume_overrides",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# The loop (the session and its set-up: session.py)


def train(
    cfg: TrainConfig | None = None,
    *,
    resume: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    data: tuple | None = None,
) -> Path:
    """Train a model; returns the run directory.

    While it trains, the process holds the run directory's lock (``cascadenet.runs.lock``), and Ctrl-C or SIGTERM
    (where the program left their handlers at the defaults) checkpoint the current step and raise
    ``KeyboardInterrupt`` or :class:`Terminated`. A new run that stops before its first checkpoint leaves nothing.

    Args:
        cfg: the configuration (ignored when resuming: the run's stored configuration is used).
        resume: a run directory to continue from its last checkpoint (or from the start if it has none).
        overrides: options given for a resumed run, by command-line name (as ``TrainConfig.options``); those
            equal to the stored ones are no change, and only the ``RESUMABLE`` ones may differ (where and how
            fast it runs, not what it computes).
        data: the data given from Python (``cascadenet.training.fit`` makes it: the full training set, its
            training and validation parts, the normalisation); default: read as the configuration says.

    Raises:
        TrainingError: the run directory is in the way or in use, the checkpoint does not fit the run, the loss
            diverged, or a file could not be written (full disk).
        cascadenet.models.checkpoint.CheckpointError: the checkpoint or weights file is unreadable.
        cascadenet.data.datasets.DataError: the dataset is missing or malformed, or not the one a resumed run used.
        ValueError: a bad option or combination of options.
    """
    world = distributed.setup()
    try:
        with distributed.quiet_followers(world), catch_signals() as interrupts:
            return _train(cfg, resume, overrides, interrupts, world, data)
    finally:
        distributed.teardown(world)


def _train(
    cfg: TrainConfig | None,
    resume: str | os.PathLike | None,
    overrides: dict[str, Any] | None,
    interrupts: Interrupts,
    world: distributed.World | None,
    data: tuple | None = None,
) -> Path:
    s = _start(cfg or TrainConfig(), resume, overrides or {}, interrupts, world, _Objective, data)
    try:
        names = tracking.backends(s.cfg.log)  # checked before the first write of the logs
        if names and s.main:
            s.tracker = tracking.Tracker(s.run_dir, names, s.step, s.epoch)
        start = s.saved
        if s.done is not None and not any(r["epoch"] == s.epoch for r in s.rows):
            _recalibrate(s)
            _record(s, _validate(s, s.done))  # killed between the epoch's checkpoint and its metrics row
        s.done = None
        while s.epoch < s.cfg.epochs and not tracking.stopped_early(s.rows, s.cfg.early_stop):
            _train_epoch(s)
            with s.interrupts.critical():
                s.done = _epoch_summary(s)
                s.epoch, s.batch_done = s.epoch + 1, 0
                s.stats = _EpochStats(torch.zeros((), device=s.device))
                s.epoch_gen_state = s.generator.get_state()
            _checkpoint(s)  # before validating: an interruption there loses nothing
            _recalibrate(s)  # after the checkpoint, which keeps the training state (the running averages)
            _record(s, _validate(s, s.done))
            s.done = None
        write = not (s.resumed and s.saved == start and (s.run_dir / WEIGHTS).is_file())  # else: finished before
        if s.world is not None:  # every process recalibrates or none (synchronised batch norm): rank 0 decides
            write = distributed.broadcast(write)
        if write:
            _recalibrate(s)  # a run killed after its last metrics row: the same statistics again
            # the input shape lets a weights file copied out of its run preprocess images as trained
            extra = {**s.extra, "epochs": s.cfg.epochs, "input_shape": data_shape(s.train_set)}
            if s.epoch < s.cfg.epochs:  # --early-stop ended it
                extra["stopped_early_after"] = s.epoch
                log.info("early stop after epoch %d: no better validation anytime AUC since epoch %d (%s)", s.epoch,
                         tracking.best_epoch(s.rows), tracking.BEST)  # fmt: skip
            if s.recalibration is not None:
                extra["recalibration"] = s.recalibration
            _write(s, lambda: save_weights(s.run_dir / WEIGHTS, s.model, extra))
    except BaseException as e:
        _stopped(s, e)
        raise
    finally:
        if s.tracker is not None:
            s.tracker.close()
        _release(s)
    return s.run_dir


def _stopped(s: _Session, e: BaseException) -> None:
    """On an interruption, checkpoint the current position (unless it is on disk already or not consistent)."""
    if not isinstance(e, KeyboardInterrupt) or not s.main:  # rank 0 checkpoints and reports
        return
    what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
    where = f"after {s.batch_done} batches of epoch {s.epoch + 1}" if s.batch_done else f"after epoch {s.epoch}"
    resume = f"continue with: cascadenet train --resume {shlex.quote(str(s.run_dir))}"
    if s.position() != s.saved and s.step > 0 and torch.isfinite(s.stats.loss_sum):
        try:
            _checkpoint(s)
        except (OSError, TrainingError) as failed:
            log.warning("%s %s; the checkpoint could not be written (%s)", what, where, failed)
    if s.saved is None:
        log.warning("%s before the first checkpoint; nothing was kept", what)
    elif s.saved == s.position():
        log.warning("%s %s; checkpoint saved; %s", what, where, resume)
    else:
        log.warning("%s; the last checkpoint (step %d) was kept; %s", what, s.saved[2], resume)


class _Objective(nn.Module):
    """The training loss as a module, so that DistributedDataParallel sees every loss's forward pass (the
    ``final`` loss calls ``feedforward``, not ``forward``). Here, beside the loop: it calls compute_loss by this
    module's name too."""

    def __init__(self, model: nn.Module, cfg: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg

    def forward(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
        return compute_loss(self.model, x, y, self.cfg, epoch)


def _checkpoint(s: _Session) -> None:
    """Save the position ``(s.epoch, s.batch_done, s.step)``, the epoch's running sums, and the finished epoch's
    training metrics while its validation is pending."""
    if not s.main:  # rank 0 writes it; every process has the same state
        s.saved = s.position()
        return
    if s.tracker is not None:  # the logs reach at least the checkpoint: a resumed run continues them from there
        s.tracker.flush()
    state = {
        "model_config": s.model.config.to_dict(), "model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(),
        "scheduler": s.scheduler.state_dict(), "epoch_generator_state": s.epoch_gen_state, "rng": _rng_state(),
        "epoch": s.epoch, "batch": s.batch_done, "step": s.step, "normalization": s.extra["normalization"],
        "epoch_stats": s.stats.state(), "epoch_done": s.done,
    }  # fmt: skip
    _write(s, lambda: save_checkpoint(s.run_dir / CHECKPOINT, state))
    s.saved = s.position()


def _train_epoch(s: _Session) -> None:
    """One epoch from batch ``s.batch_done`` on, adding to the running sums ``s.stats``."""
    cfg = s.cfg
    s.epoch_gen_state = s.generator.get_state()
    shard = (0, 1) if s.world is None else (s.world.rank, s.world.size)
    if isinstance(s.train_set, streaming.FolderIndex):  # decoded from batch_done on: skipped ones are not read
        batches = streaming.stream_batches(
            s.train_set, cfg.batch_size, train=cfg.augment, shuffle=True, mean=s.mean, std=s.std, device=s.device,
            generator=s.generator, drop_last=True, shard=shard, start=s.batch_done, workers=cfg.workers,
        )  # fmt: skip
    else:
        batches = itertools.islice(
            iterate_batches(s.train_set, cfg.batch_size, shuffle=True, augment=cfg.augment, mean=s.mean,
                            std=s.std, generator=s.generator, drop_last=True, shard=shard),
            s.batch_done, None,
        )  # fmt: skip
    bar = tqdm(total=s.per_epoch, initial=s.batch_done, desc=f"epoch {s.epoch + 1}/{cfg.epochs}",
               disable=not s.progress, unit="batch", dynamic_ncols=True)  # fmt: skip
    stats = s.stats
    stats.since = time.perf_counter()
    try:
        for i, (x, y) in enumerate(batches, start=s.batch_done):  # resumed mid-epoch: from the first not done
            if i >= s.per_epoch:
                break
            if s.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(s.device.type, s.amp):
                epoch = s.epoch + 1  # restored from the checkpoint on resume: the same weights as uninterrupted
                loss = compute_loss(s.model, x, y, cfg, epoch) if s.objective is None else s.objective(x, y, epoch)
            s.optimizer.zero_grad(set_to_none=True)
            lr = s.scheduler.get_last_lr()[0]  # what this step is taken with
            loss.backward()
            step_loss = loss.detach() if s.world is None else distributed.mean(loss)  # the global batch's loss
            with s.interrupts.critical():  # weights, counters and sums change together or not at all
                s.optimizer.step()
                s.scheduler.step()
                s.step += 1
                s.batch_done = i + 1
                stats.loss_sum += step_loss
                stats.batches += 1
                stats.images += len(y) * shard[1]
            if s.tracker is not None:
                s.tracker.batch(s.step, s.epoch + 1, step_loss, lr)
            if stats.batches % 10 == 0 or s.batch_done == s.per_epoch:  # a sync every 10 steps, not every step
                _check_finite(s, stats.loss_sum, i)
                if s.tracker is not None:
                    s.tracker.flush()
                bar.set_postfix(loss=f"{stats.loss_sum.item() / stats.batches:.4f}",
                                img_s=f"{stats.images / max(stats.elapsed(), 1e-9):.0f}")  # fmt: skip
            bar.update(1)
            if cfg.checkpoint_every and s.step % cfg.checkpoint_every == 0 and s.batch_done < s.per_epoch:
                _check_finite(s, stats.loss_sum, i)
                _checkpoint(s)
    finally:
        bar.close()
    _check_finite(s, stats.loss_sum, s.per_epoch)


def _epoch_summary(s: _Session) -> dict[str, Any]:
    """The training half of the epoch's metrics row."""
    seconds = s.stats.elapsed()
    return {
        "epoch": s.epoch + 1,
        "step": s.step,
        "train_loss": s.stats.loss_sum.item() / max(s.stats.batches, 1),
        "lr": s.scheduler.get_last_lr()[0],
        "train_images_per_s": s.stats.images / max(seconds, 1e-9),
        "seconds": seconds,
    }


def _recalibrate(s: _Session) -> None:
    """After the last epoch (once): every batch-norm statistic recomputed at the final weights over
    ``recalibrate_batches`` training batches (``cascadenet.training.recalibrate``). Deterministic from the weights and
    the seed, so a run resumed from the last checkpoint (which holds the running averages) computes the same."""
    cfg = s.cfg
    if s.epoch < cfg.epochs or not cfg.recalibrate_batches or s.recalibration is not None:
        return
    shard = (0, 1) if s.world is None else (s.world.rank, s.world.size)
    batches = training_batches(s.train_set, cfg, s.mean, s.std, s.device, cfg.recalibrate_batches, shard=shard)
    t0 = time.perf_counter()
    # interrupted, recalibrate_bn puts the running averages back; the checkpoint on disk holds them anyway
    record = recalibrate_bn(s.model, batches, forward=calibration_forward(cfg, s.amp, s.channels_last))
    record["examples"] *= shard[1]  # every process's part of each global batch
    s.recalibration = record
    log.info("batch-norm statistics recomputed at the final weights over %d batches (%d examples, %.1fs)",
             record["batches"], record["examples"], time.perf_counter() - t0)  # fmt: skip


def _validate(s: _Session, done: dict[str, Any]) -> dict[str, Any]:
    """Validation accuracy per exit and anytime AUC after an epoch: the epoch's metrics row."""
    t0 = time.perf_counter()
    val = s.val_set
    if s.world is not None:  # each process its contiguous part, gathered in order
        val = val.subset(torch.arange(len(val)).tensor_split(s.world.size)[s.world.rank])
    logits = None
    if len(val):
        logits = _logits(s, val)
    if s.world is not None:
        logits = torch.cat([part for part in distributed.gather(logits) if part is not None], dim=1)
    summary = metrics.summarize(logits, s.val_set.labels.cpu(), first_step=s.model.first_informative_exit)
    row = {k: done[k] for k in ("epoch", "step", "train_loss", "lr", "train_images_per_s")}
    if s.recalibration is not None:  # the last epoch's validation is of the recalibrated weights
        row["bn_recalibration"] = s.recalibration
    return {
        **row,
        "val_accuracy_per_step": summary["accuracy_per_step"],
        "val_anytime_auc": summary["anytime_auc"],
        "seconds": done["seconds"] + time.perf_counter() - t0,
    }


def _logits(s: _Session, ds: Any) -> torch.Tensor:
    """The exit logits of a validation set (in memory, or a streamed folder), ``(E, N, C)`` on the CPU."""
    if not isinstance(ds, streaming.FolderIndex):
        return dataset_logits(s.model, ds, s.mean, s.std, batch_size=s.cfg.eval_batch_size, amp=s.amp,
                              progress=s.progress, desc="validate")  # fmt: skip
    s.model.eval()
    try:
        with torch.no_grad():
            out = []
            for x, _ in streaming.stream_batches(ds, s.cfg.eval_batch_size, train=False, shuffle=False, mean=s.mean,
                                                 std=s.std, device=s.device, workers=s.cfg.workers):  # fmt: skip
                if s.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(s.device.type, s.amp):
                    out.append(s.model(x).float().cpu())
    finally:
        s.model.train()
    return torch.cat(out, dim=1)


def _record(s: _Session, row: dict[str, Any]) -> None:
    """Add the epoch's row to metrics.jsonl (the whole file rewritten atomically: a kill leaves no torn line)."""
    rows = [r for r in s.rows if r["epoch"] < row["epoch"]] + [row]
    _write(s, lambda: atomic_write(s.run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in rows).encode()))
    s.rows = rows
    if s.tracker is not None:
        s.tracker.epoch(row)
    if (s.cfg.keep_best or s.cfg.early_stop) and tracking.best_epoch(rows) == row["epoch"]:
        _write(s, lambda: save_weights(s.run_dir / tracking.BEST, s.model, {**s.extra, "epoch": row["epoch"]}))
    log.info(
        "epoch %d/%d  loss %.4f  val acc (last exit) %.2f%%  val AUC %.4f  %.0f img/s  %.0fs", row["epoch"],
        s.cfg.epochs, row["train_loss"], 100 * row["val_accuracy_per_step"][-1], row["val_anytime_auc"],
        row["train_images_per_s"], row["seconds"],
    )  # fmt: skip


def _check_finite(s: _Session, loss_sum: torch.Tensor, batch: int) -> None:
    if not torch.isfinite(loss_sum):
        if s.saved is not None:
            kept = f"the last good checkpoint {s.run_dir / CHECKPOINT} was kept"
        elif s.resumed:
            kept = "no checkpoint was written"
        else:
            kept = f"nothing was checkpointed, so {s.run_dir} was removed"
        raise TrainingError(
            f"the loss became {loss_sum.item()} in epoch {s.epoch + 1} near batch {batch + 1}; training stopped and "
            f"{kept} (try a lower --lr)"
        )
