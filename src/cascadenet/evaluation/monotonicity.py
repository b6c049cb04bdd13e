"""Conditional monotonicity of anytime predictions (Jazbec et al., "Towards Anytime Classification in Early-Exit
Architectures by Enforcing Conditional Monotonicity", NeurIPS 2023): an example's prediction should not get worse
as it runs longer.

On ``(E, N, C)`` outputs (raw, calibrated or product of experts: ``cascadenet.evaluation.outputs``), counted from
the model's first informative exit on (a stem-delayed cascade's step 0 gives every input the same answer; a drop
from it says nothing about the input, so it is left out):

- ``drop_share[tau]``: the share of examples whose true-class probability at some exit is more than ``tau`` below
  its value at an earlier exit (``max_{i < j} p_i - p_j > tau``), for each ``tau`` of ``MARGINS``;
- ``right_to_wrong``: the share of examples whose argmax is right at some exit and wrong at a later one;
- ``mean_max_drop``: the mean over examples of the largest such drop (0 for a monotone example).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["MARGINS", "monotonicity"]

MARGINS = (0.01, 0.05, 0.1, 0.2, 0.5)


def monotonicity(
    outputs: Any, labels: Any, *, first_exit: int = 0, margins: Sequence[float] = MARGINS
) -> dict[str, Any]:
    """The conditional-monotonicity measures of ``(E, N, C)`` outputs (logits or log-probabilities) and ``(N,)``
    labels, counted over exits ``first_exit .. E - 1`` (see the module docstring)."""
    z = torch.as_tensor(outputs).double()
    y = torch.as_tensor(labels).long().cpu()
    if z.dim() != 3 or y.shape != z.shape[1:2]:
        raise ValueError(f"outputs must be (E, N, C) and labels (N,), got {tuple(z.shape)} and {tuple(y.shape)}")
    if not 0 <= first_exit < z.shape[0]:
        raise ValueError(f"first_exit must be in [0, {z.shape[0]}), got {first_exit}")
    z = z[first_exit:].cpu()
    probs = z.softmax(-1)
    p_true = probs.gather(2, y.expand(z.shape[0], -1)[..., None]).squeeze(2)  # (S, N)
    best_so_far = p_true.cummax(dim=0).values
    max_drop = (best_so_far - p_true).max(dim=0).values  # (N,): the largest drop from an earlier exit
    correct = probs.argmax(-1) == y  # (S, N)
    was_right = correct.int().cummax(dim=0).values.bool()  # right at this exit or an earlier one
    right_to_wrong = (was_right[:-1] & ~correct[1:]).any(dim=0)
    return {
        "first_exit": int(first_exit),
        "margins": [float(m) for m in margins],
        "drop_share": [float((max_drop > m).double().mean()) for m in margins],
        "right_to_wrong": float(right_to_wrong.double().mean()),
        "mean_max_drop": float(max_drop.mean()),
        "accuracy_per_exit": [float(a) for a in correct.double().mean(dim=1)],
    }
