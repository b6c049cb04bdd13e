"""A training run's session and its set-up; ``cascadenet.training.loop`` runs the loop over the session.

The session (``_Session``) is everything one run holds between its steps. The set-up makes it (``_start``): every
check first (options, data, model, the run directory's contents), then the claim of the run directory, then the
first write (config.json); with several processes, rank 0 does that and the others follow. Its end
(``_release``) drops the lock, and a new run that never checkpointed leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import streaming
from ..data.datasets import DataError, ImageSet, check_test_classes, kept_classes, load_dataset
from ..data.loader import check_compatible, normalization, num_batches, train_val_split
from ..models.anytime import ModelConfig
from ..models.cascade import CascadedResNet
from ..models.checkpoint import CHECKPOINT, CheckpointError, build_and_load, load_checkpoint, read_metadata
from ..models.footprint import check_model_fits, check_training_fits
from ..models.pretrained import load_init, read_init
from ..runs.config import CONFIG, ConfigError, TrainConfig, check_loss_fits, check_resume_overrides, stored_paths
from ..runs.lock import RunLock, clean_temporaries
from ..utils.device import resolve_device
from ..utils.files import atomic_write, first_sentence, remove_empty
from . import distributed
from .claim import (
    TrainingError,
    check_model_files,
    check_same_data,
    check_target,
    claim,
    data_shape,
    described_model,
    read_run,
)
from .interrupts import Interrupts
from .optim import lr_at, make_optimizer

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"

# the training loss as a module (the loop's _Objective), made around the model under DistributedDataParallel
Objective = Callable[[nn.Module, TrainConfig], nn.Module]


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trim_metrics(path: Path, epochs_done: int) -> list[dict]:
    """The metric rows of the epochs the checkpoint covers (a kill may have left one more); rewrites the file
    when that drops a row."""
    if not path.is_file():
        return []
    rows, lines = [], path.read_text(errors="replace").splitlines()
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("epoch"), int) and row["epoch"] <= epochs_done:
            rows.append(row)
    if len(rows) != len(lines):
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows).encode())
    return rows


# ----------------------------------------------------------------------------------------------------------------
# The session


@dataclass
class _EpochStats:
    """Running sums of the current epoch (kept in checkpoints, so that a resumed epoch reports all of it)."""

    loss_sum: torch.Tensor
    batches: int = 0
    images: int = 0
    seconds: float = 0.0  # before ``since``
    since: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.seconds + time.perf_counter() - self.since

    def state(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum.detach().cpu(), "batches": self.batches, "images": self.images,
                "seconds": self.elapsed()}  # fmt: skip

    @classmethod
    def restore(cls, state: dict[str, Any] | None, device: torch.device) -> _EpochStats:
        if not state:
            return cls(torch.zeros((), device=device))
        return cls(state["loss_sum"].to(device), int(state["batches"]), int(state["images"]), float(state["seconds"]))


@dataclass
class _Session:
    """Everything one training run holds between its steps."""

    cfg: TrainConfig
    run_dir: Path
    lock: RunLock | None  # None on processes other than rank 0
    resumed: bool
    created: tuple[Path, ...]  # the folders this process created (the run directory, --out's missing ones)
    device: torch.device
    amp: bool
    channels_last: bool
    progress: bool
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator  # draws each epoch's batch order and augmentation
    train_set: ImageSet
    val_set: ImageSet
    mean: torch.Tensor
    std: torch.Tensor
    extra: dict[str, Any]  # stored with the config, checkpoints and weights: normalisation and class names
    per_epoch: int
    stats: _EpochStats
    epoch_gen_state: torch.Tensor  # the generator's state at the start of the current epoch
    interrupts: Interrupts
    epoch: int = 0  # epochs completed
    batch_done: int = 0  # batches of the current epoch completed
    step: int = 0  # optimizer steps completed
    done: dict[str, Any] | None = None  # the training half of the metrics row of the epoch just completed
    rows: list[dict] = field(default_factory=list)  # metrics.jsonl
    saved: tuple[int, int, int] | None = None  # position of the last checkpoint on disk
    world: distributed.World | None = None  # None: a single process
    objective: nn.Module | None = None  # the loss under DistributedDataParallel (several processes)
    recalibration: dict[str, int] | None = None  # batches and examples of the final statistics, once recomputed
    tracker: Any = None  # --log's back-ends (training.tracking.Tracker), on the process that writes

    @property
    def main(self) -> bool:
        """This process writes the run directory (a single process, or rank 0)."""
        return self.world is None or self.world.main

    def position(self) -> tuple[int, int, int]:
        return self.epoch, self.batch_done, self.step


def _release(s: _Session) -> None:
    """Drop the lock; a new run that never checkpointed leaves nothing behind (so the same command can start
    again)."""
    if s.lock is None:  # not rank 0: nothing held, nothing written
        return
    if s.saved is None and not s.resumed:
        _discard(s.run_dir, s.created, s.lock)
    else:
        s.lock.release()


def _discard(run_dir: Path, created: tuple[Path, ...], lock: RunLock) -> None:
    for name in (CONFIG, METRICS):
        (run_dir / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        clean_temporaries(run_dir)
    lock.release()
    remove_empty(created)  # only if empty: another process may have claimed it meanwhile


def _write(s: _Session, write: Any) -> None:
    """Run a write of the run directory (only in the process that writes it: a single one, or rank 0); a full
    disk or an I/O error becomes one ``TrainingError`` line."""
    if not s.main:
        return
    try:
        write()
    except OSError as e:
        reason = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror or str(e)
        if s.saved is None:
            raise TrainingError(f"cannot write in {s.run_dir}: {reason}; no checkpoint was written yet") from None
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        fix = "free space" if full else "make it writable" if e.errno in (errno.EROFS, errno.EACCES) else "fix it"
        raise TrainingError(
            f"cannot write in {s.run_dir}: {reason}; the last checkpoint (step {s.saved[2]}) was kept: {fix} "
            f"and continue with: cascadenet train --resume {shlex.quote(str(s.run_dir))}"
        ) from None


# ----------------------------------------------------------------------------------------------------------------
# Set-up: every check before anything is written


def _start(
    cfg: TrainConfig,
    resume: str | os.PathLike | None,
    overrides: dict[str, Any],
    interrupts: Interrupts,
    world: distributed.World | None,
    objective: Objective,
    data: tuple | None = None,
) -> _Session:
    """Set-up: every check first (options, data, model, the run directory's contents), then the claim of the
    run directory, then the first write (config.json).

    With several processes, rank 0 does all of that and sends the resolved configuration and the checkpoint's
    training state to the others, which load the data and build the model themselves; then every process
    reports whether it could start, and they fail together or go on together (DistributedDataParallel around
    ``objective(model, cfg)``, the training loss as a module).

    ``data``: the data given from Python (``cascadenet.fit``: the full training set, its training and validation
    parts, the normalisation), else it is read as the configuration says."""
    if world is None:
        return _start_here(cfg, resume, overrides, interrupts, None, data)[0]
    if not world.main:
        return _start_follower(interrupts, world, objective, data)
    try:
        s, ckpt = _start_here(cfg, resume, overrides, interrupts, world, data)
    except BaseException as e:
        with contextlib.suppress(Exception):  # tell the others, which wait for the configuration
            distributed.broadcast({"error": (type(e).__name__, str(e))})
        raise
    try:
        state = None if ckpt is None else {k: v for k, v in ckpt.items() if k != "model"}  # weights: broadcast
        distributed.broadcast({"cfg": s.cfg.to_dict(), "run_dir": str(s.run_dir), "resumed": s.resumed,
                               "state": state, "stored": {"normalization": s.extra["normalization"]}})  # fmt: skip
        _agree(None, world)
        _distribute(s, objective)
    except BaseException:
        _release(s)
        raise
    return s


_ERRORS: dict[str, type[Exception]] = {
    "ValueError": ValueError, "DataError": DataError, "CheckpointError": CheckpointError,
    "ConfigError": ConfigError, "TrainingError": TrainingError,
}  # fmt: skip


def _start_follower(
    interrupts: Interrupts, world: distributed.World, objective: Objective, data: tuple | None = None
) -> _Session:
    packet = distributed.broadcast(None)
    if "error" in packet:  # rank 0 could not start: the same error here (rank 0 reports it)
        name, message = packet["error"]
        if name in ("KeyboardInterrupt", "Terminated"):
            raise KeyboardInterrupt
        error = _ERRORS.get(name, TrainingError)(message)
        error.reported_by_rank0 = True  # type: ignore[attr-defined]
        raise error
    s = None
    try:
        s = _follow(packet, interrupts, world, data)
        error = None
    except Exception as e:
        error = " ".join(f"{type(e).__name__}: {e}".split())
    _agree(error, world)
    assert s is not None
    _distribute(s, objective)
    return s


def _agree(error: str | None, world: distributed.World) -> None:
    """Every process says whether it could start; all stop (TrainingError) if one could not."""
    failed = [(rank, e) for rank, e in enumerate(distributed.gather(error)) if e]
    if failed:
        rank, e = failed[0]
        stop = TrainingError(f"process {rank} of {world.size} could not start: {e}")
        stop.reported_by_rank0 = not world.main  # type: ignore[attr-defined]
        raise stop


def _distribute(s: _Session, objective: Objective) -> None:
    """Synchronised batch norm, rank 0's weights everywhere, and DistributedDataParallel around the objective."""
    distributed.convert_sync_temporal_bn(s.model)
    distributed.broadcast_module(s.model)
    unused = not isinstance(s.model, CascadedResNet) or s.model.config.multi_head  # heads of uninformative exits
    s.objective = distributed.wrap(objective(s.model, s.cfg), s.device, find_unused_parameters=unused)


def _resolve_stream(cfg: TrainConfig) -> TrainConfig:
    """``--stream auto`` decided: on for an image folder whose decoded training images would exceed the
    threshold or half the available memory, else off."""
    if cfg.stream != "auto":
        return cfg
    if cfg.dataset != "imagefolder" or cfg.data_root is None:
        return cfg  # read into memory: auto is off (and stays auto in config.json)
    need = streaming.estimated_bytes(cfg.data_root, cfg.image_size)
    limit = min(cfg.stream_above_gb * 2**30, streaming.available_memory() / 2)
    if need > limit:
        log.info("the decoded training images would take %.1f GiB (more than %.1f GiB): streaming them from %s "
                 "with DataLoader workers (--stream off to hold them in memory)", need / 2**30, limit / 2**30,
                 cfg.data_root)  # fmt: skip
    return dataclasses.replace(cfg, stream="on" if need > limit else "off")


def _load_data(cfg: TrainConfig) -> tuple[Any, Any, Any, torch.Tensor, torch.Tensor]:
    if cfg.dataset == "imagefolder" and cfg.data_root is not None:
        check_test_classes(cfg.data_root)  # before training, not at evaluation
    if cfg.stream == "on":
        if cfg.holdout_classes:  # --stream auto chose it: the folder is too large to hold in memory
            raise ValueError(f"--holdout-classes works on datasets read into memory; {cfg.data_root} would be "
                             "streamed (try --stream off, or a larger --stream-above-gb)")  # fmt: skip
        if cfg.data_root is None:
            raise DataError("no default location for dataset 'imagefolder': pass --data-root with its files")
        full = streaming.index_folder(cfg.data_root, "train", cfg.image_size or streaming.DEFAULT_SIZE, cfg.grayscale)
        train_set, val_set = train_val_split(full, cfg.val_fraction, seed=cfg.seed)  # type: ignore[arg-type]
        mean, std = streaming.streaming_normalization(full.num_channels)
        return full, train_set, val_set, mean, std
    full = load_dataset(cfg.dataset, cfg.data_root, "train", image_size=cfg.image_size,
                        synthetic_size=cfg.synthetic_size, seed=cfg.seed,
                        holdout_classes=cfg.holdout_classes, grayscale=cfg.grayscale)  # fmt: skip
    train_set, val_set = train_val_split(full, cfg.val_fraction, seed=cfg.seed)
    mean, std = normalization(train_set)
    return full, train_set, val_set, mean, std


def _normalized(cfg: TrainConfig, data: tuple, stored: dict[str, Any] | None = None) -> tuple:
    """The data with the normalisation ``--normalize`` asks for: the dataset's statistics (as read), ImageNet's, the
    numbers given, or by default those stored with the ``--init`` weights (``stored``: a resumed run's config.json,
    which recorded them) when it has them."""
    full, train_set, val_set, mean, std = data
    channels = data_shape(full)[0]
    spec = cfg.normalize
    source = f"--normalize {spec}"
    if spec is None and cfg.init is not None:
        norm = (stored or {}).get("normalization") if stored else _init_normalization(cfg.init)
        if not isinstance(norm, dict):
            return data
        values, source = [*norm.get("mean", []), *norm.get("std", [])], f"the normalisation stored with {cfg.init}"
    elif spec == "imagenet":  # one channel: the mean of ImageNet's three
        values = [v for t in streaming.streaming_normalization(channels) for v in t.tolist()]
    elif spec is None or spec == "dataset":
        return data
    else:
        values = [float(v) for v in spec.split(",")]
        if len(values) == 2:
            values = [values[0]] * channels + [values[1]] * channels
    if len(values) != 2 * channels:
        raise ValueError(f"{source} holds statistics of {len(values) // 2} channel(s), but the images have {channels}"
                         " (--normalize dataset, or MEAN,STD numbers)")  # fmt: skip
    t = torch.tensor(values, dtype=torch.float32)
    return full, train_set, val_set, t[:channels], t[channels:]


def _init_normalization(path: str) -> Any:
    """The normalisation stored with an --init weights file (None: none stored, or not a readable file, which
    the model's own reading of the file reports)."""
    try:
        return read_metadata(path).get("normalization")
    except (CheckpointError, OSError):
        return None


def _from_dataset(model: ModelConfig, full: Any) -> dict[str, Any]:
    """The model options that the dataset sets (``FROM_DATASET``, those the model's family has)."""
    c, h, w = data_shape(full)
    options = {"num_classes": full.num_classes, "in_channels": c}
    if any(f.name == "input_size" for f in dataclasses.fields(model)):
        if h != w:
            raise ValueError(f"a {model.family} model needs square images, the dataset's are {h}x{w} (--image-size)")
        options["input_size"] = h
    return options


def _schedule(cfg: TrainConfig, n_train: int, processes: int) -> tuple[int, int, int]:
    """Optimizer steps per epoch, in all, and of warm-up."""
    per_epoch = num_batches(n_train, cfg.batch_size * processes, drop_last=True)
    if per_epoch == 0:
        on = f" on {processes} processes (a global batch of {cfg.batch_size * processes})" if processes > 1 else ""
        raise ValueError(f"--batch-size {cfg.batch_size}{on} is larger than the training set ({n_train} examples)")
    per_epoch = min(per_epoch, cfg.max_batches or per_epoch)
    total, warmup = per_epoch * cfg.epochs, round(cfg.warmup() * per_epoch)
    if cfg.schedule != "constant" and warmup >= total:
        raise ValueError(
            f"--warmup-epochs {cfg.warmup()} is {warmup} steps, the whole run ({total} steps): the learning "
            "rate would never decay (use a shorter --warmup-epochs or more --epochs)"
        )
    return per_epoch, total, warmup


def _device(cfg: TrainConfig, world: distributed.World | None) -> torch.device:
    device = resolve_device(cfg.device) if world is None else distributed.device_for(cfg.device, world)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return device


def _session(cfg: TrainConfig, model: nn.Module, device: torch.device, data: tuple, schedule: tuple[int, int, int],
             interrupts: Interrupts, world: distributed.World | None, **where: Any) -> _Session:  # fmt: skip
    """The session of a model on its device, with a fresh optimizer, scheduler and batch-order generator."""
    full, train_set, val_set, mean, std = data
    per_epoch, total, warmup = schedule
    channels_last = device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
    if cfg.loss == "ic-only":  # before the optimizer, which then holds the internal classifiers only
        model.freeze_backbone()
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_at(i, total, warmup, cfg.schedule))
    generator = torch.Generator().manual_seed(cfg.seed)
    main = world is None or world.main
    return _Session(
        cfg=cfg, device=device, amp=device.type == "cuda" if cfg.amp is None else cfg.amp,
        channels_last=channels_last, progress=main and (sys.stderr.isatty() if cfg.progress is None else cfg.progress),
        model=model, optimizer=optimizer, scheduler=scheduler, generator=generator, train_set=train_set.to(device),
        val_set=val_set.to(device), mean=mean, std=std,
        extra={"normalization": {"mean": mean.tolist(), "std": std.tolist()}, "classes": full.classes,
               **_label_map(cfg, full)},
        per_epoch=per_epoch, stats=_EpochStats(torch.zeros((), device=device)),
        epoch_gen_state=generator.get_state(), interrupts=interrupts, world=world, **where,
    )  # fmt: skip


