"""What training optimises and how: the loss of a batch (``compute_loss``: the ``--loss`` of a run applied to a
model), the optimizer with its weight-decay groups (``make_optimizer``) and the learning-rate schedule (``lr_at``).

The loss functions themselves are in ``cascadenet.training.losses`` (pure functions of ``(E, B, C)`` logits, importing
nothing of the package); here they meet a model and a ``TrainConfig``. The training loop (``cascadenet.training.loop``)
imports these names and calls ``compute_loss`` through its own module, so replacing
``cascadenet.training.loop.compute_loss`` (as the interruption tests do) changes the loss the loop computes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..models.norm import TemporalBatchNorm2d
from ..runs.config import TrainConfig
from .losses import final_ce, ic_only_loss, sdn_loss, sdn_weights, stepwise_ce, td_loss

__all__ = ["compute_loss", "lr_at", "make_optimizer"]


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
    params = [p for p in model.parameters() if p.requires_grad]  # not the frozen parts (SDN's IC-only mode)
    decay = [p for p in params if p.ndim >= 2 and id(p) not in norm]
    other = [p for p in params if p.ndim < 2 or id(p) in norm]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def compute_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, epoch: int = 1) -> torch.Tensor:
    """The training loss of a batch in epoch ``epoch`` (1-based; SDN's IC weights ramp over the epochs)."""
    if cfg.loss == "final":
        # the model's own final prediction: a cascade's ordinary ResNet, else the last exit
        feedforward = getattr(model, "feedforward", None)
        final = feedforward(x) if feedforward is not None else model(x)[-1]
        return final_ce(final, y, label_smoothing=cfg.label_smoothing)
    logits = model(x)  # (E, B, C)
    first = model.first_informative_exit
    if cfg.loss == "ce":
        return stepwise_ce(logits, y, first_step=first, label_smoothing=cfg.label_smoothing)
    if cfg.loss == "sdn":
        weights = sdn_weights(model.ic_fractions, epoch, cfg.epochs)
        return sdn_loss(logits, y, weights, label_smoothing=cfg.label_smoothing)
    if cfg.loss == "ic-only":
        return ic_only_loss(logits, y, label_smoothing=cfg.label_smoothing)
    return td_loss(logits, y, cfg.lam, first_step=first, label_smoothing=cfg.label_smoothing)
