"""MSDNet (cascadenet.models.msdnet): shapes, layout and per-exit costs against the reference network's, the analytic
count against torch's flop counter and a hand count, validation, saving, and a train -> evaluate round trip."""

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import cascadenet as cn
from cascadenet.evaluation.evaluate import evaluate
from cascadenet.models.msdnet import LayerSpec, MSDNet, MSDNetConfig
from cascadenet.models.registry import config_from_dict
from cascadenet.training.loop import TrainConfig, train

# small networks where cost is not the point: few layers, few channels
TINY = dict(num_blocks=3, base=1, step=1, channels=4, growth_rate=2, width=0.125)
TINY_VARIANTS = [
    TINY,
    {**TINY, "step_mode": "lin_grow"},
    {**TINY, "prune": "min", "num_blocks": 4},
    {**TINY, "bottleneck": False, "reduction": 0.0},
    {**TINY, "num_scales": 2, "gr_factor": (1, 2), "bn_factor": (1, 2)},
    {**TINY, "num_scales": 4, "gr_factor": (1, 2, 4, 8), "bn_factor": (1, 2, 4, 4), "num_blocks": 2, "base": 3},
    {**TINY, "channels": 6, "growth_rate": 3, "width": 1.0, "gr_factor": (1, 1, 3)},  # odd new-channel counts: 3, 3, 9
]

# The tiny network written out in docs/baselines.md, layer by layer.
HAND = dict(num_blocks=2, base=1, step=1, num_scales=2, gr_factor=(1, 2), bn_factor=(1, 2), channels=16,
            growth_rate=16, width=0.125, in_channels=1, num_classes=3)  # fmt: skip


@pytest.mark.parametrize("options", TINY_VARIANTS)
@pytest.mark.parametrize("in_channels, size", [(1, 28), (3, 32), (3, 8)])
def test_every_exit_has_logits(options, in_channels, size):
    model = MSDNetConfig(**options, in_channels=in_channels, num_classes=5).build()
    x = torch.randn(2, in_channels, size, size)
    out = model(x)
    assert out.shape == (model.config.num_blocks, 2, 5) and model.num_exits == model.config.num_blocks
    assert torch.isfinite(out).all()
    costs = model.exit_costs((in_channels, size, size))
    assert len(costs.macs) == len(costs.latency) == model.config.num_blocks
    assert all(a < b for a, b in zip(costs.macs, costs.macs[1:]))
    assert isinstance(model, cn.AnytimeModel) and model.first_informative_exit == 0


def test_exit_k_sees_only_blocks_up_to_k():
    model = MSDNetConfig(**TINY).build().eval()
    x = torch.randn(2, 3, 16, 16)
    before = model(x)
    with torch.no_grad():
        for p in model.blocks[2].parameters():
            p.add_(1.0)
    after = model(x)
    assert torch.equal(before[:2], after[:2]) and not torch.allclose(before[2], after[2])


def test_the_input_is_checked():
    model = MSDNetConfig(**TINY).build()
    with pytest.raises(ValueError, match="3 input channels, the input has 1"):
        model(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"shape \(B, C, H, W\)"):
        model(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match="input_size has 1"):
        model.exit_costs((1, 16, 16))


def printed(macs):
    """Millions to one decimal, as the reference's op counter prints them."""
    return [float(f"{m / 1e6:.1f}") for m in macs]


# Cumulative MACs per exit of the reference's networks on 32x32 (docs/baselines.md). The PyTorch README trains both
# of its networks on CIFAR-100 and the Lua README its networks on CIFAR-10, and each row is reproduced to the
# printed digit only with that number of classes (100 classes add 128*90 MACs per classifier), which the
# classifiers' linear layers being counted makes a check of its own.
REFERENCE = [
    ("pytorch anytime", dict(num_blocks=7, step_mode="even", step=2, base=4), 100,
     [15.0, 25.3, 36.8, 46.0, 56.9, 66.5, 75.5]),
    ("pytorch budgeted", dict(num_blocks=5, step_mode="lin_grow", step=1, base=1), 100,
     [6.8, 14.2, 27.3, 41.4, 58.1]),
    ("lua anytime", dict(num_blocks=10, step_mode="even", step=2, base=4), 10,
     [15.0, 25.2, 37.4, 51.6, 61.7, 73.5, 87.1, 99.4, 109.4, 121.0]),
    ("lua budgeted", dict(num_blocks=7, step_mode="lin_grow", step=1, base=1), 10,
     [6.8, 14.2, 27.0, 48.0, 75.8, 108.1, 136.5]),
]  # fmt: skip