def _label_map(cfg: TrainConfig, full: Any) -> dict[str, Any]:
    """With --holdout-classes, which original class each label of the model is (``kept_classes[k]`` is label
    ``k``), stored with the run; ``full`` is the kept part, so the dataset had K + len(holdout) classes."""
    if not cfg.holdout_classes:
        return {}
    held = list(cfg.holdout_classes)
    return {"label_map": {"kept_classes": kept_classes(full.num_classes + len(held), held), "held_out_classes": held}}


def _follow(packet: dict[str, Any], interrupts: Interrupts, world: distributed.World, given: tuple | None) -> _Session:
    """A process other than rank 0: rank 0's configuration and training state, its own data and model (whose
    weights rank 0 broadcasts next)."""
    cfg = TrainConfig.from_dict(packet["cfg"])
    device = _device(cfg, world)
    data = _normalized(cfg, _load_data(cfg) if given is None else given, packet.get("stored"))
    torch.manual_seed(cfg.seed)
    model = cfg.model.build()
    s = _session(cfg, model, device, data, _schedule(cfg, len(data[1]), world.size), interrupts, world,
                 run_dir=Path(packet["run_dir"]), lock=None, resumed=packet["resumed"], created=())  # fmt: skip
    if packet["state"] is not None:
        _restore(s, packet["state"], Path(packet["run_dir"]) / CHECKPOINT)
    s.model.train()
    return s


