"""Losses for anytime classifiers: TD(lambda), per-step cross-entropy and feed-forward cross-entropy.

TD(lambda) (Iuzzolino, Mozer & Bengio 2021): with p_t = softmax(z_t), y the (optionally smoothed) one-hot
label and sg a stop-gradient, the targets run backwards in time,

    q_{T-1} = y,    q_t = (1 - lambda) * sg(p_{t+1}) + lambda * q_{t+1},

and the loss is the soft cross-entropy -sum_c q_t[c] log p_t[c], averaged over the batch and *summed* over
the steps whose output can depend on the input. lambda = 1 is cross-entropy at every step; lambda = 0 makes
each step predict the next step's output (pure bootstrapping), only the last step seeing the label.

Shallow-Deep Networks (Kaya et al. 2019) train their internal classifiers (all exits but the last) with
``sdn_loss``, sum_i tau_i(e) CE(IC_i) + CE(final), whose weights ``sdn_weights`` ramp up over the epochs, or, on
a trained and frozen backbone, with ``ic_only_loss``, the unweighted sum of the ICs' cross-entropies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["td_targets", "td_loss", "stepwise_ce", "final_ce", "sdn_weights", "sdn_loss", "ic_only_loss"]


def _upcast(logits: Tensor) -> Tensor:
    """Losses are computed in at least float32 (logits under bf16 autocast are upcast); a float64 model keeps
    float64, so that a double-precision run is double precision throughout."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


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
    probs = _upcast(logits).softmax(dim=-1)  # (T, B, C)
    q = torch.empty_like(probs)
    q[-1] = _labels(targets, logits.shape[-1], label_smoothing, probs.dtype)
    for t in range(logits.shape[0] - 2, -1, -1):  # the one loop over time: each target needs the next one
        q[t] = (1 - lam) * probs[t + 1] + lam * q[t + 1]
    return q


def _soft_ce(logits: Tensor, q: Tensor, first_step: int) -> Tensor:
    if not 0 <= first_step < logits.shape[0]:
        raise ValueError(f"first_step must be in [0, {logits.shape[0]}), got {first_step}")
    per_step = -(q * _upcast(logits).log_softmax(dim=-1)).sum(-1).mean(-1)  # (T,)
    return per_step[first_step:].sum()


def td_loss(logits: Tensor, targets: Tensor, lam: float, *, first_step: int, label_smoothing: float = 0.0) -> Tensor:
    """TD(lambda) loss of a trajectory: the cross-entropy of each step's output against its TD target, summed over
    the steps ``first_step..T-1`` and averaged over the batch.

    Args:
        logits: ``(T, B, C)``.
        targets: class indices ``(B,)``.
        lam: lambda in [0, 1].
        first_step: first step included in the sum, required: pass ``model.first_informative_exit`` (1 for a
            cascade with the stem delayed, whose step 0 cannot depend on the input; 0 without the delay, or for
            a multi-exit network). A default would be wrong for one of them.
        label_smoothing: smoothing of the one-hot label.
    """
    return _soft_ce(logits, td_targets(logits, targets, lam, label_smoothing), first_step)


def stepwise_ce(logits: Tensor, targets: Tensor, *, first_step: int, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy with the label at every step, summed over the steps ``first_step..T-1`` and averaged over the
    batch (= TD(1)); ``first_step`` as for ``td_loss`` (``model.first_informative_exit``)."""
    _check(logits, targets, label_smoothing)
    q = _labels(targets, logits.shape[-1], label_smoothing, _upcast(logits).dtype).expand(logits.shape[0], -1, -1)
    return _soft_ce(logits, q, first_step)


def final_ce(logits: Tensor, targets: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
    """Ordinary cross-entropy of a feed-forward output ``(B, C)``: the CascadedCE / SerialCE baselines train
    an ordinary ResNet this way and insert the delays only at test time."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    return F.cross_entropy(_upcast(logits), targets, label_smoothing=label_smoothing)


def sdn_weights(fractions: tuple[float, ...] | list[float], epoch: int, epochs: int) -> list[float]:
    """SDN's IC weights in epoch ``epoch`` (1-based) of ``epochs``: tau_i(e) = min(tau_i, 0.01 + e * tau_i / E),
    tau_i the IC's cost fraction (``model_funcs.sdn_train`` of the reference code): each weight starts near 0.01
    and reaches tau_i only in the last epoch."""
    if not 1 <= epoch <= epochs:
        raise ValueError(f"epoch must be in [1, {epochs}], got {epoch}")
    return [min(tau, 0.01 + epoch * tau / epochs) for tau in fractions]


def sdn_loss(logits: Tensor, targets: Tensor, weights: list[float], *, label_smoothing: float = 0.0) -> Tensor:
    """SDN's joint loss of exits ``(E, B, C)`` (internal classifiers, then the final head):
    sum_i weights[i] * CE(exit i) + CE(final), each CE averaged over the batch."""
    _check(logits, targets, label_smoothing)
    if len(weights) != logits.shape[0] - 1:
        raise ValueError(f"{logits.shape[0] - 1} internal classifiers but {len(weights)} weights")
    ce = [F.cross_entropy(_upcast(z), targets, label_smoothing=label_smoothing) for z in logits]
    return sum((w * c for w, c in zip(weights, ce[:-1])), ce[-1])


def ic_only_loss(logits: Tensor, targets: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
    """SDN's IC-only loss: the unweighted sum of the internal classifiers' cross-entropies (every exit of
    ``(E, B, C)`` but the last, the final head, which is frozen)."""
    _check(logits, targets, label_smoothing)
    if logits.shape[0] < 2:
        raise ValueError("the IC-only loss needs internal classifiers: the logits hold only the final exit")
    ce = [F.cross_entropy(_upcast(z), targets, label_smoothing=label_smoothing) for z in logits[:-1]]
    return sum(ce[1:], ce[0])