@pytest.mark.parametrize("name, options, classes, expected", REFERENCE, ids=[r[0] for r in REFERENCE])
def test_macs_per_exit_match_the_reference(name, options, classes, expected):
    model = MSDNetConfig(**options, channels=16, growth_rate=6, num_classes=classes).build()
    assert printed(model.exit_costs((3, 32, 32)).macs) == expected


def test_the_preset_is_the_pytorch_readme_anytime_network():
    model = cn.create_model("msdnet-cifar", num_classes=100)
    assert model.config == MSDNetConfig(num_classes=100)  # the defaults are the preset
    assert model.config.block_layers == (4, 2, 2, 2, 2, 2, 2)
    costs = model.exit_costs((3, 32, 32))
    assert printed(costs.macs) == REFERENCE[0][3]
    # stem 1 + the layers so far + the exit's classifier 1
    assert costs.latency == [6.0, 8.0, 10.0, 12.0, 14.0, 16.0, 18.0]
    # the 10-class network: each classifier's linear layer is 128*90 MACs cheaper
    ten = cn.create_model("msdnet-cifar").exit_costs((3, 32, 32)).macs
    assert [a - b for a, b in zip(costs.macs, ten)] == [128 * 90 * (k + 1) for k in range(7)]


def test_layout_matches_the_reference_printout():
    # kalviny/MSDNet-PyTorch#12 prints the budgeted network's first layers: input channels 16, 22, ..., 46 on all
    # three scales, then the finest scale dropped after the sixth layer with a transition (52 -> 26 channels)
    config = MSDNetConfig(num_blocks=5, step_mode="lin_grow", step=1, base=1)
    layers = [spec for block in config.layout() for spec in block]
    assert config.block_layers == (1, 2, 3, 4, 5) and len(layers) == 15
    assert [s.base_in for s in layers[:6]] == [16, 22, 28, 34, 40, 46]
    assert [(s.in_scales, s.out_scales) for s in layers[:6]] == [(3, 3)] * 5 + [(3, 2)]
    assert [s.transition for s in layers[:6]] == [None] * 5 + [26]
    # prune max: intervals of ceil(15 / 3) = 5 layers; the second drop comes after layer 11
    assert [i + 1 for i, s in enumerate(layers) if s.transition is not None] == [6, 11]
    assert layers[-1] == LayerSpec(in_scales=1, out_scales=1, base_in=layers[-2].base_in + 6, transition=None)
    # prune min keeps every scale until the last layers and shrinks at 1/3 and 2/3 of the depth
    mins = [
        s for b in MSDNetConfig(num_blocks=5, step_mode="lin_grow", step=1, base=1, prune="min").layout() for s in b
    ]
    assert [(s.in_scales, s.out_scales) for s in mins[-3:]] == [(3, 3), (3, 2), (2, 1)]
    assert [i + 1 for i, s in enumerate(mins) if s.transition is not None] == [5, 10]


@pytest.mark.parametrize("options", TINY_VARIANTS)
@pytest.mark.parametrize("size", [28, 32])
def test_analytic_count_equals_torch_flop_counter(options, size):
    model = MSDNetConfig(**options, in_channels=1, num_classes=7).build().eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 1, size, size))
    counts = counter.get_flop_counts()["Global"]
    # only convolutions and matrix products carry flops here (2 per multiply-accumulate)
    assert set(map(str, counts)) <= {"aten.convolution", "aten.addmm"}
    assert counter.get_total_flops() == 2 * model.exit_costs((1, size, size)).macs[-1]


