"""The learned stopping policy (``cascadenet policy``'s ``learned``): a small GRU reads a softmax trace from the
first informative exit on and says at each step the probability that the current answer is correct (``TARGETS``);
``GRUPolicy`` stops at the first step where that probability is ``>= tau``. ``fit_gru`` fits it on a validation
trace, the epochs chosen on a held-out part of it. ``cascadenet.properties.stopping`` compares it with the rule
policies."""

from __future__ import annotations

import copy
import hashlib
import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..evaluation.policies import Policy

__all__ = ["GRUConfig", "GRUPolicy", "TARGETS", "TraceGRU", "fit_gru", "stopping_targets"]

# What the GRU learns to predict at step t (see stopping_targets):
# - "correct": argmax_t == label. The default, because it is exactly the reward of stopping at t (the accuracy
#   reported is that of the answers at the stopping steps): P(correct_t | trace so far) is the quantity a stopping
#   rule should threshold, the one the model's own confidence estimates.
# - "final-correct": argmax_t == label and argmax_t is also the last step's answer. It marks as "do not stop" an
#   answer that is right now but changes later, although stopping there costs no accuracy, so it stops later for
#   nothing; kept for comparison with the reference code's "settled" label (argmax_t == final argmax).
TARGETS = ("correct", "final-correct")

# The GRU reads log-probabilities, clamped here and scaled to [-1, 0] so that its gates start unsaturated.
_LOG_FLOOR = 1e-8


