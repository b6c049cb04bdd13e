"""model.anytime: the engine's trajectory one step at a time, each step computing only what it first needs, with
examples leaving between steps. Its logits must be model(x)'s, and what it spends must be exit_costs' count."""

import pytest
import torch
from torch import nn

from conftest import perturb_norms, tiny_model

CONFIGS = {
    "parallel": dict(name="resnet18"),
    "serial": dict(name="resnet18", scheme="serial"),
    "no_stem_delay": dict(name="resnet18", stem_delay=False),
    "serial_no_stem_delay": dict(name="resnet10", scheme="serial", stem_delay=False),
    "multi_head": dict(name="resnet10", multi_head=True),
    "serial_multi_head_no_delay": dict(name="resnet10", scheme="serial", multi_head=True, stem_delay=False),
    "shared_bn": dict(name="resnet18", temporal_bn=False),  # settled blocks share their states
    "ews": dict(name="resnet10", delay="ews", alpha=0.6),
    "ews_alpha0_serial": dict(name="resnet10", delay="ews", alpha=0.0, scheme="serial"),
    "temporal_affine": dict(name="resnet10", temporal_affine=True),
    "bottleneck_imagenet_stem": dict(name="resnet50", stem="imagenet"),
    "long": dict(name="resnet10", stem="cifar_pool", num_steps=9),  # steps past the last slot settle
}


def build(cfg):
    cfg = dict(cfg)
    model = tiny_model(cfg.pop("name"), num_classes=6, **cfg).double().eval()
    perturb_norms(model, seed=3)
    return model


class MacCounter:
    """Multiply-accumulates that convolutions and linear layers really run on batches of ``batch`` rows (states
    that do not depend on the input are computed on one row and not counted, as exit_costs does not count them)."""

    def __init__(self, model, batch):
        self.batch, self.total, self.handles = batch, 0, []
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                self.handles.append(m.register_forward_hook(self.hook))

    def hook(self, m, inputs, out):
        if out.shape[0] != self.batch:
            assert out.shape[0] == 1, out.shape  # a constant state, once for the batch
            return
        if isinstance(m, nn.Linear):
            per_row = m.in_features * m.out_features
        else:
            per_row = out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        self.total += per_row * out.shape[0]

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("cfg", list(CONFIGS.values()), ids=list(CONFIGS))
def test_steps_equal_the_trajectory_and_cost_what_exit_costs_counts(cfg):
    model = build(cfg)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    macs = model.exit_costs((3, 16, 16)).macs
    counter = MacCounter(model, 3)
    run = model.anytime(x)
    steps = []
    for s in run:
        assert s.step == len(steps) and s.logits.shape == (3, 6)
        assert (s.logits - expected[s.step]).abs().max().item() <= 1e-8, s.step
        assert s.macs == macs[s.step]
        spent_before = macs[s.step - 1] if s.step else 0
        assert counter.total == 3 * s.macs, (s.step, counter.total / 3, spent_before, s.macs)
        steps.append(s.step)
    counter.close()
    assert steps == list(range(len(expected)))
    assert run.macs_spent == 3 * macs[-1]
    assert [sum(run.step_macs()[: t + 1]) for t in range(len(macs))] == macs


def test_both_schemes_and_lengths_from_one_model():
    model = build(CONFIGS["parallel"])
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for scheme, steps in [("serial", None), ("parallel", 13), ("serial", 4)]:
        with torch.no_grad():
            expected = model(x, scheme=scheme, num_steps=steps)
        macs = model.exit_costs((3, 16, 16), scheme=scheme, num_steps=steps).macs
        got = list(model.anytime(x, scheme=scheme, num_steps=steps))
        assert len(got) == len(expected)
        for s in got:
            assert (s.logits - expected[s.step]).abs().max().item() <= 1e-8
            assert s.macs == macs[s.step]


def test_settled_steps_compute_nothing_new():
    # With one set of statistics per layer a block settles one step after its input; past the settling time the
    # logits are the previous step's and the step costs nothing.
    model = build(dict(name="resnet10", temporal_bn=False, num_steps=9))
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    run = model.anytime(x)
    increments = run.step_macs()
    settle = model.settle_steps  # 6 for resnet10 with the stem delayed
    assert increments[0] == 0  # step 0 cannot see the input: a constant
    assert all(m > 0 for m in increments[1:settle])
    assert increments[settle:] == [0] * (9 - settle)
    logits = [s.logits for s in run]
    assert all(logits[t] is logits[settle - 1] for t in range(settle, 9))


