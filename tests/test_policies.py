"""Stopping policies on hand-made traces whose stopping steps are known, offline and online alike."""

import numpy as np
import pytest
import torch

from cascadenet.evaluation import metrics
from cascadenet.evaluation.policies import Confidence, Margin, StableArgmax, budget_steps


def trace(*examples):
    """(T, N, C) from per-example lists of per-step probability rows."""
    return torch.tensor(examples, dtype=torch.float64).transpose(0, 1)


# Five steps, four examples, three classes. Per step: max probability / argmax / top1 - top2.
PROBS = trace(
    # a: .8/1/.7  .5/0/.2  .9/0/.85  .95/0/.92  .97/0/.95
    [[0.1, 0.8, 0.1], [0.5, 0.3, 0.2], [0.9, 0.05, 0.05], [0.95, 0.03, 0.02], [0.97, 0.02, 0.01]],
    # b: .4/2/.1  .4/1/.1  .45/2/.1  .5/2/.2  .7/2/.5
    [[0.3, 0.3, 0.4], [0.3, 0.4, 0.3], [0.2, 0.35, 0.45], [0.2, 0.3, 0.5], [0.1, 0.2, 0.7]],
    # c: certain at step 0 only (an uninformative first step can be), then .6/1/.4  .6/1/.4  .6/1/.3  .7/1/.5
    [[0.0, 0.0, 1.0], [0.2, 0.6, 0.2], [0.2, 0.6, 0.2], [0.1, 0.6, 0.3], [0.1, 0.7, 0.2]],
    # d: argmax 0 at every step: .6/0/.4  .5/0/.2  .4/0/.05  .5/0/.2  .6/0/.3
    [[0.6, 0.2, 0.2], [0.5, 0.3, 0.2], [0.4, 0.35, 0.25], [0.5, 0.3, 0.2], [0.6, 0.3, 0.1]],
)

CASES = [
    (Confidence(0.9), 0, [2, 4, 0, 4]),
    (Confidence(0.9), 1, [2, 4, 4, 4]),  # c's certainty at step 0 does not count
    (Confidence(0.55), 1, [2, 4, 1, 4]),
    (Confidence(0.0), 1, [1, 1, 1, 1]),
    (Confidence(1.0), 0, [4, 4, 0, 4]),
    (Margin(0.45), 1, [2, 4, 4, 4]),
    (Margin(0.35), 1, [2, 4, 1, 4]),
    (Margin(0.15), 0, [0, 3, 0, 0]),
    (StableArgmax(1), 1, [2, 3, 2, 2]),
    (StableArgmax(1), 0, [2, 3, 2, 1]),  # d agrees with step 0 at step 1; from first_step 1 only at step 2
    (StableArgmax(2), 1, [3, 4, 3, 3]),
    (StableArgmax(3), 1, [4, 4, 4, 4]),
]


@pytest.mark.parametrize("policy, first_step, expected", CASES, ids=[f"{p}-{f}" for p, f, _ in CASES])
def test_known_stopping_steps_offline_and_online(policy, first_step, expected):
    assert policy.stopping_steps(PROBS, first_step).tolist() == expected
    assert policy.stopping_steps(PROBS.numpy(), first_step).tolist() == expected  # numpy in, same answer
    # online: the first step at which stop() says yes, fed the trace so far (a tensor, or a list of steps)
    T = PROBS.shape[0]
    first_yes = [T - 1] * PROBS.shape[1]
    for t in range(T):
        now = policy.stop(PROBS[: t + 1], first_step)
        assert now.tolist() == policy.stop(list(PROBS[: t + 1]), first_step).tolist()
        if t < first_step:
            assert not now.any()
        for i in range(len(first_yes)):
            if now[i] and first_yes[i] == T - 1:
                first_yes[i] = t
    assert first_yes == expected


def test_online_on_the_running_examples_only():
    # the examples still running are a subset: the rule reads each one's own trace
    policy = StableArgmax(2)
    assert policy.stop(PROBS[:4, [2, 0]], 1).tolist() == [True, True]
    assert policy.stop(PROBS[:4, [1]], 1).tolist() == [False]


def test_confidence_matches_the_threshold_curve_of_metrics():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 200, 5, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 5, (200,), generator=g)
    qs = [0.3, 0.5, 0.7, 0.9, 0.99]
    curve = metrics.threshold_curve(logits.numpy(), labels.numpy(), qs, first_step=1)
    probs = logits.softmax(-1)
    for q, mean_step, acc in zip(qs, curve["mean_step"], curve["accuracy"]):
        steps = Confidence(q).stopping_steps(probs, first_step=1)
        assert steps.double().mean().item() == pytest.approx(mean_step)
        pred = logits.argmax(-1)[steps, torch.arange(200)]
        assert (pred == labels).double().mean().item() == pytest.approx(acc)


def test_budget_steps():
    macs = [0, 10, 20, 30]
    assert budget_steps(macs, 25, 1) == 2
    assert budget_steps(macs, 10, 1) == 1
    assert budget_steps(macs, 1e9, 1) == 3
    assert budget_steps(macs, 0, 0) == 0
    with pytest.raises(ValueError, match="below the cost of the first informative step"):
        budget_steps(macs, 5, 1)
    with pytest.raises(ValueError, match="budget"):
        budget_steps(macs, -1, 0)


def test_bad_options_and_traces():
    with pytest.raises(ValueError, match="threshold"):
        Confidence(1.5)
    with pytest.raises(ValueError, match="margin"):
        Margin(-0.1)
    with pytest.raises(ValueError, match="steps"):
        StableArgmax(0)
    with pytest.raises(ValueError, match="shape"):
        Confidence(0.5).stopping_steps(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="first_step"):
        Confidence(0.5).stopping_steps(PROBS, 5)
    with pytest.raises(ValueError, match="empty"):
        Confidence(0.5).stop([])