def _start_here(
    cfg: TrainConfig,
    resume: str | os.PathLike | None,
    overrides: dict[str, Any],
    interrupts: Interrupts,
    world: distributed.World | None,
    given: tuple | None = None,
) -> tuple[_Session, dict[str, Any] | None]:
    """The set-up of a single process, or of rank 0; returns the session and the checkpoint it resumed from."""
    run_dir, cfg, payload = _run_config(cfg, resume, overrides)
    device = _device(cfg, world)
    cfg = _resolve_stream(cfg)
    processes = 1 if world is None else world.size

    data = _normalized(cfg, _load_data(cfg) if given is None else given, payload if resume is not None else None)
    full, train_set = data[0], data[1]
    cfg, model = _build_model(cfg, full, resume is not None and (run_dir / CHECKPOINT).is_file())
    schedule = _schedule(cfg, len(train_set), processes)

    # --- the run directory: claimed (locked) from here on; until config.json is written nothing in it changed
    lock, created = claim(run_dir, cfg, resume is not None)
    try:
        ckpt = None
        if resume is not None:
            ckpt, model, cfg = _check_resumed(run_dir, payload, cfg, model, data, processes)
        s = _session(cfg, model, device, data, schedule, interrupts, world, run_dir=run_dir, lock=lock,
                     resumed=resume is not None, created=created)  # fmt: skip
        if ckpt is not None:
            _restore(s, ckpt, run_dir / CHECKPOINT)
            log.info("resuming %s at epoch %d, batch %d", run_dir, s.epoch + 1, s.batch_done)
        if resume is not None:
            s.rows = _trim_metrics(run_dir / METRICS, s.epoch)
            _drop_stale_evaluations(run_dir)
        _write_config(s, full, processes)
    except BaseException:
        if resume is None:
            _discard(run_dir, created, lock)
        else:
            lock.release()
        raise
    s.model.train()
    return s, ckpt


