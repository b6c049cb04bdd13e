"""Training: one explicit loop, a resumable run directory, and the same code path on CPU and GPU.

A run directory holds
- ``config.json``: the resolved configuration (replay it with ``cascadenet train --config RUN/config.json``);
- ``checkpoint.pt``: model, optimizer, scheduler, RNG state and position, written atomically at every epoch
  end (and every ``checkpoint_every`` steps, and on Ctrl-C), so a kill at any moment leaves the previous one;
- ``metrics.jsonl``: one line per epoch (train loss, throughput, validation accuracy per step and AUC);
- ``model.safetensors``: the final weights, with the model configuration as metadata.

Resuming restores everything the loop depends on (the batch order of an epoch is drawn from a generator
whose state at the epoch start is saved, so resuming mid-epoch skips exactly the batches already done);
on CPU a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from . import data as D
from . import metrics
from .cascade import CascadedResNet
from .checkpoint import (
    CHECKPOINT,
    WEIGHTS,
    atomic_write,
    build_and_load,
    load_checkpoint,
    save_checkpoint,
    save_weights,
)
from .losses import LOSSES, final_ce, stepwise_ce, td_loss
from .registry import create_model

__all__ = ["TrainConfig", "TrainingError", "train", "lr_at", "predict", "resolve_device"]

CONFIG = "config.json"
METRICS = "metrics.jsonl"


class TrainingError(RuntimeError):
    """Training cannot go on (diverged loss, a run directory in the way, an unusable checkpoint)."""


@dataclass
class TrainConfig:
    """Train a cascaded ResNet. Every option is also a field of this dataclass (usable from Python)."""

    # --- model ---
    model: str = "resnet18"
    """Architecture: resnet10, resnet18, resnet34 or resnet50."""
    width: int = 64
    """Channels of the first stage (64 = the standard ResNet)."""
    stem: Literal["cifar", "cifar_pool", "imagenet"] = "cifar"
    """cifar: 3x3 conv; cifar_pool: plus 3x3/2 max-pool (4x cheaper); imagenet: 7x7/2 conv plus max-pool."""
    scheme: Literal["parallel", "serial"] = "parallel"
    """Execution scheme used in training and as the model's default."""
    delay: Literal["osd", "ews"] = "osd"
    """Delay kernel of the residual branches: one-step delay, or exponential smoothing."""
    alpha: float = 0.0
    """EWS smoothing factor in [0, 1)."""
    stem_delay: bool = True
    """Delay the stem output by one step (as the published code)."""
    temporal_bn: bool = True
    """Batch-norm running statistics per step."""
    temporal_affine: bool = False
    """Batch-norm scale and shift per step too."""
    multi_head: bool = False
    """One classifier per step."""
    num_steps: int | None = None
    """Steps of a trajectory (default: the settling time, blocks + 2)."""

    # --- data ---
    dataset: Literal["fashion-mnist", "cifar10", "cifar100", "imagefolder", "synthetic"] = "fashion-mnist"
    """Dataset; all but synthetic are read from --data-root in their standard on-disk layout."""
    data_root: str | None = None
    """Dataset folder (default for fashion-mnist: /usr/share/datasets/fashion-mnist)."""
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

    def model_kwargs(self) -> dict[str, Any]:
        keys = ("width", "stem", "scheme", "delay", "alpha", "stem_delay", "temporal_bn", "temporal_affine")
        return {"name": self.model, **{k: getattr(self, k) for k in keys}, "multi_head": self.multi_head,
                "num_steps": self.num_steps}  # fmt: skip

    def run_name(self) -> str:
        return self.name or f"{self.model}-{self.loss}-{self.dataset}-s{self.seed}"

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TrainConfig:
        """Read a config.json written by a run (unknown keys are an error, missing keys take defaults)."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read the configuration: {e}") from None
        raw = raw.get("train", raw)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown configuration keys: {', '.join(unknown)}")
        return cls(**raw)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    return device


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


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Weight decay on conv and linear weights only: decaying batch-norm scales and biases only hurts.
    # (temporal batch-norm scales are 2-D, (slots, C), so dimensionality alone does not tell them apart)
    norm = {id(p) for bn in model.norms() for p in (bn.weight, bn.bias)}
    decay = [p for p in model.parameters() if p.ndim >= 2 and id(p) not in norm]
    other = [p for p in model.parameters() if p.ndim < 2 or id(p) in norm]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def compute_loss(model: CascadedResNet, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    if cfg.loss == "final":
        return final_ce(model.feedforward(x), y, label_smoothing=cfg.label_smoothing)
    logits = model(x)  # (T, B, C)
    first = model.first_informative_step
    if cfg.loss == "ce":
        return stepwise_ce(logits, y, first_step=first, label_smoothing=cfg.label_smoothing)
    return td_loss(logits, y, cfg.lam, first_step=first, label_smoothing=cfg.label_smoothing)


@torch.no_grad()
def predict(
    model: CascadedResNet,
    ds: D.ImageSet,
    mean: torch.Tensor,
    std: torch.Tensor,
    *,
    batch_size: int = 500,
    scheme: str | None = None,
    num_steps: int | None = None,
    amp: bool = False,
    progress: bool = False,
    desc: str = "eval",
) -> torch.Tensor:
    """Trajectory logits of a whole dataset, ``(T, N, C)`` float32 on the CPU, plus nothing else."""
    was_training = model.training
    model.eval()
    out = []
    batches = D.iterate_batches(ds, batch_size, shuffle=False, augment=False, mean=mean, std=std)
    n = D.num_batches(len(ds), batch_size, False)
    device_type = ds.images.device.type
    try:
        for x, _ in tqdm(batches, total=n, desc=desc, disable=not progress, leave=False):
            with _autocast(device_type, amp):
                out.append(model(x, scheme=scheme, num_steps=num_steps).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out, dim=1)


def _autocast(device_type: str, enabled: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_config(run_dir: Path, cfg: TrainConfig, extra: dict[str, Any]) -> None:
    payload = {"train": dataclasses.asdict(cfg), **extra}
    atomic_write(run_dir / CONFIG, (json.dumps(payload, indent=2) + "\n").encode())


def _prepare_run_dir(cfg: TrainConfig, resume: str | os.PathLike | None) -> tuple[Path, TrainConfig, dict | None]:
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / CONFIG).is_file():
            raise TrainingError(f"{run_dir}: no {CONFIG} here: not a run directory")
        stored = TrainConfig.from_file(run_dir / CONFIG)
        ckpt = load_checkpoint(run_dir / CHECKPOINT) if (run_dir / CHECKPOINT).is_file() else None
        return run_dir, stored, ckpt
    run_dir = Path(cfg.out) / cfg.run_name()
    if run_dir.exists() and any(run_dir.iterdir()):
        raise TrainingError(
            f"{run_dir} already exists and is not empty: resume it with --resume {run_dir}, "
            "or choose another --name or --out (nothing was overwritten)"
        )
    return run_dir, cfg, None  # created once the data and the model are known to be good


def _trim_metrics(path: Path, epochs_done: int) -> list[dict]:
    """Keep the metric lines of the epochs the checkpoint covers (a kill may have left one more)."""
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            row = json.loads(line)
            if row.get("epoch", 0) <= epochs_done:
                lines.append(row)
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in lines).encode())
    return lines


def train(
    cfg: TrainConfig | None = None, *, resume: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None
) -> Path:
    """Train a model; returns the run directory.

    Args:
        cfg: the configuration (ignored when resuming: the run's stored configuration is used).
        resume: a run directory to continue from its last checkpoint (or from the start if it has none).
        overrides: options that a resumed run may change because they do not change what is computed
            (device, threads, progress, data_root, checkpoint_every, eval_batch_size).

    Raises:
        TrainingError: the run directory is in the way, the checkpoint is unusable, or the loss diverged.
        cascadenet.data.DataError: the dataset is missing or malformed.
        ValueError: a bad option.
    """
    cfg = cfg or TrainConfig()
    run_dir, cfg, ckpt = _prepare_run_dir(cfg, resume)
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    amp = device.type == "cuda" if cfg.amp is None else cfg.amp
    channels_last = device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
    progress = sys.stderr.isatty() if cfg.progress is None else cfg.progress

    full = D.load_dataset(cfg.dataset, cfg.data_root, "train", image_size=cfg.image_size,
                          synthetic_size=cfg.synthetic_size, seed=cfg.seed)  # fmt: skip
    train_set, val_set = D.train_val_split(full, cfg.val_fraction, seed=cfg.seed)
    mean, std = D.normalization(train_set)
    train_set, val_set = train_set.to(device), val_set.to(device)

    torch.manual_seed(cfg.seed)
    model_kwargs = {**cfg.model_kwargs(), "num_classes": full.num_classes, "in_channels": full.num_channels}
    model = create_model(**model_kwargs)
    D.check_compatible(full, model.in_channels, model.num_classes)
    if ckpt is not None:
        model = build_and_load(ckpt["model_config"], ckpt["model"], run_dir / CHECKPOINT)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)

    per_epoch = D.num_batches(len(train_set), cfg.batch_size, drop_last=True)
    if per_epoch == 0:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set ({len(train_set)} examples)")
    per_epoch = min(per_epoch, cfg.max_batches or per_epoch)
    total = per_epoch * cfg.epochs
    warmup = round(cfg.warmup_epochs * per_epoch)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total, warmup, cfg.schedule))
    generator = torch.Generator().manual_seed(cfg.seed)
    epoch, batch_done, step = 0, 0, 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        generator.set_state(ckpt["epoch_generator_state"])
        _set_rng_state(ckpt["rng"])
        epoch, batch_done, step = ckpt["epoch"], ckpt["batch"], ckpt["step"]
        _trim_metrics(run_dir / METRICS, epoch)
        print(f"resuming {run_dir} at epoch {epoch + 1}, batch {batch_done}", file=sys.stderr)
    stats = {"mean": mean.tolist(), "std": std.tolist()}
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_config(run_dir, cfg, {"model": model.config, "normalization": stats, "classes": full.classes})

    def checkpoint(epoch_gen_state: torch.Tensor, epoch_: int, batch_: int) -> None:
        save_checkpoint(run_dir / CHECKPOINT, {
            "model_config": model.config, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch_generator_state": epoch_gen_state, "rng": _rng_state(),
            "epoch": epoch_, "batch": batch_, "step": step, "normalization": stats,
        })  # fmt: skip

    model.train()
    while epoch < cfg.epochs:
        epoch_gen_state = generator.get_state()
        batches = D.iterate_batches(train_set, cfg.batch_size, shuffle=True, augment=cfg.augment, mean=mean,
                                    std=std, generator=generator, drop_last=True)  # fmt: skip
        bar = tqdm(total=per_epoch, initial=batch_done, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
                   unit="batch", dynamic_ncols=True)  # fmt: skip
        loss_sum, loss_count, seen, t0 = torch.zeros((), device=device), 0, 0, time.perf_counter()
        completed, updating = batch_done, False  # batches of this epoch fully applied; inside an update?
        try:
            for i, (x, y) in enumerate(batches):
                if i >= per_epoch:
                    break
                if i < batch_done:
                    continue  # resumed mid-epoch: these batches were trained before the interruption
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with _autocast(device.type, amp):
                    loss = compute_loss(model, x, y, cfg)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                updating = True  # from here until the counters move, weights and counters may disagree
                optimizer.step()
                scheduler.step()
                step += 1
                completed = i + 1
                updating = False
                loss_sum += loss.detach()
                loss_count += 1
                seen += len(y)
                if loss_count % 10 == 0 or completed == per_epoch:  # a sync every 10 steps, not every step
                    _check_finite(loss_sum, epoch, i, run_dir)
                    rate = seen / (time.perf_counter() - t0)
                    bar.set_postfix(loss=f"{loss_sum.item() / loss_count:.4f}", img_s=f"{rate:.0f}")
                bar.update(1)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and completed < per_epoch:
                    _check_finite(loss_sum, epoch, i, run_dir)
                    checkpoint(epoch_gen_state, epoch, completed)
        except KeyboardInterrupt:
            bar.close()
            if updating or not torch.isfinite(loss_sum):
                print(
                    f"\ninterrupted; the last checkpoint was kept: cascadenet train --resume {run_dir}", file=sys.stderr
                )
            else:
                checkpoint(epoch_gen_state, epoch, completed)
                print(f"\ninterrupted after {completed} batches of epoch {epoch + 1}; checkpoint saved; continue "
                      f"with: cascadenet train --resume {run_dir}", file=sys.stderr)  # fmt: skip
            raise
        bar.close()
        _check_finite(loss_sum, epoch, per_epoch, run_dir)
        train_time = time.perf_counter() - t0
        epoch, batch_done = epoch + 1, 0
        logits = predict(model, val_set, mean, std, batch_size=cfg.eval_batch_size, amp=amp, progress=progress,
                         desc="validate")  # fmt: skip
        summary = metrics.summarize(logits, val_set.labels.cpu(), first_step=model.first_informative_step)
        row = {
            "epoch": epoch,
            "step": step,
            "train_loss": loss_sum.item() / max(loss_count, 1),
            "lr": scheduler.get_last_lr()[0],
            "train_images_per_s": seen / max(train_time, 1e-9),
            "val_accuracy_per_step": summary["accuracy_per_step"],
            "val_anytime_auc": summary["anytime_auc"],
            "seconds": time.perf_counter() - t0,
        }
        checkpoint(generator.get_state(), epoch, 0)
        with open(run_dir / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(
            f"epoch {epoch}/{cfg.epochs}  loss {row['train_loss']:.4f}  val acc (last step) "
            f"{100 * summary['accuracy_per_step'][-1]:.2f}%  val AUC {summary['anytime_auc']:.4f}  "
            f"{row['train_images_per_s']:.0f} img/s  {row['seconds']:.0f}s",
            file=sys.stderr,
        )
    save_weights(run_dir / WEIGHTS, model, {"normalization": stats, "classes": full.classes, "epochs": cfg.epochs})
    return run_dir


def _check_finite(loss_sum: torch.Tensor, epoch: int, batch: int, run_dir: Path) -> None:
    if not torch.isfinite(loss_sum):
        where = run_dir / CHECKPOINT
        kept = f"the last good checkpoint {where} was kept" if where.exists() else "no checkpoint was written"
        raise TrainingError(
            f"the loss became {loss_sum.item()} in epoch {epoch + 1} near batch {batch + 1}; training stopped and "
            f"{kept} (try a lower --lr)"
        )
