"""Model construction and cascade semantics (the step loop is the reference; the engine is tested against it
in test_engine.py)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import cascadenet as cn
from conftest import perturb_norms, tiny_model


def test_registry_lists_and_rejects():
    # other test modules register models of their own; the built-in ones are these
    assert cn.list_models("resnet*") == ["resnet10", "resnet18", "resnet34", "resnet50"]
    assert cn.list_models() == sorted(cn.list_models())
    assert cn.list_models("resnet1*") == ["resnet10", "resnet18"]
    with pytest.raises(ValueError, match="resnet18"):
        cn.create_model("resnet19", num_classes=10)
    with pytest.raises(ValueError, match="duplicate|already"):
        cn.register_architecture("resnet18", cn.models.cascade.BasicBlock, (2, 2, 2, 2))
    with pytest.raises(ValueError, match="already"):
        cn.register_model("resnet18", cn.CascadeConfig, arch="resnet18")


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"scheme": "diagonal"}, "parallel, serial"),
        ({"delay": "gauss"}, "osd, ews"),
        ({"stem": "tiny"}, "cifar, cifar_pool, imagenet"),
        ({"delay": "osd", "alpha": 0.5}, "ews"),
        ({"delay": "ews", "alpha": 1.0}, r"\[0, 1\)"),
        ({"temporal_affine": True, "temporal_bn": False}, "temporal_bn"),
        ({"width": 0}, "width"),
        ({"num_steps": 0}, "num_steps"),
        ({"num_classes": -3}, "num_classes"),
    ],
)
def test_bad_options_name_the_choices(kw, words):
    with pytest.raises(ValueError, match=words):
        tiny_model(**kw)


@pytest.mark.parametrize(("name", "blocks"), [("resnet10", 4), ("resnet18", 8), ("resnet34", 16), ("resnet50", 16)])
def test_depth_and_settling_time(name, blocks):
    model = tiny_model(name)
    assert model.num_blocks == blocks
    assert model.num_steps == blocks + 2  # stem delayed: one step more than the published code
    assert tiny_model(name, stem_delay=False).num_steps == blocks + 1
    assert tiny_model(name, num_steps=30).num_steps == 30


def test_standard_resnet_shapes():
    model = cn.create_model("resnet18", num_classes=10)  # width 64 = the standard ResNet-18
    n_params = sum(p.numel() for p in model.parameters())
    # the standard CIFAR ResNet-18 (3x3 stem) has 11,173,962 parameters; ours adds only per-step BN statistics
    # (buffers, not parameters), so the count must match.
    assert n_params == 11_173_962
    bn = model.norms()[0]
    assert bn.eps == 1e-5 and bn.momentum == 0.1  # not the reference's eps=0.1, momentum=1.0
    assert bn.num_slots == model.num_steps
    bottleneck = cn.create_model("resnet50", num_classes=1000, stem="imagenet")
    assert sum(p.numel() for p in bottleneck.parameters()) == 25_557_032  # torchvision resnet50


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_last_step_is_feedforward_and_not_one_step_earlier(name):
    model = tiny_model(name, temporal_bn=False).eval()
    perturb_norms(model)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        traj = model(x, method="loop")
        ff = model.feedforward(x)
    assert torch.allclose(traj[-1], ff, atol=1e-5)
    # The published code stops at T - 1 steps: one short of the feed-forward network.
    assert (traj[-2] - ff).abs().max() > 1e-3


def test_settles_with_temporal_bn_when_stats_agree():
    model = tiny_model().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x)[-1], model.feedforward(x), atol=1e-5)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("scheme", ["parallel", "serial"])
def test_step_zero_ignores_input_when_stem_delayed(mode, scheme):
    model = getattr(tiny_model(), mode)()
    a, b = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16) * 3 + 1
    with torch.no_grad():
        ta, tb = model(a, scheme=scheme), model(b, scheme=scheme)
        la, lb = model(a, scheme=scheme, method="loop"), model(b, scheme=scheme, method="loop")
    assert torch.allclose(ta[0], tb[0], atol=1e-6) and torch.allclose(la[0], lb[0], atol=1e-6)
    assert not torch.allclose(ta[1], tb[1], atol=1e-3)
    undelayed = tiny_model(stem_delay=False).eval()  # one model on two inputs: step 0 now sees the input
    with torch.no_grad():
        assert not torch.allclose(undelayed(a)[0], undelayed(b)[0], atol=1e-3)


@pytest.mark.parametrize("name", ["resnet10", "resnet50"])
def test_serial_step_is_truncated_feedforward(name):
    model = tiny_model(name, temporal_bn=False).eval()
    perturb_norms(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        traj = model(x, scheme="serial")
        for t in range(1, model.num_steps):
            n_active = min(t - 1, model.num_blocks)  # stem delayed: block k is active from step k + 2
            assert torch.allclose(traj[t], model.feedforward(x, num_blocks=n_active), atol=1e-5), t
        # parallel differs from serial at intermediate steps but agrees once settled
        par = model(x)
    assert (par[3] - traj[3]).abs().max() > 1e-3
    assert torch.allclose(par[-1], traj[-1], atol=1e-5)


def test_streaming_steps_equal_trajectory_and_accept_changing_input():
    model = tiny_model().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        traj = model(x)
        state, outs = None, []
        for _ in range(model.num_steps):
            logits, state = model.step(x, state)
            outs.append(logits)
        assert torch.allclose(torch.stack(outs), traj, atol=1e-5)
        assert state.t == model.num_steps
        # A sequence input runs one frame per step. The stem is delayed, so frame t first shows at step t + 1:
        # changing the second-to-last frame changes only the last step, changing the last frame nothing.
        frames = torch.randn(model.num_steps, 2, 3, 16, 16)
        seq = model(frames)
        late, last = frames.clone(), frames.clone()
        late[-2] += 1
        last[-1] += 1
        seq_late, seq_last = model(late), model(last)
    assert seq.shape == traj.shape
    assert torch.allclose(seq[:-1], seq_late[:-1]) and not torch.allclose(seq[-1], seq_late[-1])
    assert torch.equal(seq, seq_last)


def test_steps_past_last_slot_reuse_last_statistics():
    model = tiny_model(num_steps=4).eval()
    perturb_norms(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        long = model(x, num_steps=7, method="loop")
        assert torch.allclose(model(x, num_steps=7), long, atol=1e-5)
        # copying the last slot into slots that do not exist changes nothing: extend the model and compare
        big = tiny_model(num_steps=7).eval()
        state = model.state_dict()
        for key, value in state.items():
            if key.endswith(("running_mean", "running_var")):
                state[key] = torch.cat([value, value[-1:].expand(3, -1)])
        big.load_state_dict(state)
        assert torch.allclose(big(x, method="loop"), long, atol=1e-5)


def test_temporal_bn_trains_each_step_on_its_own_batch():
    model = tiny_model().train()
    x = torch.randn(8, 3, 16, 16)
    model(x)
    stem_bn = model.stem.units[0].bn
    batch_mean = model.stem.units[0].conv(x).mean(dim=(0, 2, 3)).detach()
    # every step sees the same stem input: each slot got one update of momentum 0.1 from the same batch mean
    assert torch.allclose(stem_bn.running_mean, 0.1 * batch_mean.expand_as(stem_bn.running_mean), atol=1e-6)
    deep = model.blocks[-1].residual.units[0].bn
    # deep layers see different inputs at different steps, hence different statistics per slot
    assert not torch.allclose(deep.running_mean[2], deep.running_mean[-1])
    assert torch.equal(deep.running_mean[-1], deep.running_mean[-2])  # settled: identical updates


def test_multi_head_has_a_classifier_per_step():
    model = tiny_model(multi_head=True)
    assert len(model.heads) == model.num_steps
    assert len(tiny_model().heads) == 1


def test_input_checks():
    model = tiny_model()
    with pytest.raises(ValueError, match="3 input channels"):
        model(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match="parallel, serial"):
        model(torch.randn(2, 3, 16, 16), scheme="zigzag")
    with pytest.raises(ValueError, match="engine, loop"):
        model(torch.randn(2, 3, 16, 16), method="fast")


def test_feedforward_macs_match_torch_flop_counter():
    model = tiny_model("resnet18", width=8).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.feedforward(torch.randn(1, 3, 32, 32))
    assert model.feedforward_macs((3, 32, 32)) * 2 == counter.get_total_flops()


def test_exit_costs_count_each_distinct_state_once():
    model = tiny_model("resnet10", width=8).eval()
    size = (3, 32, 32)
    costs = model.exit_costs(size)
    serial = costs.macs
    assert isinstance(costs, cn.ExitCosts)
    assert len(serial) == model.num_steps and serial == sorted(serial)
    assert costs.latency == [t for t in range(model.num_steps)]  # one block of latency per step, step 0 constant
    undelayed = tiny_model("resnet10", width=8, stem_delay=False)
    assert undelayed.exit_costs(size).latency == [t + 1 for t in range(undelayed.num_steps)]  # the stem first

    def branch_macs(branch, hw_in):
        """MACs of one example through a branch's convolutions, counted by torch (not by our code)."""
        x = torch.zeros(1, branch.units[0].conv.in_channels, *hw_in)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            for unit in branch.units:
                x = unit.conv(x)
        x = branch.maxpool(x) if branch.pool else x
        return counter.get_total_flops() // 2, x.shape[-2:]

    # parallel OSD, stem delayed: block k (0-based) sees k + 1 input-dependent states (steps 1..k+1), each
    # through its residual and its shortcut; step-0 states are input-independent constants and not counted.
    stem, hw = branch_macs(model.stem, size[1:])
    expected = stem
    for k, block in enumerate(model.blocks):
        res, out_hw = branch_macs(block.residual, hw)
        proj = branch_macs(block.shortcut, hw)[0] if block.shortcut is not None else 0
        expected += (k + 1) * (res + proj)
        hw = out_hw
    expected += (model.num_blocks + 1) * model.features * model.num_classes
    assert serial[-1] == expected
    assert serial[0] == 0  # step 0 does not depend on the input
    serial_scheme = model.exit_costs(size, scheme="serial").macs
    feedforward = model.feedforward_macs(size)
    assert feedforward <= serial_scheme[-1] < 1.2 * feedforward