def _drop_stale_evaluations(run_dir: Path) -> None:
    """Evaluations of the checkpoint that training now continues describe weights that will be gone: removed,
    so that no eval*.json beside the final weights describes other ones (``plot`` would draw it)."""
    for path in sorted(run_dir.glob("eval*.json")):
        try:
            stale = json.loads(path.read_bytes()).get("finished_training") is False
        except (OSError, ValueError, AttributeError):
            continue  # not an evaluation this version wrote: left alone
        if stale:
            path.unlink(missing_ok=True)
            log.info("removed %s: it evaluated the checkpoint that training now continues", path)


def _run_config(
    cfg: TrainConfig, resume: str | os.PathLike | None, overrides: dict[str, Any]
) -> tuple[Path, TrainConfig, dict[str, Any]]:
    """The run directory, its configuration and what its config.json holds: a resumed run's stored configuration
    with the overrides it allows, or a new run's, its directory checked to be free (or this run's, unstarted)."""
    payload: dict[str, Any] = {}
    if resume is not None:
        run_dir = Path(resume)
        stored, payload = read_run(run_dir)
        cfg = dataclasses.replace(stored, **_resumed_threads(check_resume_overrides(overrides, stored), stored))
    else:
        run_dir = Path(cfg.out) / cfg.run_name()
        check_target(run_dir, cfg)
        if cfg.threads is None:  # the thread count is part of what a CPU run computes: stored with it
            cfg = dataclasses.replace(cfg, threads=torch.get_num_threads())
    return run_dir, cfg, payload


