"""Training: one explicit loop, a resumable run directory, and the same code path on CPU and GPU.

A run directory holds
- ``config.json``: the resolved configuration (replay it with ``cascadenet train --config RUN/config.json``);
- ``checkpoint.pt``: model, optimizer, scheduler, RNG state and position, written atomically at every epoch
  end (and every ``checkpoint_every`` steps, and on Ctrl-C), so a kill at any moment leaves the previous one;
- ``metrics.jsonl``: one line per epoch (train loss, throughput, validation accuracy per exit and AUC);
- ``model.safetensors``: the final weights, with the model configuration as metadata.

Resuming restores everything the loop depends on (the batch order of an epoch is drawn from a generator
whose state at the epoch start is saved, so resuming mid-epoch skips exactly the batches already done);
on CPU a resumed run ends with the same weights as an uninterrupted one.

Training uses only the anytime-model interface (``cascadenet.anytime``): any registered model family trains here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from . import metrics
from .anytime import ModelConfig
from .cascade import CascadeConfig
from .checkpoint import (
    CHECKPOINT,
    WEIGHTS,
    atomic_write,
    build_and_load,
    load_checkpoint,
    save_checkpoint,
    save_weights,
)
from .datasets import ImageSet, load_dataset
from .loader import check_compatible, iterate_batches, normalization, num_batches, train_val_split
from .losses import LOSSES, final_ce, stepwise_ce, td_loss
from .norm import TemporalBatchNorm2d
from .registry import config_from_dict
from .runtime import autocast, dataset_logits, resolve_device

__all__ = ["TrainConfig", "TrainingError", "train", "lr_at", "RESUMABLE", "check_resume_overrides"]

log = logging.getLogger(__name__)

CONFIG = "config.json"
METRICS = "metrics.jsonl"

# Options a resumed run may change: where and how fast it runs, not what it computes.
RESUMABLE = ("device", "threads", "progress", "data_root", "checkpoint_every", "eval_batch_size")
# Model options that training takes from the dataset, not from the user.
FROM_DATASET = ("num_classes", "in_channels")


class TrainingError(RuntimeError):
    """Training cannot go on (diverged loss, a run directory in the way, an unusable checkpoint)."""


@dataclass
class TrainConfig:
    """Train an anytime model (by default a cascaded ResNet). Every option is a field (usable from Python)."""

    model: ModelConfig = field(default_factory=CascadeConfig)
    """The model: a CascadeConfig (or another registered family's configuration); num_classes and in_channels
    are set from the dataset."""

    # --- data ---
    dataset: Literal["fashion-mnist", "cifar10", "cifar100", "imagefolder", "synthetic"] = "fashion-mnist"
    """Dataset; all but synthetic are read from --data-root in their standard on-disk layout."""
    data_root: str | None = None
    """Dataset folder (default for fashion-mnist: where Debian's dataset-fashion-mnist installs it)."""
    image_size: int | None = None
    """Resize images to this size (image folders of mixed sizes)."""
    val_fraction: float = 0.1
    """Share of the training set held out for validation (seeded)."""
    augment: bool = True
    """Random crop with padding and horizontal flip (where the dataset allows it)."""
    synthetic_size: int | None = None
    """Samples of the synthetic dataset (tests)."""

    # --- objective ---
    loss: Literal["td", "ce", "final"] = "td"
    """td: TD(lambda) over the trajectory; ce: cross-entropy at every step; final: ordinary feed-forward
    cross-entropy (the CascadedCE / SerialCE baselines, delays inserted only at test time)."""
    lam: float = 0.5
    """Lambda of the TD loss, in [0, 1] (1 = cross-entropy at every step)."""
    label_smoothing: float = 0.0
    """Label smoothing of the targets."""

    # --- optimisation ---
    epochs: int = 30
    """Passes over the training set."""
    batch_size: int = 128
    """Examples per optimizer step."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """SGD with Nesterov momentum, or AdamW."""
    lr: float = 0.1
    """Peak learning rate."""
    momentum: float = 0.9
    """SGD momentum (Nesterov)."""
    weight_decay: float = 5e-4
    """Weight decay of conv and linear weights (not of batch-norm parameters or biases)."""
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    """onecycle: linear warm-up then linear decay to 0; cosine: warm-up then cosine decay to 0."""
    warmup_epochs: float = 1.0
    """Length of the linear warm-up, in epochs (may be fractional)."""
    max_batches: int | None = None
    """Stop each epoch after this many batches (quick tests)."""

    # --- run ---
    seed: int = 0
    """Seed of the initialisation, the validation split and the batch order."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (cuda when available)."""
    threads: int | None = None
    """CPU threads for PyTorch (default: PyTorch's choice)."""
    amp: bool | None = None
    """bf16 autocast; default: on for CUDA, off for CPU."""
    channels_last: bool | None = None
    """channels_last memory format; default: on for CUDA."""
    out: str = "runs"
    """Parent folder of run directories."""
    name: str | None = None
    """Run directory name (default: model-loss-dataset-seed)."""
    checkpoint_every: int = 0
    """Also checkpoint every N optimizer steps (0: at epoch ends only)."""
    eval_batch_size: int = 500
    """Batch size of validation."""
    progress: bool | None = None
    """Progress bars (default: only when stderr is a terminal)."""

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelConfig):
            raise ValueError(f"model must be a model configuration (e.g. CascadeConfig), got {self.model!r}")
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0.0 <= self.lam <= 1.0, f"lam must be in [0, 1], got {self.lam}"),
            (0.0 < self.val_fraction < 1.0, f"val_fraction must be in (0, 1), got {self.val_fraction}"),
            (0.0 <= self.label_smoothing < 1.0, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}"),
            (self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every}"),
            (self.loss in LOSSES, f"unknown loss {self.loss!r}; valid choices: {', '.join(LOSSES)}"),
            (self.max_batches is None or self.max_batches >= 1, "max_batches must be >= 1"),
            (self.threads is None or self.threads >= 1, "threads must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def options(self) -> dict[str, Any]:
        """Every option under its command-line name, the model's inlined (``arch`` is ``model``, as the flag
        ``--model``), without those the dataset sets: what tells two runs apart."""
        flat = {}
        for f in dataclasses.fields(self.model):
            if f.name not in FROM_DATASET:
                flat["model" if f.name == "arch" else f.name] = getattr(self.model, f.name)
        flat.update((f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "model")
        return flat

    def run_name(self) -> str:
        return self.name or f"{getattr(self.model, 'arch', self.model.family)}-{self.loss}-{self.dataset}-s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; ``from_dict`` reads it back."""
        return {**dataclasses.asdict(self), "model": self.model.to_dict()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        """Read ``to_dict``'s output, or the flat form of the first release (``"model": "resnet18"`` and the
        model's options among the training options). Unknown keys are an error, missing keys take defaults."""
        raw = dict(raw)
        model = raw.pop("model", None)
        if model is None:
            model = CascadeConfig()
        elif isinstance(model, str):  # format 1: the model's options were fields of TrainConfig
            names = {f.name for f in dataclasses.fields(CascadeConfig)} - {"arch"}
            model = CascadeConfig(arch=model, **{k: raw.pop(k) for k in list(raw) if k in names})
        else:
            model = config_from_dict(model)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown configuration keys: {', '.join(unknown)}")
        return cls(model=model, **raw)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TrainConfig:
        """Read a config.json written by a run (this version or the first release)."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read the configuration: {e}") from None
        try:
            return cls.from_dict(raw.get("train", raw))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None


def check_resume_overrides(overrides: dict[str, Any]) -> None:
    """The resume policy: a resumed run keeps its stored options except the ``RESUMABLE`` ones.

    Raises:
        ValueError: naming the options that may not change (as command-line flags) and those that may.
    """
    refused = [k for k in overrides if k not in RESUMABLE]
    if refused:
        given = ", ".join(f"--{n.replace('_', '-')}" for n in refused)
        allowed = ", ".join("--" + n.replace("_", "-") for n in RESUMABLE)
        raise ValueError(
            f"--resume continues a run with its stored options; {given} cannot change them (allowed with --resume: "
            f"{allowed})"
        )


def changed_options(stored: TrainConfig, wanted: TrainConfig) -> dict[str, Any]:
    """The options (by command-line name) whose value in ``wanted`` differs from ``stored``."""
    a, b = stored.options(), wanted.options()
    return {k: v for k, v in b.items() if a.get(k) != v}


def lr_at(step: int, total: int, warmup: int, schedule: str) -> float:
    """Learning-rate multiplier at optimizer step ``step`` of ``total`` (a pure function: easy to test)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress  # onecycle: linear decay to zero


_NORM_LAYERS = (
    TemporalBatchNorm2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)  # fmt: skip


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Weight decay on conv and linear weights only: decaying normalisation scales and biases only hurts.
    # (temporal batch-norm scales are 2-D, (slots, C), so dimensionality alone does not tell them apart)
    norm = {id(p) for m in model.modules() if isinstance(m, _NORM_LAYERS) for p in m.parameters(recurse=False)}
    decay = [p for p in model.parameters() if p.ndim >= 2 and id(p) not in norm]
    other = [p for p in model.parameters() if p.ndim < 2 or id(p) in norm]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def compute_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    if cfg.loss == "final":
        # the model's own final prediction: a cascade's ordinary ResNet, else the last exit
        feedforward = getattr(model, "feedforward", None)
        final = feedforward(x) if feedforward is not None else model(x)[-1]
        return final_ce(final, y, label_smoothing=cfg.label_smoothing)
    logits = model(x)  # (E, B, C)
    first = model.first_informative_exit
    if cfg.loss == "ce":
        return stepwise_ce(logits, y, first_step=first, label_smoothing=cfg.label_smoothing)
    return td_loss(logits, y, cfg.lam, first_step=first, label_smoothing=cfg.label_smoothing)


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
    """Keep the metric lines of the epochs the checkpoint covers (a kill may have left one more)."""
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("epoch", 0) <= epochs_done:
            lines.append(row)
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in lines).encode())
    return lines


@dataclass
class _Session:
    """Everything one training run holds between its steps."""

    cfg: TrainConfig
    run_dir: Path
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
    epoch: int = 0  # epochs completed
    batch_done: int = 0  # batches of the current epoch completed
    step: int = 0  # optimizer steps completed


@dataclass
class _EpochStats:
    loss_sum: torch.Tensor
    batches: int
    images: int
    seconds: float


def train(
    cfg: TrainConfig | None = None, *, resume: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None
) -> Path:
    """Train a model; returns the run directory.

    Args:
        cfg: the configuration (ignored when resuming: the run's stored configuration is used).
        resume: a run directory to continue from its last checkpoint (or from the start if it has none).
        overrides: options a resumed run changes; only the ``RESUMABLE`` ones (where and how fast it runs, not
            what it computes).

    Raises:
        TrainingError: the run directory is in the way, the checkpoint is unusable, or the loss diverged.
        cascadenet.datasets.DataError: the dataset is missing or malformed.
        ValueError: a bad option.
    """
    s = _start(cfg or TrainConfig(), resume, overrides or {})
    while s.epoch < s.cfg.epochs:
        epoch_gen_state = s.generator.get_state()
        stats = _train_epoch(s, epoch_gen_state)
        s.epoch, s.batch_done = s.epoch + 1, 0
        row = _validate(s, stats)
        _checkpoint(s, s.generator.get_state())
        _record(s, row)
    save_weights(s.run_dir / WEIGHTS, s.model, {**s.extra, "epochs": s.cfg.epochs})
    return s.run_dir


def _start(cfg: TrainConfig, resume: str | os.PathLike | None, overrides: dict[str, Any]) -> _Session:
    """Set-up: the run directory (new or resumed), data, model, optimizer, schedule and position."""
    ckpt = None
    if resume is not None:
        check_resume_overrides(overrides)
        run_dir = Path(resume)
        if not (run_dir / CONFIG).is_file():
            raise TrainingError(f"{run_dir}: no {CONFIG} here: not a run directory")
        cfg = dataclasses.replace(TrainConfig.from_file(run_dir / CONFIG), **overrides)
        if (run_dir / CHECKPOINT).is_file():
            ckpt = load_checkpoint(run_dir / CHECKPOINT)
    else:
        run_dir = Path(cfg.out) / cfg.run_name()
        if run_dir.exists() and any(run_dir.iterdir()):
            raise TrainingError(
                f"{run_dir} already exists and is not empty: resume it with --resume {run_dir}, "
                "or choose another --name or --out (nothing was overwritten)"
            )
        # created below, once the data and the model are known to be good
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    full = load_dataset(cfg.dataset, cfg.data_root, "train", image_size=cfg.image_size,
                        synthetic_size=cfg.synthetic_size, seed=cfg.seed)  # fmt: skip
    train_set, val_set = train_val_split(full, cfg.val_fraction, seed=cfg.seed)
    mean, std = normalization(train_set)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=full.num_classes,
                                                             in_channels=full.num_channels))  # fmt: skip
    torch.manual_seed(cfg.seed)
    model = cfg.model.build()
    check_compatible(full, cfg.model.in_channels, cfg.model.num_classes)
    if ckpt is not None:
        model = build_and_load(ckpt["model_config"], ckpt["model"], run_dir / CHECKPOINT)
    channels_last = device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)

    per_epoch = num_batches(len(train_set), cfg.batch_size, drop_last=True)
    if per_epoch == 0:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set ({len(train_set)} examples)")
    per_epoch = min(per_epoch, cfg.max_batches or per_epoch)
    total, warmup = per_epoch * cfg.epochs, round(cfg.warmup_epochs * per_epoch)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_at(i, total, warmup, cfg.schedule))
    s = _Session(
        cfg=cfg, run_dir=run_dir, device=device, amp=device.type == "cuda" if cfg.amp is None else cfg.amp,
        channels_last=channels_last, progress=sys.stderr.isatty() if cfg.progress is None else cfg.progress,
        model=model, optimizer=optimizer, scheduler=scheduler, generator=torch.Generator().manual_seed(cfg.seed),
        train_set=train_set.to(device), val_set=val_set.to(device), mean=mean, std=std,
        extra={"normalization": {"mean": mean.tolist(), "std": std.tolist()}, "classes": full.classes},
        per_epoch=per_epoch,
    )  # fmt: skip
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        s.generator.set_state(ckpt["epoch_generator_state"])
        _set_rng_state(ckpt["rng"])
        s.epoch, s.batch_done, s.step = ckpt["epoch"], ckpt["batch"], ckpt["step"]
        _trim_metrics(run_dir / METRICS, s.epoch)
        log.info("resuming %s at epoch %d, batch %d", run_dir, s.epoch + 1, s.batch_done)
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {"train": cfg.to_dict(), "model": cfg.model.to_dict(), **s.extra}
    atomic_write(run_dir / CONFIG, (json.dumps(payload, indent=2) + "\n").encode())
    s.model.train()
    return s