@pytest.mark.parametrize("stem", ["cifar", "cifar_pool", "imagenet"])
def test_branch_macs_match_torch_flop_counter(stem):
    """MACs are counted in one place, Branch.macs, from shapes alone; torch's counter must agree."""
    model = tiny_model("resnet50", width=4, stem=stem)
    hw = (29, 31)  # odd sizes exercise the rounding of strided convolutions and pooling
    for branch in [model.stem, *(b for blk in model.blocks for b in (blk.residual, blk.shortcut) if b is not None)]:
        x = torch.zeros(1, branch.units[0].conv.in_channels, *hw)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            y = branch(x, 0)
        macs, out_hw = branch.macs(hw)
        assert macs * 2 == counter.get_total_flops() and tuple(y.shape[-2:]) == out_hw


def test_cascade_exit_costs_match_the_hand_count_in_docs_baselines():
    # docs/baselines.md writes these out computation by computation (stem delayed, 6 steps, 1x28x28)
    parallel = cn.create_model("resnet10", width=4, stem="cifar", in_channels=1)
    serial = cn.create_model("resnet10", width=4, stem="cifar", in_channels=1, scheme="serial")
    assert parallel.exit_costs((1, 28, 28)).macs == [0, 49_280, 856_000, 1_430_656, 1_829_696, 2_051_200]
    assert serial.exit_costs((1, 28, 28)).macs == [0, 49_280, 296_128, 480_256, 658_112, 879_616]
    assert parallel.exit_costs((1, 28, 28)).latency == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert parallel.feedforward_macs((1, 28, 28)) == 834_944