def _resumed_threads(overrides: dict[str, Any], stored: TrainConfig) -> dict[str, Any]:
    """A resumed run keeps the thread count it was trained with (PyTorch's CPU reductions split the work by
    thread, so another count gives other weights); a different ``--threads`` is allowed, with a warning."""
    overrides = dict(overrides)
    if overrides.get("threads", stored.threads) is None:  # not given: the stored count (None: an older run's)
        overrides.pop("threads", None)
    new = overrides.get("threads")
    if new is not None and stored.threads is not None and new != stored.threads:
        log.warning(
            "warning: --threads %d differs from the %d threads this run was trained with: on CPU the resumed run's "
            "weights will differ from an uninterrupted run's (resume without --threads to keep them identical)",
            new, stored.threads,
        )  # fmt: skip
    return overrides


def _build_model(cfg: TrainConfig, full: Any, from_checkpoint: bool) -> tuple[TrainConfig, nn.Module]:
    """The model with the options the dataset sets (or the --init file's model, unless the run resumes from a
    checkpoint), built from the run's seed and checked against the data; returns it with the configuration."""
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **_from_dataset(cfg.model, full)))
    initial = None
    if cfg.init is not None and not from_checkpoint:
        model_cfg, initial = read_init(cfg.init, cfg.model, full.num_classes, full.num_channels)
        side = _from_dataset(model_cfg, full).get("input_size")
        if side is not None and side != model_cfg.input_size:
            raise CheckpointError(f"--init {cfg.init} holds a model sized for {model_cfg.input_size}x"
                                  f"{model_cfg.input_size} images, but the dataset's are {side}x{side}")  # fmt: skip
        cfg = dataclasses.replace(cfg, model=model_cfg)
        check_loss_fits(cfg.loss, cfg.model)  # the file decides the model
    # weights, gradients, optimizer state and the checkpoint's serialised copy of both: before building it
    check_model_fits(cfg.model, 6, "training this model")  # the parameters alone, before any build
    check_training_fits(cfg.model, data_shape(full), cfg.batch_size, cfg.eval_batch_size)  # and a batch's activations
    torch.manual_seed(cfg.seed)
    model = cfg.model.build()
    if initial is not None:
        load_init(model, initial, cfg.init)
    check_compatible(full, cfg.model.in_channels, cfg.model.num_classes)
    exits = getattr(model, "num_steps", None)
    if isinstance(exits, int) and model.first_informative_exit >= exits:
        raise ValueError(
            f"the model has {exits} exit(s) and the first that sees the input is exit "
            f"{model.first_informative_exit}: nothing to train or evaluate (more --num-steps?)"
        )
    return cfg, model