def test_hand_count_of_a_tiny_network():
    # Written out in docs/baselines.md. Input 1x8x8; scales 8x8 and 4x4; stem 2 and 4 channels, growth 2 (4 at the
    # coarse scale, half from each side), classifiers of 16 channels, 3 classes.
    model = MSDNetConfig(**HAND).build()
    stem = 9 * 1 * 2 * 64 + 9 * 2 * 4 * 16  # 3x3 1->2 at 8x8; 3x3/2 2->4 to 4x4
    layer1 = (
        2 * 2 * 64
        + 9 * 2 * 2 * 64  # scale 0: 1x1 2->2, 3x3 2->2 at 8x8
        + 2 * 2 * 64
        + 9 * 2 * 2 * 16  # scale 1 from scale 0: 1x1 2->2 at 8x8, 3x3/2 2->2 to 4x4
        + 4 * 4 * 16
        + 9 * 4 * 2 * 16  # scale 1 from itself: 1x1 4->4, 3x3 4->2 at 4x4
    )
    head0 = 9 * 8 * 16 * 4 + 9 * 16 * 16 * 1 + 16 * 3  # 3x3/2 8->16 to 2x2, 3x3/2 16->16 to 1x1, linear
    layer2 = (  # only scale 1 is kept: base 4 channels in, bottleneck to min(Cin, bn_factor * 2)
        4 * 2 * 64
        + 9 * 2 * 2 * 16  # from scale 0 (4 ch): 1x1 4->2 at 8x8, 3x3/2 2->2 to 4x4
        + 8 * 4 * 16
        + 9 * 4 * 2 * 16  # from scale 1 (8 ch): 1x1 8->4, 3x3 4->2 at 4x4
    )
    transition = 12 * 6 * 16  # base 6 -> floor(0.5 * 6) = 3, at scale 1: 12 -> 6 channels
    head1 = 9 * 6 * 16 * 4 + 9 * 16 * 16 * 1 + 16 * 3
    assert (stem, layer1, head0, layer2, transition, head1) == (2304, 4800, 6960, 2752, 1152, 5808)
    costs = model.exit_costs((1, 8, 8))
    assert costs.macs == [stem + layer1 + head0, stem + layer1 + head0 + layer2 + transition + head1]
    assert costs.macs == [14064, 23776] and costs.latency == [3.0, 4.0]
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 2, 3)


def test_width_scales_cost_about_quadratically():
    full = cn.create_model("msdnet-cifar").exit_costs((3, 32, 32)).macs[-1]
    for width in (0.5, 1.5):
        model = cn.create_model("msdnet-cifar", width=width)
        assert model.config.stem_channels == 16 * width and model.config.growth == 6 * width
        assert model.config.head_channels == 128 * width
        ratio = model.exit_costs((3, 32, 32)).macs[-1] / full
        assert 0.8 * width**2 < ratio < 1.2 * width**2
    # rounding to whole channels: 16 * 0.3 = 4.8 -> 5, 6 * 0.3 = 1.8 -> 2, 128 * 0.3 = 38.4 -> 38
    config = MSDNetConfig(width=0.3)
    assert (config.stem_channels, config.growth, config.head_channels) == (5, 2, 38)


def test_initialisation_follows_the_reference():
    model = cn.create_model("msdnet-cifar", width=0.5)
    conv = model.stem[1][0]  # 3x3, 8 -> 16 channels
    assert abs(float(conv.weight.detach().std()) - (2 / (9 * 16)) ** 0.5) < 0.03
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        if isinstance(m, torch.nn.Linear):
            assert torch.all(m.bias == 0)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"step_mode": "linear"}, "unknown step_mode 'linear'; valid choices: even, lin_grow"),
        ({"prune": "none"}, "unknown prune 'none'; valid choices: max, min"),
        ({"num_blocks": 0}, "num_blocks must be a positive integer"),
        ({"base": 0}, "base must be a positive integer"),
        ({"step": -1}, "step must be a positive integer"),
        ({"channels": 2.5}, "channels must be an integer"),
        ({"growth_rate": 0}, "growth_rate must be a positive integer"),
        ({"num_scales": 2}, r"gr_factor needs one entry per scale \(num_scales=2\)"),
        ({"bn_factor": (1, 2)}, r"bn_factor needs one entry per scale \(num_scales=3\)"),
        ({"gr_factor": (1, 0, 4)}, "gr_factor entries must be a positive integer"),
        ({"gr_factor": "124"}, "gr_factor must be tuple"),
        ({"bottleneck": "false"}, "bottleneck must be true or false"),
        ({"reduction": 1.5}, r"reduction must be a number in \[0, 1\]"),
        ({"reduction": 0.01}, "reduction 0.01 leaves no channels after the transition"),
        ({"width": 0}, "width must be a positive number"),
        ({"width": float("inf")}, "width must be a positive number"),
        ({"num_classes": 0}, "num_classes must be a positive integer"),
    ],
)
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        MSDNetConfig(**options)


