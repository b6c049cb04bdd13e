"""``cascadenet.cascade`` of timm's ResNet family (``models/layouts.py``), without timm and with it.

timm is not a dependency (and does not import here: it needs torchvision). The networks below are a stand-in for
``timm.models.resnet``, written for these tests from a reading of timm's source (huggingface/pytorch-image-models,
``timm/models/resnet.py``: the ``ResNet``, ``BasicBlock`` and ``Bottleneck`` classes, ``make_blocks``,
``downsample_conv``/``downsample_avg``, the deep stems; ``timm/layers``' squeeze-excitation, ``DropPath`` and the
adaptive pool of ``create_classifier``): the same attribute names, the same order of the operations in each
``forward``, the same optional parts (``None`` or ``nn.Identity`` when not asked for), with the arguments reduced to
what the layout reads. No code of timm's is copied. ``test_real_timm_resnets`` runs the same checks against timm
itself where it is installed."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cascadenet
from cascadenet.models.checkpoint import load_model, save_weights
from test_network import float64, randomized  # noqa: F401 (float64: a fixture)


class SqueezeExcite(nn.Module):
    """timm's SE attention: mean over space, 1x1 reduce, ReLU, 1x1 expand, sigmoid gate."""

    def __init__(self, channels, reduction=4):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))))


class DropPath(nn.Module):
    """Stochastic depth: each example's residual dropped with probability p in training, the identity in eval."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class GlobalPool(nn.Module):
    """timm's ``SelectAdaptivePool2d`` for pool type ``avg`` with flattening."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)

    def forward(self, x):
        return self.flatten(self.pool(x))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, attn=False, drop_path=0.0, **_):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.drop_block = nn.Identity()
        self.act1 = nn.ReLU(inplace=True)
        self.aa = nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = SqueezeExcite(planes) if attn else None
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path else None

    def forward(self, x):
        shortcut = x
        x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        x = self.bn2(self.conv2(x))
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act2(x)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, attn=False, drop_path=0.0, cardinality=1,
                 base_width=64):  # fmt: skip
        super().__init__()
        width = int(math.floor(planes * (base_width / 64)) * cardinality)
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.drop_block = nn.Identity()
        self.act2 = nn.ReLU(inplace=True)
        self.aa = nn.Identity()
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.se = SqueezeExcite(planes * 4) if attn else None
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path else None

    def forward(self, x):
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
        x = self.bn3(self.conv3(x))
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act3(x)