def _check_resumed(
    run_dir: Path, payload: dict[str, Any], cfg: TrainConfig, model: nn.Module, data: tuple, processes: int
) -> tuple[dict[str, Any] | None, nn.Module, TrainConfig]:
    """A resumed run checked against what trained it (the data, the number of processes, its model files);
    returns its checkpoint (None: it has none) and, with one, the model and configuration as the checkpoint
    stores them."""
    full, _, _, mean, std = data
    check_same_data(run_dir, payload, full, mean, std, cfg.data_root)
    trained_on = payload.get("processes", 1)
    if trained_on != processes:
        raise TrainingError(
            f"{run_dir} was trained by {trained_on} process(es) and this is {processes}: resume it with "
            f"{trained_on} (--batch-size is per process, so the number of processes is part of the run)"
        )
    ckpt = None
    if (run_dir / CHECKPOINT).is_file():
        ckpt = load_checkpoint(run_dir / CHECKPOINT)
    check_model_files(run_dir, described_model(payload, cfg.model), ckpt)
    if ckpt is not None:
        model = build_and_load(ckpt["model_config"], ckpt["model"], run_dir / CHECKPOINT)
        cfg = dataclasses.replace(cfg, model=model.config)  # as stored (format 1 resolved num_steps)
    return ckpt, model, cfg


