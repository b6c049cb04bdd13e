"""TD(lambda) against a direct implementation of its definition, and the standard losses."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cascadenet.training.losses import final_ce, stepwise_ce, td_loss, td_targets


def direct_td(logits, targets, lam, first_step=1, smoothing=0.0):
    """The formula written out with loops over time, examples and classes (slow, obviously right)."""
    T, B, C = logits.shape
    total = 0.0
    for b in range(B):
        q = [None] * T
        y = [smoothing / C + (1 - smoothing) * (c == targets[b]) for c in range(C)]
        q[T - 1] = y
        for t in range(T - 2, -1, -1):
            p_next = torch.softmax(logits[t + 1, b].detach(), 0)
            q[t] = [(1 - lam) * p_next[c] + lam * q[t + 1][c] for c in range(C)]
        for t in range(first_step, T):
            logp = torch.log_softmax(logits[t, b], 0)
            total = total - sum(q[t][c] * logp[c] for c in range(C)) / B
    return total


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 0.83])
@pytest.mark.parametrize("first_step", [0, 1])
def test_td_loss_matches_definition_and_gradient(lam, first_step):
    logits = torch.randn(5, 4, 3, requires_grad=True)
    targets = torch.tensor([0, 2, 1, 2])
    fast = td_loss(logits, targets, lam, first_step=first_step)
    slow = direct_td(logits, targets, lam, first_step)
    assert torch.allclose(fast, slow, atol=1e-5)
    (g_fast,) = torch.autograd.grad(fast, logits)
    (g_slow,) = torch.autograd.grad(slow, logits)
    assert torch.allclose(g_fast, g_slow, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(1, 6),
    B=st.integers(1, 5),
    C=st.integers(2, 6),
    lam=st.floats(0, 1),
    smooth=st.floats(0, 0.5),
    seed=st.integers(0, 1000),
)
def test_td_loss_property(T, B, C, lam, smooth, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, B, C, generator=g) * 3
    targets = torch.randint(0, C, (B,), generator=g)
    first = min(1, T - 1)
    fast = td_loss(logits, targets, lam, first_step=first, label_smoothing=smooth)
    assert torch.allclose(fast, direct_td(logits, targets, lam, first, smooth), atol=1e-4)


def test_lambda_one_is_cross_entropy_at_every_step():
    logits, targets = torch.randn(6, 8, 5), torch.randint(0, 5, (8,))
    per_step = sum(F.cross_entropy(logits[t], targets) for t in range(1, 6))
    assert torch.allclose(td_loss(logits, targets, 1.0, first_step=1), per_step, atol=1e-5)
    assert torch.allclose(stepwise_ce(logits, targets, first_step=1), per_step, atol=1e-5)


def test_lambda_zero_bootstraps_from_the_next_step():
    logits, targets = torch.randn(4, 3, 5), torch.randint(0, 5, (3,))
    q = td_targets(logits, targets, 0.0)
    assert torch.allclose(q[:-1], logits[1:].softmax(-1))
    assert torch.equal(q[-1], F.one_hot(targets, 5).float())
    # no gradient reaches step t + 1 through step t's target
    z = logits.clone().requires_grad_(True)
    loss_first_step_only = -(td_targets(z, targets, 0.0)[0] * z[0].log_softmax(-1)).sum(-1).mean()
    (grad,) = torch.autograd.grad(loss_first_step_only, z)
    assert grad[1:].abs().max() == 0


def test_bad_inputs():
    logits, targets = torch.randn(3, 2, 4), torch.tensor([1, 3])
    for lam in (-0.1, 1.5):
        with pytest.raises(ValueError, match="lambda"):
            td_loss(logits, targets, lam, first_step=1)
    with pytest.raises(ValueError, match=r"\(T, B, C\)"):
        td_loss(logits[0], targets, 0.5, first_step=1)
    with pytest.raises(ValueError, match="first_step"):
        td_loss(logits, targets, 0.5, first_step=3)
    with pytest.raises(ValueError, match="label_smoothing"):
        final_ce(logits[0], targets, label_smoothing=1.0)


def test_final_ce_is_cross_entropy_with_smoothing():
    logits, targets = torch.randn(8, 5), torch.randint(0, 5, (8,))
    assert torch.allclose(
        final_ce(logits, targets, label_smoothing=0.1), F.cross_entropy(logits, targets, label_smoothing=0.1)
    )


def test_losses_keep_float64_and_upcast_bf16():
    """A float64 model trains in float64 throughout (the distributed equivalence test relies on it); bf16 logits
    (autocast) are computed in float32."""
    logits, targets = torch.randn(4, 3, 5, dtype=torch.float64), torch.tensor([0, 2, 4])
    losses = (td_loss(logits, targets, 0.5, first_step=1), stepwise_ce(logits, targets, first_step=1))
    for loss in (*losses, final_ce(logits[-1], targets)):
        assert loss.dtype == torch.float64
    assert td_loss(logits.bfloat16(), targets, 0.5, first_step=1).dtype == torch.float32


def test_first_step_is_required_and_the_loss_is_summed_over_steps_averaged_over_the_batch():
    logits, targets = torch.randn(4, 6, 3), torch.randint(0, 3, (6,))
    with pytest.raises(TypeError, match="first_step"):
        td_loss(logits, targets, 0.5)  # no default: a cascade without the stem delay needs 0, the default one 1
    with pytest.raises(TypeError, match="first_step"):
        stepwise_ce(logits, targets)
    per = torch.stack([F.cross_entropy(logits[t], targets) for t in range(4)])  # each a batch mean
    assert torch.allclose(stepwise_ce(logits, targets, first_step=0), per.sum(), atol=1e-5)
    assert torch.allclose(stepwise_ce(logits, targets, first_step=1), per[1:].sum(), atol=1e-5)
