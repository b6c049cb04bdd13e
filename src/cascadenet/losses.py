"""Losses for anytime classifiers: TD(lambda), per-step cross-entropy and feed-forward cross-entropy.

TD(lambda) (Iuzzolino, Mozer & Bengio 2021): with p_t = softmax(z_t), y the (optionally smoothed) one-hot
label and sg a stop-gradient, the targets run backwards in time,

    q_{T-1} = y,    q_t = (1 - lambda) * sg(p_{t+1}) + lambda * q_{t+1},

and the loss is the soft cross-entropy -sum_c q_t[c] log p_t[c], averaged over the batch and *summed* over
the steps whose output can depend on the input. lambda = 1 is cross-entropy at every step; lambda = 0 makes
each step predict the next step's output (pure bootstrapping), only the last step seeing the label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LOSSES", "td_targets", "td_loss", "stepwise_ce", "final_ce"]

LOSSES = ("td", "ce", "final")


def _check(logits: Tensor, targets: Tensor, label_smoothing: float) -> None:
    if logits.ndim != 3:
        raise ValueError(f"logits must be a trajectory (T, B, C), got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[1:2]:
        raise ValueError(f"targets must have shape ({logits.shape[1]},), got {tuple(targets.shape)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")


def _labels(targets: Tensor, num_classes: int, label_smoothing: float, dtype: torch.dtype) -> Tensor:
    y = F.one_hot(targets, num_classes).to(dtype)
    if label_smoothing:
        y = y * (1 - label_smoothing) + label_smoothing / num_classes
    return y


@torch.no_grad()
def td_targets(logits: Tensor, targets: Tensor, lam: float, label_smoothing: float = 0.0) -> Tensor:
    """The TD(lambda) targets q_t for a trajectory ``(T, B, C)``; no gradient flows through them."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    _check(logits, targets, label_smoothing)
    probs = logits.float().softmax(dim=-1)  # (T, B, C)
    q = torch.empty_like(probs)
    q[-1] = _labels(targets, logits.shape[-1], label_smoothing, probs.dtype)
    for t in range(logits.shape[0] - 2, -1, -1):  # the one loop over time: each target needs the next one
        q[t] = (1 - lam) * probs[t + 1] + lam * q[t + 1]
    return q


def _soft_ce(logits: Tensor, q: Tensor, first_step: int) -> Tensor:
    if not 0 <= first_step < logits.shape[0]:
        raise ValueError(f"first_step must be in [0, {logits.shape[0]}), got {first_step}")
    per_step = -(q * logits.float().log_softmax(dim=-1)).sum(-1).mean(-1)  # (T,)
    return per_step[first_step:].sum()


def td_loss(
    logits: Tensor, targets: Tensor, lam: float, *, first_step: int = 1, label_smoothing: float = 0.0
) -> Tensor:
    """TD(lambda) loss of a trajectory.

    Args:
        logits: ``(T, B, C)``.
        targets: class indices ``(B,)``.
        lam: lambda in [0, 1].
        first_step: first step included in the sum. The default 1 skips step 0, whose output cannot depend
            on the input when the stem is delayed (the default model); use
            ``model.first_informative_step`` to follow the model.
        label_smoothing: smoothing of the one-hot label.
    """
    return _soft_ce(logits, td_targets(logits, targets, lam, label_smoothing), first_step)


def stepwise_ce(logits: Tensor, targets: Tensor, *, first_step: int = 1, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy with the label at every step, summed over steps (= TD(1))."""
    _check(logits, targets, label_smoothing)
    q = _labels(targets, logits.shape[-1], label_smoothing, torch.float32).expand(logits.shape[0], -1, -1)
    return _soft_ce(logits, q, first_step)


def final_ce(logits: Tensor, targets: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
    """Ordinary cross-entropy of a feed-forward output ``(B, C)``: the CascadedCE / SerialCE baselines train
    an ordinary ResNet this way and insert the delays only at test time."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
