"""predict: batched early exit gives each example the prediction of the step its policy chose, as a replay of the
full trajectory with the offline policy does; the CLI writes it per example."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cascadenet as cn
from cascadenet.cli import main
from cascadenet.evaluation.early_exit import predict, predict_run
from cascadenet.evaluation.logits import dataset_logits
from cascadenet.evaluation.policies import Confidence, Margin, StableArgmax
from cascadenet.runs.load import load_run
from conftest import perturb_norms, tiny_model

FIXTURE = Path(__file__).parent / "fixtures" / "run-format1"


def reference(model, x, policy, budget=None, probs=None, **options):
    """Per example, from the whole trajectory: the offline policy's step, its argmax and its cost."""
    if probs is None:
        with torch.no_grad():
            probs = model(x, **options).softmax(-1)
    macs = model.exit_costs(tuple(x.shape[1:]), **options).macs
    last = len(macs) - 1 if budget is None else max(t for t, m in enumerate(macs) if m <= budget)
    first = model.first_informative_exit
    n = x.shape[0]
    steps = torch.full((n,), last) if policy is None else policy.stopping_steps(probs[: last + 1], first)
    preds = probs[steps, torch.arange(x.shape[0])].argmax(-1)
    return steps, preds, torch.tensor(macs)[steps]


@pytest.fixture(scope="module")
def cascade():
    torch.manual_seed(0)
    model = tiny_model("resnet10", num_classes=6, num_steps=8).double().eval()  # 2 steps past settling
    perturb_norms(model, seed=3)
    with torch.no_grad():  # larger head weights: confident enough outputs for the policies to differ by example
        for head in model.heads:
            head.weight.mul_(40)
    x = torch.randn(24, 3, 16, 16, dtype=torch.float64)
    return model, x


def quantile_policies(model, x):
    """Thresholds at the median of the trajectory's own confidences and margins (halfway between two values, not
    on one), so that examples stop at different steps."""
    with torch.no_grad():
        probs = model(x).softmax(-1)[model.first_informative_exit :]
    top = probs.topk(2, dim=-1).values

    def median(v):
        v = v.flatten().sort().values
        return (v[len(v) // 2 - 1] + v[len(v) // 2]).item() / 2

    q, m = median(top[..., 0]), median(top[..., 0] - top[..., 1])
    return [Confidence(q), Margin(m), StableArgmax(1), StableArgmax(2), None]


@pytest.mark.parametrize("scheme", ["parallel", "serial"])
def test_early_exit_matches_the_replayed_trajectory(cascade, scheme):
    model, x = cascade
    macs = model.exit_costs((3, 16, 16), scheme=scheme).macs
    with torch.no_grad():
        probs = model(x, scheme=scheme).softmax(-1)
    for policy in quantile_policies(model, x):
        for budget in (None, (macs[3] + macs[4]) / 2):
            got = predict(model, x, policy, budget=budget, scheme=scheme)
            steps, preds, cost = reference(model, x, policy, budget, probs, scheme=scheme)
            assert got.early_exit
            assert got.steps.tolist() == steps.tolist(), (policy, budget)
            assert got.predictions.tolist() == preds.tolist(), (policy, budget)
            assert got.macs.tolist() == cost.tolist()
            # each example paid for its own steps only: what the run spent is the sum of the examples' costs
            assert got.macs_spent == int(cost.sum())
            if isinstance(policy, Confidence | Margin) and budget is None:
                assert len(set(steps.tolist())) >= 3, policy  # the examples did leave at different steps


def test_without_stem_delay_and_multi_head():
    model = tiny_model("resnet10", num_classes=6, stem_delay=False, multi_head=True).double().eval()
    perturb_norms(model, seed=5)
    x = torch.randn(12, 3, 16, 16, dtype=torch.float64)
    for policy in quantile_policies(model, x):
        got = predict(model, x, policy)
        steps, preds, _ = reference(model, x, policy)
        assert got.steps.tolist() == steps.tolist() and got.predictions.tolist() == preds.tolist()


class ThreeExits(nn.Module):
    """A model of another family: only model(x) -> (E, B, C), exit_costs and first_informative_exit."""

    first_informative_exit = 0

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(48 if i == 0 else 16, 16) for i in range(3)])
        self.exits = nn.ModuleList([nn.Linear(16, 4) for _ in range(3)])

    def forward(self, x):
        h, out = F.adaptive_avg_pool2d(x, 4).flatten(1), []
        for layer, head in zip(self.layers, self.exits):
            h = torch.relu(layer(h))
            out.append(head(h) * 5)
        return torch.stack(out)

    def exit_costs(self, input_size):
        return cn.ExitCosts([100, 200, 300], [1.0, 2.0, 3.0])


def test_models_without_anytime_compute_every_exit_and_pick():
    model = ThreeExits().double().train()
    x = torch.randn(20, 3, 8, 8, dtype=torch.float64)
    for policy in [Confidence(0.6), Margin(0.3), StableArgmax(1), None]:
        got = predict(model, x, policy, budget=250)
        steps, preds, cost = reference(model.eval(), x, policy, budget=250)
        model.train()
        assert not got.early_exit and got.macs_spent == 20 * 300
        assert got.steps.tolist() == steps.tolist() and got.predictions.tolist() == preds.tolist()
        assert got.macs.tolist() == cost.tolist() and max(got.steps.tolist()) <= 1
    assert model.training  # predict restores the mode


def test_bad_budget_and_policy(cascade):
    model, x = cascade
    with pytest.raises(ValueError, match="below the cost of the first informative step"):
        predict(model, x, Confidence(0.5), budget=1)
    with pytest.raises(ValueError, match="policy"):
        predict(model, x, 0.5)


def test_cli_predict_writes_each_example_and_never_overwrites(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    out = tmp_path / "p.npz"
    assert main(["predict", str(run), "--stable", "1", "-o", str(out)]) == 0
    screen = capsys.readouterr().out
    assert "accuracy" in screen and "mean step" in screen and "wall time" in screen and "early exit" in screen
    saved = np.load(out)
    loaded = load_run(run, device="cpu")
    logits = dataset_logits(loaded.model, loaded.data, loaded.mean, loaded.std)
    steps = StableArgmax(1).stopping_steps(logits.softmax(-1), loaded.model.first_informative_exit)
    n = len(steps)
    assert saved["steps"].tolist() == steps.tolist()
    assert saved["predictions"].tolist() == logits[steps, torch.arange(n)].argmax(-1).tolist()
    macs = loaded.model.exit_costs(tuple(loaded.data.images.shape[1:])).macs
    assert saved["macs"].tolist() == [macs[s] for s in steps.tolist()]
    assert saved["labels"].tolist() == loaded.data.labels.tolist()
    # an existing output file is kept unless --overwrite
    before = out.read_bytes()
    assert main(["predict", str(run), "--threshold", "0.5", "-o", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["predict", str(run), "--threshold", "0.5", "-o", str(out), "--overwrite"]) == 0
    assert out.read_bytes() != before


def test_cli_predict_refuses_bad_options(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    for argv, message in [
        (["--threshold", "0.5", "--margin", "0.1"], "at most one stopping policy"),
        (["--threshold", "1.5"], "--threshold"),
        (["--stable", "0"], "--stable"),
        (["--budget", "1"], "below the cost of the first informative step"),
        (["-o", str(tmp_path / "p.txt")], ".npz"),
    ]:
        assert main(["predict", str(run), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    summary = predict_run(run, device="cpu", budget=10**12)
    assert summary["mean_step"] == len(load_run(run, device="cpu").model.exit_costs((3, 16, 16)).macs) - 1