def test_configuration_survives_json():
    config = MSDNetConfig(num_blocks=3, step_mode="lin_grow", prune="min", gr_factor=(1, 2, 2), width=0.5,
                          reduction=1, in_channels=1, num_classes=4)  # fmt: skip
    stored = json.loads(json.dumps(config.to_dict()))
    assert stored["family"] == "msdnet" and stored["gr_factor"] == [1, 2, 2]
    back = config_from_dict(stored)
    assert back == config and isinstance(back.gr_factor, tuple) and back.reduction == 1.0
    assert isinstance(back.build(), MSDNet)


def test_train_then_evaluate(tmp_path):
    model = MSDNetConfig(**TINY)
    cfg = TrainConfig(model=model, dataset="synthetic", synthetic_size=64, epochs=1, max_batches=2, batch_size=16,
                      loss="ce", schedule="constant", out=str(tmp_path), name="msd")  # fmt: skip
    run = train(cfg)
    loaded = cn.load_model(run)
    assert isinstance(loaded, MSDNet) and loaded.config == MSDNetConfig(**TINY, num_classes=4, in_channels=3)
    result = evaluate(run)
    assert result["num_steps"] == 3 and len(result["accuracy_per_step"]) == 3
    assert result["macs_per_step"] == loaded.exit_costs((3, 16, 16)).macs
    assert result["parallel_latency_blocks"] == [3.0, 4.0, 5.0]
    assert result["model"]["family"] == "msdnet" and result["policy_first_step"] == 0
    assert result["feedforward_accuracy"] is None


def test_pooled_stem_halves_every_scale_and_counts_the_first_conv_at_full_resolution():
    from cascadenet.models.msdnet import MSDNetConfig

    cfg = MSDNetConfig(num_blocks=2, step=1, base=1, stem="cifar_pool", in_channels=1)
    model = cfg.build()
    assert model.scale_sizes((28, 28)) == [(14, 14), (7, 7), (4, 4)]
    # 3x3 conv 1 -> 16 at 28x28, max-pool to 14x14, then 16 -> 32 at 7x7 and 32 -> 64 at 4x4 (stride 2)
    assert model.stem.macs((28, 28)) == 16 * 9 * 28 * 28 + 32 * 16 * 9 * 7 * 7 + 64 * 32 * 9 * 4 * 4
    plain = MSDNetConfig(num_blocks=2, step=1, base=1, in_channels=1).build()
    assert model.exit_costs((1, 28, 28)).macs[-1] < plain.exit_costs((1, 28, 28)).macs[-1] / 2
    model.eval()
    x = torch.randn(2, 1, 28, 28)
    maps = model.stem(x)
    assert [tuple(m.shape[-2:]) for m in maps] == [(14, 14), (7, 7), (4, 4)]
    assert model(x).shape == (2, 2, 10)
    with pytest.raises(ValueError, match="unknown stem 'imagenet'"):
        MSDNetConfig(stem="imagenet")


def test_reproduce_matches_msdnet_cost_by_depth_keeping_the_reference_proportions():
    from cascadenet.experiments.reproduce import BUDGETS, _cascade, _msdnet

    budget = BUDGETS["small"]
    cfg = _msdnet(budget, (1, 28, 28), 10)
    # the reference CIFAR configuration's proportions, untouched
    kept = (cfg.channels, cfg.growth_rate, cfg.gr_factor, cfg.bn_factor, cfg.width)
    assert kept == (16, 6, (1, 2, 4), (1, 2, 4), 1.0)
    assert cfg.head_channels == 128 and cfg.bottleneck and cfg.stem == "cifar_pool"
    assert cfg.num_blocks >= 2 and cfg.step_mode == "even" and cfg.base == cfg.step
    target = _cascade(budget, in_channels=1).build().exit_costs((1, 28, 28)).macs[-1]
    cost = cfg.build().exit_costs((1, 28, 28)).macs[-1]
    # nearest in ratio among the depths offered: one block more or fewer is further from CascadedTD's cost
    for blocks in (cfg.num_blocks - 1, cfg.num_blocks + 1):
        if blocks >= 2:
            other = type(cfg)(**{**cfg.__dict__, "num_blocks": blocks}).build().exit_costs((1, 28, 28)).macs[-1]
            assert abs(math.log(other / target)) >= abs(math.log(cost / target))