class ResNet(nn.Module):
    """timm's ``ResNet`` with the options the layout meets: ``stem_type`` '' (7x7), 'deep' or 'deep_tiered',
    ``replace_stem_pool``, ``avg_down``, ``cardinality``/``base_width``, SE attention, ``drop_path_rate``,
    ``drop_rate``."""

    def __init__(self, block, layers, num_classes=5, in_chans=3, channels=(4, 8, 8, 16), stem_width=4, stem_type="",
                 replace_stem_pool=False, avg_down=False, attn=False, drop_rate=0.0, drop_path_rate=0.0,
                 **block_args):  # fmt: skip
        super().__init__()
        self.drop_rate = drop_rate
        deep = "deep" in stem_type
        inplanes = stem_width * 2 if deep else stem_width
        if deep:
            a, b = (3 * (stem_width // 4), stem_width) if "tiered" in stem_type else (stem_width, stem_width)
            self.conv1 = nn.Sequential(
                nn.Conv2d(in_chans, a, 3, 2, 1, bias=False), nn.BatchNorm2d(a), nn.ReLU(inplace=True),
                nn.Conv2d(a, b, 3, 1, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True),
                nn.Conv2d(b, inplanes, 3, 1, 1, bias=False),
            )  # fmt: skip
        else:
            self.conv1 = nn.Conv2d(in_chans, inplanes, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.act1 = nn.ReLU(inplace=True)
        if replace_stem_pool:
            self.maxpool = nn.Sequential(nn.Conv2d(inplanes, inplanes, 3, 2, 1, bias=False),
                                         nn.BatchNorm2d(inplanes), nn.ReLU(inplace=True))  # fmt: skip
        else:
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        total, k = sum(layers), 0
        for i, (planes, n) in enumerate(zip(channels, layers)):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or inplanes != planes * block.expansion:
                out = planes * block.expansion
                if avg_down:
                    pool = (
                        nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
                        if stride > 1
                        else nn.Identity()
                    )
                    downsample = nn.Sequential(pool, nn.Conv2d(inplanes, out, 1, bias=False), nn.BatchNorm2d(out))
                else:
                    downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
            blocks = []
            for j in range(n):
                rate = drop_path_rate * k / max(total - 1, 1)
                blocks.append(block(inplanes, planes, stride if j == 0 else 1, downsample if j == 0 else None,
                                    attn=attn, drop_path=rate, **block_args))  # fmt: skip
                inplanes, k = planes * block.expansion, k + 1
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.global_pool = GlobalPool()
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return self.fc(x)


VARIANTS = {
    "resnet": lambda: ResNet(BasicBlock, [2, 1, 1, 1]),
    "resnet-bottleneck": lambda: ResNet(Bottleneck, [1, 1, 1, 1], channels=(2, 4, 4, 8)),
    "resnext-d": lambda: ResNet(
        Bottleneck, [1, 1, 1, 1], channels=(2, 4, 4, 8), stem_type="deep", avg_down=True, cardinality=2, base_width=64
    ),  # fmt: skip
    "resnet-t": lambda: ResNet(BasicBlock, [1, 1, 1, 1], stem_type="deep_tiered", stem_width=8, avg_down=True),
    "seresnet-s-dropped": lambda: ResNet(
        BasicBlock, [1, 2, 1, 1], attn=True, replace_stem_pool=True, drop_rate=0.25, drop_path_rate=0.2
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_the_settled_step_is_the_timm_network_and_anytime_runs_it(name, float64):  # noqa: F811
    torch.manual_seed(0)
    net = randomized(VARIANTS[name]())
    model = cascadenet.cascade(net).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want, out = net(x), model(x)
        loop = model(x, method="loop")
        ff = model.feedforward(x)
    assert model.num_blocks == sum(len(getattr(net, f"layer{i}")) for i in range(1, 5))
    assert torch.allclose(out[-1], want, rtol=1e-9, atol=1e-12)
    assert torch.allclose(ff, want, rtol=1e-9, atol=1e-12)
    assert torch.allclose(loop, out, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(out[1], want, rtol=1e-3)
    steps = list(model.anytime(x))
    assert all(torch.allclose(s.logits, out[s.step], rtol=1e-9, atol=1e-12) for s in steps)
    assert [s.macs for s in steps] == model.exit_costs((3, 32, 32)).macs
    # every batch norm of the network, the deep stem's and the replaced pool's included, has per-step slots
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert len(model.norms()) == norms and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_a_timm_network_trains_with_the_td_loss():
    torch.manual_seed(0)
    model = cascadenet.cascade(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=4, attn=True, drop_path_rate=0.1))
    x, y = torch.randn(16, 3, 16, 16), torch.arange(16) % 4
    opt = torch.optim.SGD(model.train().parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        loss = cascadenet.td_loss(model(x), y, 0.5, first_step=model.first_informative_exit)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_timm_blocks_the_layout_cannot_read_are_refused_in_one_line():
    net = ResNet(BasicBlock, [1, 1, 1, 1])
    net.layer3[0].act2 = nn.SiLU()
    with pytest.raises(ValueError, match=r"layer3\.0 .*ends in SiLU, not ReLU.*cascade_layout") as e:
        cascadenet.cascade(net)
    assert "\n" not in str(e.value)
    net = ResNet(Bottleneck, [1, 1, 1, 1], channels=(2, 4, 4, 8))
    net.layer2[0].extra = nn.Conv2d(16, 16, 1)
    with pytest.raises(ValueError, match=r"layer2\.0 .*timm Bottleneck \(it also has extra\)"):
        cascadenet.cascade(net)
    del net.layer2[0].conv3  # without conv3 it reads as a basic block, which it is not
    with pytest.raises(ValueError, match=r"layer2\.0"):
        cascadenet.cascade(net)


# timm 1.0.31 (its model code, run locally with torchvision stubbed out): all pass, 2 to 70 s each; the others
# below also cascaded exactly then (float64, 0 difference): resnet14t, resnet34d, resnet50c, resnet50s, resnetaa34d,
# resnetblur18, ecaresnet26t, resnetrs50, resnet50_gn (group norm: no per-step slots), wide_resnet101_2. Refused in
# one line: timm's ByobNet (resnext26ts, seresnet33ts), SENet (legacy_seresnet18), selective-kernel blocks.
TIMM_MODELS = ["resnet10t"] + [
    pytest.param(n, marks=pytest.mark.slow) for n in ("resnet18", "resnet26d", "seresnext26d_32x4d", "wide_resnet50_2")
]


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_real_timm_resnets(name, tmp_path, float64):  # noqa: F811
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = randomized(timm.create_model(name, pretrained=False, num_classes=7))
    model = cascadenet.cascade(net).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want, out = net(x), model(x)
        assert torch.allclose(out[-1], want, rtol=1e-9, atol=1e-12)
        assert all(torch.allclose(s.logits, out[s.step], rtol=1e-9, atol=1e-12) for s in model.anytime(x))
    built = cascadenet.cascade("timm:create_model", builder_args={"model_name": name, "num_classes": 3})
    save_weights(tmp_path / "m.safetensors", built)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "m.safetensors")(x), built.eval()(x))


def timm_like(num_classes=5):
    """A builder of a timm-layout network with timm's record of the normalisation its weights expect."""
    net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
    net.pretrained_cfg = {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3), "num_classes": num_classes}
    return net


def test_a_timm_networks_normalisation_travels_with_its_weights(tmp_path, capsys):
    from cascadenet.cli import main

    model = cascadenet.cascade(f"{__name__}:timm_like")
    want = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    assert model.normalization == want
    save_weights(tmp_path / "m.safetensors", model)
    loaded = cascadenet.load_model(tmp_path / "m.safetensors")
    assert loaded.preprocess.mean == pytest.approx(want["mean"]) and loaded.preprocess.std == pytest.approx(want["std"])
    # train --init takes it (unless --normalize says otherwise), as it takes ImageNet's for converted weights
    args = ["train", "--init", str(tmp_path / "m.safetensors"), "--dataset", "synthetic", "--synthetic-size", "64",
            "--image-size", "16", "--epochs", "1", "--batch-size", "16", "--threads", "1", "--out", str(tmp_path),
            "--name", "run"]  # fmt: skip
    assert main(args) == 0
    import json

    stored = json.loads((tmp_path / "run" / "config.json").read_text())["normalization"]
    assert all(stored[k] == pytest.approx(want[k]) for k in want)
    # given, or none: a plain module has none; a bad one is refused in one line
    assert cascadenet.cascade(ResNet(BasicBlock, [1, 1, 1, 1])).normalization is None
    given = cascadenet.cascade(ResNet(BasicBlock, [1, 1, 1, 1]), normalization={"mean": [0.1] * 3, "std": [1] * 3})
    assert given.normalization == {"mean": [0.1] * 3, "std": [1.0] * 3}
    with pytest.raises(ValueError, match=r"3 number\(s\) each"):
        cascadenet.cascade(ResNet(BasicBlock, [1, 1, 1, 1]), normalization={"mean": [0.5], "std": [0.2]})