@dataclass(frozen=True)
class GRUConfig:
    """How the learned policy's GRU is built and fitted (on the validation split only)."""

    hidden: int = 16
    """GRU hidden units."""
    target: str = "correct"
    """What it predicts at each step: ``correct`` or ``final-correct`` (``TARGETS``)."""
    holdout: float = 0.25
    """Fraction of the validation split held out of the fitting: it picks the epoch (early stopping) and the
    policy's tau values and operating point."""
    epochs: int = 60
    """Most epochs."""
    patience: int = 8
    """Stop after this many epochs without a lower held-out loss (the best epoch's weights are kept)."""
    lr: float = 1e-2
    """Adam learning rate."""
    batch_size: int = 128
    """Examples per Adam step."""

    def __post_init__(self) -> None:
        for name in ("hidden", "epochs", "patience", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"GRUConfig.{name} must be an integer >= 1, got {v!r}")
        if self.target not in TARGETS:
            raise ValueError(f"GRUConfig.target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, numbers.Real) or not 0 < self.holdout < 1:
            raise ValueError(f"GRUConfig.holdout must be a fraction in (0, 1), got {self.holdout!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, numbers.Real) or not 0 < self.lr < math.inf:
            raise ValueError(f"GRUConfig.lr must be a number > 0, got {self.lr!r}")


class TraceGRU(nn.Module):
    """GRU over a softmax trace ``(S, N, C)`` (time first), a linear read-out per step: ``(S, N)`` logits of the
    probability that the answer at that step is the target (``stopping_targets``). Causal: step s reads steps
    0..s only."""

    def __init__(self, num_classes: int, hidden: int = 16):
        super().__init__()
        self.gru = nn.GRU(num_classes, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, probs: Tensor) -> Tensor:
        x = torch.log(probs.float().clamp_min(_LOG_FLOOR)) / -math.log(_LOG_FLOOR)  # (S, N, C) in [-1, 0]
        h, _ = self.gru(x)  # (S, N, hidden)
        return self.out(h).squeeze(-1)  # (S, N)

    @torch.no_grad()
    def scores(self, probs: Tensor) -> Tensor:
        """The predicted probabilities ``(S, N)`` in evaluation mode, on the trace's device."""
        was_training = self.training
        self.eval()
        try:
            probs = torch.as_tensor(probs)
            return torch.sigmoid(self.to(probs.device)(probs))
        finally:
            self.train(was_training)


class GRUPolicy(Policy):
    """Stop at the first step where a fitted ``TraceGRU`` says ``>= tau`` (online and offline, as every policy).
    The GRU reads every step from ``first_step`` on, so its window is the whole trace."""

    window = 2**62  # more than any trace: Policy.stop passes every step from first_step on

    def __init__(self, net: TraceGRU, tau: float):
        if not isinstance(net, TraceGRU):
            raise ValueError(f"net must be a TraceGRU, got {type(net).__name__}")
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0.0 <= tau <= 1.0:
            raise ValueError(f"tau must be a number in [0, 1], got {tau!r}")
        self.net, self.tau = net, float(tau)

    def rule(self, probs: Tensor) -> Tensor:
        return self.net.scores(probs) >= self.tau

    def __repr__(self) -> str:
        return f"GRUPolicy(tau={self.tau})"


def stopping_targets(probs: Tensor, labels: Tensor, target: str = "correct") -> Tensor:
    """The GRU's training targets ``(S, N)`` (float 0/1) of a trace ``(S, N, C)``; see ``TARGETS``."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    pred = probs.argmax(dim=-1)  # (S, N)
    y = pred == labels.to(pred.device)
    if target == "final-correct":
        y &= pred == pred[-1]
    return y.float()


def fit_gru(
    probs: Any, labels: Any, first_step: int = 0, config: GRUConfig = GRUConfig(), seed: int = 0
) -> tuple[TraceGRU, dict[str, Any]]:
    """Fit the learned policy's GRU on a (validation) trace, deterministically for a seed.

    The examples are split at random (seeded) into a fitting part and a held-out part (``config.holdout``);
    Adam minimises the per-step binary cross-entropy on the fitting part, and the weights of the epoch with the
    lowest held-out loss are kept (``config.patience`` epochs without improvement end the fit). Steps before
    ``first_step`` are not read. Fitting runs on the CPU in float32 (the trace is small, and the result is then
    the same on every machine); the caller's random state is left untouched.

    Args:
        probs: ``(T, N, C)`` softmax outputs of every exit.
        labels: ``(N,)`` class labels.
        first_step: the first exit the policy may stop at (``model.first_informative_exit``).

    Returns:
        The fitted net (CPU, evaluation mode) and a record: sizes, epochs, losses, the held-out per-step accuracy
        of ``score >= 0.5`` and its positive rate, ``holdout_index`` (the held-out examples) and a digest of the
        weights.
    """
    probs, labels = _trace(probs, labels, "probs")
    T, n, num_classes = probs.shape
    _check_first(first_step, T)
    if n < 2:
        raise ValueError(f"the learned policy needs at least 2 validation examples (to fit and to hold out), got {n}")
    x = probs[first_step:].detach().float().cpu()  # (S, N, C)
    y = stopping_targets(x, labels.cpu(), config.target)  # (S, N)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    n_hold = min(n - 1, max(1, round(n * config.holdout)))
    hold, fit = order[:n_hold], order[n_hold:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = TraceGRU(num_classes, config.hidden)
    best, best_epoch, losses = _fit_early_stopped(net, x, y, fit, hold, config, gen)
    net.eval()
    with torch.no_grad():
        hold_pred = net(x[:, hold]) >= 0  # sigmoid >= 0.5
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in net.state_dict().values())).hexdigest()
    record = {
        **asdict(config),
        "seed": seed,
        "fit_examples": int(fit.numel()),
        "holdout_examples": int(n_hold),
        "epochs_run": len(losses),
        "best_epoch": best_epoch,
        "holdout_loss": best,
        "holdout_loss_per_epoch": losses,
        "holdout_step_accuracy": float((hold_pred == y[:, hold].bool()).float().mean()),
        "holdout_positive_rate": float(y[:, hold].mean()),
        "holdout_index": sorted(int(i) for i in hold),
        "weights_sha256": digest,
    }
    return net, record


def _fit_early_stopped(
    net: TraceGRU, x: Tensor, y: Tensor, fit: Tensor, hold: Tensor, config: GRUConfig, gen: torch.Generator
) -> tuple[float, int, list[float]]:
    """Adam on the examples ``fit`` (batch order from ``gen``) until ``config.patience`` epochs bring no lower loss
    on the examples ``hold``; leaves ``net`` with the best epoch's weights. Returns the best held-out loss, its
    epoch (0: the initial weights) and the held-out loss of every epoch run."""
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    bce = nn.BCEWithLogitsLoss()

    def holdout_loss() -> float:
        with torch.no_grad():
            return float(bce(net(x[:, hold]), y[:, hold]))

    best, best_epoch, best_state, losses = holdout_loss(), 0, copy.deepcopy(net.state_dict()), []
    net.train()
    for epoch in range(1, config.epochs + 1):
        perm = fit[torch.randperm(fit.numel(), generator=gen)]
        for batch in perm.split(config.batch_size):
            opt.zero_grad()
            bce(net(x[:, batch]), y[:, batch]).backward()
            opt.step()
        loss = holdout_loss()
        losses.append(loss)
        if loss < best:
            best, best_epoch, best_state = loss, epoch, copy.deepcopy(net.state_dict())
        elif epoch - best_epoch >= config.patience:
            break
    net.load_state_dict(best_state)
    return best, best_epoch, losses


def _trace(probs: Any, labels: Any, name: str) -> tuple[Tensor, Tensor]:
    probs, labels = torch.as_tensor(probs), torch.as_tensor(labels)
    if probs.ndim != 3 or 0 in probs.shape or not probs.dtype.is_floating_point:
        raise ValueError(f"{name} must be a (T, N, C) float trace of softmax outputs, got {tuple(probs.shape)}")
    if labels.shape != (probs.shape[1],) or labels.dtype.is_floating_point:
        raise ValueError(f"labels must be (N,) = ({probs.shape[1]},) integers, got {tuple(labels.shape)}")
    return probs, labels.long()


def _check_first(first_step: Any, num_steps: int) -> int:
    if isinstance(first_step, bool) or not isinstance(first_step, numbers.Integral) or not 0 <= first_step < num_steps:
        raise ValueError(f"first_step must be an integer in [0, {num_steps}), got {first_step!r}")
    return int(first_step)