def _write_config(s: _Session, full: Any, processes: int) -> None:
    """The run directory's first write: config.json, the resolved configuration with the normalisation, the class
    names and what the data was."""
    described = {"examples": len(full), "shape": data_shape(full), "classes": full.num_classes}
    train, relative = stored_paths(s.cfg, s.run_dir)
    stored_payload = {"train": train, "model": s.cfg.model.to_dict(), **s.extra, "data": described,
                      "processes": processes, **({"relative_paths": relative} if relative else {})}  # fmt: skip
    _write(s, lambda: atomic_write(s.run_dir / CONFIG, (json.dumps(stored_payload, indent=2) + "\n").encode()))


def _restore(s: _Session, ckpt: dict[str, Any], path: Path) -> None:
    try:
        s.optimizer.load_state_dict(ckpt["optimizer"])
        s.scheduler.load_state_dict(ckpt["scheduler"])
        s.generator.set_state(ckpt["epoch_generator_state"])
        s.epoch_gen_state = ckpt["epoch_generator_state"]
        _set_rng_state(ckpt["rng"])
        s.epoch, s.batch_done, s.step = int(ckpt["epoch"]), int(ckpt["batch"]), int(ckpt["step"])
        s.stats = _EpochStats.restore(ckpt.get("epoch_stats"), s.device)
        s.done = ckpt.get("epoch_done")
    except Exception as e:  # a checkpoint of another version or a hand-edited one: whatever torch raises
        raise CheckpointError(f"{path}: the training state does not fit this run ({first_sentence(e)})") from None
    _check_position(s, ckpt, path)
    s.saved = s.position()


def _check_position(s: _Session, ckpt: dict[str, Any], path: Path) -> None:
    """A checkpoint's position (epoch, batch, step) lies inside the run: a damaged or hand-edited one would
    otherwise train the wrong number of epochs or batches."""
    raw = {k: ckpt.get(k) for k in ("epoch", "batch", "step")}
    if any(isinstance(v, bool) or not isinstance(v, int) for v in raw.values()):
        raise CheckpointError(f"{path}: damaged training position (epoch, batch, step must be integers, got {raw})")
    total = s.per_epoch * s.cfg.epochs
    bad = [
        f"epoch {s.epoch} is outside 0..{s.cfg.epochs}" if not 0 <= s.epoch <= s.cfg.epochs else "",
        f"batch {s.batch_done} is outside 0..{s.per_epoch}" if not 0 <= s.batch_done <= s.per_epoch else "",
        f"step {s.step} is outside 0..{total}" if not 0 <= s.step <= total else "",
    ]
    bad = [b for b in bad if b]
    if bad:
        raise CheckpointError(f"{path}: damaged training position ({'; '.join(bad)}): this checkpoint cannot resume "
                              "the run")  # fmt: skip