def test_examples_leave_the_batch_and_later_steps_compute_only_the_rest():
    model = build(CONFIGS["parallel"])
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    macs = model.exit_costs((3, 16, 16)).macs
    run = model.anytime(x)
    counter = MacCounter(model, 6)
    spent, rows = 0, 6
    drops = {2: torch.tensor([True, False, True, True, False, True]), 4: torch.tensor([3, 0, 2]), 6: [1]}
    for s in run:
        assert torch.equal(s.indices, run.indices)
        assert (s.logits - expected[s.step][s.indices]).abs().max().item() <= 1e-8
        spent += rows * (macs[s.step] - (macs[s.step - 1] if s.step else 0))
        assert counter.total == spent == run.macs_spent
        if s.step in drops:
            run.keep(drops[s.step])
            rows = len(run.indices)
            counter.batch = rows
    assert run.indices.tolist() == [0]  # rows 0, 2, 3, 5; then rows 5, 0, 3; then row 0
    counter.close()


def test_keep_composes_and_an_empty_run_stops():
    model = build(CONFIGS["multi_head"])
    x = torch.randn(5, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    run = model.anytime(x)
    next(run)
    run.keep([4, 1, 3])
    run.keep(torch.tensor([False, True, True]))  # two calls between steps compose
    assert run.indices.tolist() == [1, 3]
    s = next(run)
    assert (s.logits - expected[1][[1, 3]]).abs().max().item() <= 1e-8
    run.keep([])
    with pytest.raises(StopIteration):
        next(run)


def test_stopping_early_spends_only_the_steps_taken():
    model = build(CONFIGS["parallel"])
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    macs = model.exit_costs((3, 16, 16)).macs
    counter = MacCounter(model, 2)
    run = model.anytime(x)
    for s in run:
        if s.step == 3:
            break
    counter.close()
    assert counter.total == 2 * macs[3] == run.macs_spent
    assert macs[3] < macs[-1] / 2


def test_refuses_training_mode_and_bad_arguments():
    model = tiny_model("resnet10")
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="evaluation mode"):
        model.train().anytime(x)
    model.eval()
    with pytest.raises(ValueError, match="shape"):
        model.anytime(x[0])
    with pytest.raises(ValueError, match="scheme"):
        model.anytime(x, scheme="diagonal")
    run = model.anytime(x)
    next(run)
    for bad, match in [
        (torch.tensor([True]), "one entry per remaining example"),
        ([0, 2], r"\[0, 2\)"),
        ([1, 1], "distinct"),
        (torch.tensor([0.5]), "boolean mask or integer positions"),
    ]:
        with pytest.raises(ValueError, match=match):
            run.keep(bad)
    assert run.indices.tolist() == [0, 1]  # a refused keep changes nothing


def test_float32_and_states_are_freed():
    model = tiny_model("resnet18").eval()
    perturb_norms(model)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    run = model.anytime(x)
    held = []
    for s in run:
        assert (s.logits - expected[s.step]).abs().max().item() <= 1e-5
        held.append(len(run._values))
    # a few states per block, not the whole trajectory (the engine holds ~ T per block)
    assert max(held) <= 4 * model.num_blocks + 4, held
    assert held[-1] == 0


def test_a_plan_is_reused_only_while_the_statistics_it_shares_are_identical():
    model = build(dict(name="resnet10"))
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    before = [s.macs for s in model.anytime(x)]
    with torch.no_grad():  # every slot of every layer identical: settled states are now shared
        for bn in model.norms():
            bn.running_mean.copy_(bn.running_mean[:1].expand_as(bn.running_mean))
            bn.running_var.copy_(bn.running_var[:1].expand_as(bn.running_var))
        expected = model(x)
    after = list(model.anytime(x))
    assert [s.macs for s in after] == model.exit_costs((3, 16, 16)).macs != before
    assert all((s.logits - expected[s.step]).abs().max().item() <= 1e-8 for s in after)