def _checkpoint(s: _Session, epoch_gen_state: torch.Tensor) -> None:
    """Save the position ``(s.epoch, s.batch_done, s.step)``; ``epoch_gen_state`` draws the current epoch."""
    save_checkpoint(s.run_dir / CHECKPOINT, {
        "model_config": s.model.config.to_dict(), "model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(),
        "scheduler": s.scheduler.state_dict(), "epoch_generator_state": epoch_gen_state, "rng": _rng_state(),
        "epoch": s.epoch, "batch": s.batch_done, "step": s.step, "normalization": s.extra["normalization"],
    })  # fmt: skip


def _train_epoch(s: _Session, epoch_gen_state: torch.Tensor) -> _EpochStats:
    """One epoch from batch ``s.batch_done`` on; on Ctrl-C, checkpoint the position and re-raise."""
    cfg = s.cfg
    batches = iterate_batches(s.train_set, cfg.batch_size, shuffle=True, augment=cfg.augment, mean=s.mean,
                              std=s.std, generator=s.generator, drop_last=True)  # fmt: skip
    bar = tqdm(total=s.per_epoch, initial=s.batch_done, desc=f"epoch {s.epoch + 1}/{cfg.epochs}",
               disable=not s.progress, unit="batch", dynamic_ncols=True)  # fmt: skip
    stats = _EpochStats(torch.zeros((), device=s.device), 0, 0, 0.0)
    t0 = time.perf_counter()
    updating = False  # between the optimizer step and the counters, weights and counters disagree
    try:
        for i, (x, y) in enumerate(batches):
            if i >= s.per_epoch:
                break
            if i < s.batch_done:
                continue  # resumed mid-epoch: these batches were trained before the interruption
            if s.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(s.device.type, s.amp):
                loss = compute_loss(s.model, x, y, cfg)
            s.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            updating = True
            s.optimizer.step()
            s.scheduler.step()
            s.step += 1
            s.batch_done = i + 1
            updating = False
            stats.loss_sum += loss.detach()
            stats.batches += 1
            stats.images += len(y)
            if stats.batches % 10 == 0 or s.batch_done == s.per_epoch:  # a sync every 10 steps, not every step
                _check_finite(s, stats.loss_sum, i)
                rate = stats.images / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{stats.loss_sum.item() / stats.batches:.4f}", img_s=f"{rate:.0f}")
            bar.update(1)
            if cfg.checkpoint_every and s.step % cfg.checkpoint_every == 0 and s.batch_done < s.per_epoch:
                _check_finite(s, stats.loss_sum, i)
                _checkpoint(s, epoch_gen_state)
    except KeyboardInterrupt:
        bar.close()
        if updating or not torch.isfinite(stats.loss_sum):
            log.warning("interrupted; the last checkpoint was kept: cascadenet train --resume %s", s.run_dir)
        else:
            _checkpoint(s, epoch_gen_state)
            log.warning("interrupted after %d batches of epoch %d; checkpoint saved; continue with: "
                        "cascadenet train --resume %s", s.batch_done, s.epoch + 1, s.run_dir)  # fmt: skip
        raise
    bar.close()
    _check_finite(s, stats.loss_sum, s.per_epoch)
    stats.seconds = time.perf_counter() - t0
    return stats


def _validate(s: _Session, stats: _EpochStats) -> dict[str, Any]:
    """Validation accuracy per exit and anytime AUC after an epoch: the epoch's metrics row."""
    t0 = time.perf_counter()
    logits = dataset_logits(s.model, s.val_set, s.mean, s.std, batch_size=s.cfg.eval_batch_size, amp=s.amp,
                            progress=s.progress, desc="validate")  # fmt: skip
    summary = metrics.summarize(logits, s.val_set.labels.cpu(), first_step=s.model.first_informative_exit)
    return {
        "epoch": s.epoch,
        "step": s.step,
        "train_loss": stats.loss_sum.item() / max(stats.batches, 1),
        "lr": s.scheduler.get_last_lr()[0],
        "train_images_per_s": stats.images / max(stats.seconds, 1e-9),
        "val_accuracy_per_step": summary["accuracy_per_step"],
        "val_anytime_auc": summary["anytime_auc"],
        "seconds": stats.seconds + time.perf_counter() - t0,
    }


def _record(s: _Session, row: dict[str, Any]) -> None:
    with open(s.run_dir / METRICS, "a") as f:
        f.write(json.dumps(row) + "\n")
    log.info(
        "epoch %d/%d  loss %.4f  val acc (last exit) %.2f%%  val AUC %.4f  %.0f img/s  %.0fs", row["epoch"],
        s.cfg.epochs, row["train_loss"], 100 * row["val_accuracy_per_step"][-1], row["val_anytime_auc"],
        row["train_images_per_s"], row["seconds"],
    )  # fmt: skip


def _check_finite(s: _Session, loss_sum: torch.Tensor, batch: int) -> None:
    if not torch.isfinite(loss_sum):
        where = s.run_dir / CHECKPOINT
        kept = f"the last good checkpoint {where} was kept" if where.exists() else "no checkpoint was written"
        raise TrainingError(
            f"the loss became {loss_sum.item()} in epoch {s.epoch + 1} near batch {batch + 1}; training stopped and "
            f"{kept} (try a lower --lr)"
        )
