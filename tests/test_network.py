"""``cascadenet.cascade``: a user's residual network as a cascade with the same weights (``models/network.py``).

torchvision is not a dependency: the networks here are small hand-made copies of its layout (the attribute names
and block structure of ``torchvision.models.resnet``), with grouped and widened convolutions as ResNeXt and
Wide-ResNet have, and a network described by the ``cascade_layout()`` protocol."""

import json
import sys
import textwrap

import pytest
import torch
from torch import nn

import cascadenet
from cascadenet.cli import main
from cascadenet.models.checkpoint import CheckpointError, load_model, save_weights
from cascadenet.models.network import NetworkConfig


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, groups=1, base_width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """torchvision's: the 3x3 convolution carries the stride and the groups (ResNeXt), its width is
    ``planes * base_width / 64 * groups`` (Wide-ResNet: base_width 128)."""

    expansion = 4

    def __init__(self, cin, planes, stride=1, groups=1, base_width=64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """torchvision.models.resnet.ResNet's layout and forward, small."""

    def __init__(self, block, layers, num_classes=5, width=4, groups=1, width_per_group=64, in_channels=3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = width
        for i, n in enumerate(layers):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width * 2**i, 2 if i and not j else 1, groups, width_per_group))
                cin = width * 2**i * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Protocol(nn.Module):
    """A user's own residual network described by ``cascade_layout()``: branches of ordinary modules, one of
    them a module with its own forward (a squeeze-excitation gate), no pooling in the stem."""

    class Gated(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, 1, 1, bias=False)
            self.bn = nn.BatchNorm2d(c)
            self.gate = nn.Linear(c, c)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y * torch.sigmoid(self.gate(y.mean(dim=(2, 3))))[:, :, None, None]

    def __init__(self, c=6, num_classes=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), self.Gated(c))
        self.b2 = nn.Sequential(nn.Conv2d(c, 2 * c, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * c))
        self.s2 = nn.Sequential(nn.Conv2d(c, 2 * c, 1, 2, bias=False), nn.BatchNorm2d(2 * c))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.0), nn.Linear(2 * c, num_classes))

    def cascade_layout(self):
        return self.stem, [(self.b1, None), (self.b2, self.s2)], self.head

    def forward(self, x):
        y = self.stem(x)
        y = torch.relu(y + self.b1(y))
        y = torch.relu(self.s2(y) + self.b2(y))
        return self.head(y)


LAYOUTS = {
    "resnet-basic": (lambda: ResNet(BasicBlock, [1, 2, 1, 1]), 3),
    "resnet-bottleneck": (lambda: ResNet(Bottleneck, [1, 1, 1, 1]), 3),
    "resnext": (lambda: ResNet(Bottleneck, [1, 1, 1, 1], groups=2, width_per_group=32), 3),
    "wide-resnet": (lambda: ResNet(Bottleneck, [1, 1, 1, 1], width_per_group=128), 3),
    "protocol": (lambda: Protocol(), 1),
}


def randomized(net):
    """Non-trivial batch-norm statistics and scales, so that a slot mixed up would show."""
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return net.eval()


@pytest.fixture
def float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_the_settled_step_is_the_original_network(name, float64):
    torch.manual_seed(0)
    make, channels = LAYOUTS[name]
    net = randomized(make())
    model = cascadenet.cascade(net).eval()
    x = torch.randn(3, channels, 32, 32)
    with torch.no_grad():
        want, out = net(x), model(x)
        loop = model(x, method="loop")
        ff = model.feedforward(x)
    assert out.shape == (model.num_steps, 3, want.shape[1]) and model.num_steps == model.num_blocks + 2
    assert torch.allclose(out[-1], want, rtol=1e-9, atol=1e-12)
    assert torch.allclose(ff, want, rtol=1e-9, atol=1e-12)
    assert torch.allclose(loop, out, rtol=1e-9, atol=1e-12)  # the engine is the step loop
    assert not torch.allclose(out[1], want, rtol=1e-3)  # an early step is a shallower network
    assert net.training is False and isinstance(net.bn1 if hasattr(net, "bn1") else net.stem[1], nn.BatchNorm2d)


@pytest.mark.parametrize("name", ["resnet-basic", "protocol"])
def test_engine_equals_the_step_loop_in_training_with_the_same_statistics(name, float64):
    torch.manual_seed(0)
    make, channels = LAYOUTS[name]
    a = cascadenet.cascade(randomized(make()), num_steps=4).train()
    b = cascadenet.cascade(randomized(make()), num_steps=4).train()
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, channels, 16, 16)
    la, lb = a(x), b(x, method="loop")
    assert torch.allclose(la, lb, rtol=1e-9, atol=1e-12)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.allclose(sa[k], sb[k], rtol=1e-9, atol=1e-12) for k in sa)
    grads = torch.autograd.grad(la.sum(), list(a.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_every_batch_norm_gets_per_step_slots_initialised_from_the_original():
    net = randomized(ResNet(BasicBlock, [1, 1, 1, 1]))
    model = cascadenet.cascade(net, temporal_affine=True)
    bn = model.stem.module[1]
    assert bn.running_mean.shape == (model.num_steps, 4) and bn.weight.shape == (model.num_steps, 4)
    assert all(torch.equal(bn.running_mean[t], net.bn1.running_mean) for t in range(model.num_steps))
    assert all(torch.equal(bn.weight[t], net.bn1.weight) for t in range(model.num_steps))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert isinstance(net.bn1, nn.BatchNorm2d)  # the original is left as it was


def test_training_a_cascaded_network_with_the_td_loss_lowers_it():
    torch.manual_seed(0)
    model = cascadenet.cascade(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=4)).train()
    x, y = torch.randn(16, 3, 16, 16), torch.arange(16) % 4
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        loss = cascadenet.td_loss(model(x), y, 0.5, first_step=model.first_informative_exit)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_costs_count_the_networks_own_convolutions():
    net = ResNet(BasicBlock, [1, 1, 1, 1])
    model = cascadenet.cascade(net)
    # the stem: a 7x7/2 convolution of 3 channels into 4 on 32x32 -> 16x16, then the 3x3/2 pool -> 8x8
    assert model.stem.macs((32, 32)) == (4 * 16 * 16 * 7 * 7 * 3, (8, 8))
    costs = model.exit_costs((3, 32, 32))
    assert costs.macs[0] == 0 and costs.macs == sorted(costs.macs)
    counted = []  # the original network's convolutions and classifier, counted by hooks on one forward pass
    hooks = [m.register_forward_hook(lambda m, i, o: counted.append(o[0].numel() * (m.in_features if isinstance(
        m, nn.Linear) else m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1])))
        for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]  # fmt: skip
    net.eval()(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert model.feedforward_macs((3, 32, 32)) == sum(counted) < costs.macs[-1]


def test_a_new_number_of_classes_gets_a_new_classifier():
    model = cascadenet.cascade(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5), num_classes=7)
    assert model.eval()(torch.randn(2, 3, 16, 16)).shape[-1] == 7 and model.config.num_classes == 7


@pytest.mark.parametrize(
    ("net", "match"),
    [
        (nn.Sequential(nn.Conv2d(3, 4, 3)), "cascade_layout"),
        (type("Odd", (ResNet,), {})(BasicBlock, [1, 1, 1, 1]), None),
    ],
)
def test_unknown_layouts_are_refused_in_one_line(net, match):
    if match is None:  # a block with a module the layout would drop
        net.layer2[0].se = nn.Identity()
        match = "layer2.0.*se"
    with pytest.raises(ValueError, match=match) as e:
        cascadenet.cascade(net)
    assert "\n" not in str(e.value)


def write_user_module(folder):
    """A user's module in ``folder`` with a builder of a torchvision-layout network (as torchvision.models:resnet18
    would be); its name."""
    source = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, {tests!r})
        from test_network import BasicBlock, ResNet

        def tiny(num_classes=5, width=4):
            return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes, width=width)
        """
    ).format(tests=str(__import__("pathlib").Path(__file__).parent))
    (folder / "usernets.py").write_text(source)
    return "usernets"


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """``write_user_module`` on the path."""
    name = write_user_module(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_a_cascade_from_a_builder_saves_and_loads_in_a_fresh_process(tmp_path, user_module):
    model = cascadenet.cascade(f"{user_module}:tiny", builder_args={"width": 4}, num_classes=3).eval()
    assert model.config.builder == "usernets:tiny" and json.loads(model.config.builder_args) == {"width": 4}
    save_weights(tmp_path / "m.safetensors", model)
    loaded = load_model(tmp_path / "m.safetensors")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # the same network as a module object, with its builder said
    import usernets

    again = cascadenet.cascade(usernets.tiny(num_classes=3), builder=usernets.tiny, builder_args={"width": 4})
    assert again.config.builder == "usernets:tiny"
    sys.modules.pop("usernets")
    sys.path.remove(str(tmp_path))
    with pytest.raises(CheckpointError, match="cannot import the network builder 'usernets:tiny'.*--import"):
        load_model(tmp_path / "m.safetensors")


def test_a_cascade_of_a_module_object_alone_says_how_to_make_it_loadable(tmp_path):
    model = cascadenet.cascade(ResNet(BasicBlock, [1, 1, 1, 1]))
    save_weights(tmp_path / "m.safetensors", model)
    with pytest.raises(CheckpointError, match="builder="):
        load_model(tmp_path / "m.safetensors")


def test_train_and_eval_a_users_network_from_the_command_line_with_import(tmp_path, user_module, capsys):
    args = ["train", "--model", "cascaded-network", "--builder", f"{user_module}:tiny", "--dataset", "synthetic",
            "--synthetic-size", "64", "--epochs", "1", "--batch-size", "16", "--out", str(tmp_path), "--name", "run",
            "--threads", "1", "--image-size", "16"]  # fmt: skip
    assert main(["--import", user_module, *args]) == 0
    run = tmp_path / "run"
    assert NetworkConfig(**{k: v for k, v in json.loads((run / "config.json").read_text())["model"].items()
                            if k not in ("format", "family")}).builder == "usernets:tiny"  # fmt: skip
    assert main(["--import", user_module, "eval", str(run)]) == 0
    assert (run / "eval.json").is_file()
    sys.modules.pop("usernets")
    sys.path.remove(str(tmp_path))
    capsys.readouterr()
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--import" in err[0]
    assert main(["--import", "no_such_module_here", "models"]) == 2
    assert "--import no_such_module_here" in capsys.readouterr().err


def test_fit_trains_a_cascade_of_a_builder_and_the_run_rebuilds_it(tmp_path, user_module):
    from cascadenet.data.datasets import load_dataset

    config = cascadenet.cascade(f"{user_module}:tiny").config  # 5 classes: the data's 4 get a new classifier
    cfg = cascadenet.TrainConfig(model=config, epochs=1, batch_size=16, out=str(tmp_path), name="run", threads=1)
    data = load_dataset("synthetic", synthetic_size=64, image_size=16)
    run = cascadenet.fit(cfg, data, test_set=load_dataset("synthetic", "", "test", synthetic_size=32, image_size=16),
                         progress=False)  # fmt: skip
    model = load_model(run)
    assert model.config.builder == "usernets:tiny" and model.config.num_classes == 4
    assert json.loads((run / "eval.json").read_text())["accuracy_per_step"]


# ---- model.anytime: a cascaded network is run step by step as the project's own cascades are -----------------

ANYTIME_OPTIONS = {
    "parallel": {},
    "serial": dict(scheme="serial"),
    "no_stem_delay": dict(stem_delay=False),
    "ews": dict(delay="ews", alpha=0.5),
    "multi_head": dict(multi_head=True),
    "shared_bn_long": dict(temporal_bn=False, num_steps=9),  # settled states shared, steps past settling free
}


@pytest.mark.parametrize("options", list(ANYTIME_OPTIONS.values()), ids=list(ANYTIME_OPTIONS))
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_anytime_steps_equal_the_trajectory_and_cost_what_exit_costs_counts(name, options, float64):
    from test_stepwise import MacCounter

    make, channels = LAYOUTS[name]
    model = cascadenet.cascade(randomized(make()), **options).eval()
    x = torch.randn(3, channels, 16, 16)
    with torch.no_grad():
        expected = model(x)
    macs = model.exit_costs((channels, 16, 16)).macs
    counter = MacCounter(model, 3)  # the convolutions and linear layers really run, the gates' included
    run = model.anytime(x)
    steps = []
    for s in run:
        assert torch.allclose(s.logits, expected[s.step][s.indices], rtol=1e-9, atol=1e-12), s.step
        assert s.macs == macs[s.step], s.step
        assert counter.total == run.macs_spent, s.step
        steps.append(s.step)
        if s.step == 2:
            run.keep([2, 0])  # examples leave; the next steps compute the other rows only
            counter.batch = 2
    counter.close()
    assert steps == list(range(model.num_steps)) and run.indices.tolist() == [2, 0]
    assert run.macs_spent == 3 * macs[2] + 2 * (macs[-1] - macs[2])


@pytest.fixture
def twins(float64):
    """A torchvision-layout ResNet-18 (small) cascaded by ``cascadenet.cascade``, and the project's own cascaded
    ResNet-18 holding the same weights (``convert_state_dict``): two routes to the same cascade."""
    from cascadenet.models.pretrained import convert_state_dict

    net = randomized(ResNet(BasicBlock, [2, 2, 2, 2], num_classes=6))
    ours = convert_state_dict(net.state_dict(), num_steps=8)
    return cascadenet.cascade(net, num_steps=8).eval(), ours.eval(), torch.randn(10, 3, 32, 32)


def test_predict_deadlines_and_policies_early_exit_a_cascaded_network_as_the_projects_resnet(twins):
    from cascadenet.evaluation.policies import Confidence
    from test_deployment import StepClock

    user, ours, x = twins
    assert user.exit_costs((3, 32, 32)).macs == ours.exit_costs((3, 32, 32)).macs
    with torch.no_grad():
        assert torch.allclose(user(x), ours(x), rtol=1e-9, atol=1e-12)
    for s, o in zip(user.anytime(x), ours.anytime(x)):
        assert s.macs == o.macs and torch.allclose(s.logits, o.logits, rtol=1e-9, atol=1e-12)
    work = [m * len(x) for m in user.anytime(x).step_macs()]
    ends = torch.tensor(work).cumsum(0).double() * 1e-9
    with torch.no_grad():  # a threshold that half the examples pass at step 3: they leave, the others go on
        policy = Confidence(user(x).softmax(-1).amax(-1)[3].median().item())
    cases = [dict(policy=policy), dict(budget=ends[-1].item() * 1e9 / len(x) / 2),
             dict(deadline=((ends[3] + ends[4]) / 2).item(), clock=lambda: StepClock(work, 1e-9)),
             dict(policy=policy, deadline=60.0)]  # fmt: skip
    for case in cases:
        got = [
            cascadenet.predict(m, x, **{k: v() if k == "clock" else v for k, v in case.items()}) for m in (user, ours)
        ]
        assert got[0].early_exit and got[1].early_exit, case
        assert got[0].steps.tolist() == got[1].steps.tolist(), case
        assert got[0].predictions.tolist() == got[1].predictions.tolist(), case
        assert got[0].macs.tolist() == got[1].macs.tolist(), case
        assert got[0].steps.min() < user.num_steps - 1, case  # some examples stopped early


@pytest.fixture(scope="module")
def users_run(tmp_path_factory):
    """A run of a user's network trained from the command line with --import, and four image files."""
    import numpy as np
    from PIL import Image

    tmp_path = tmp_path_factory.mktemp("users-run")
    mp = pytest.MonkeyPatch()
    module = write_user_module(tmp_path)
    mp.syspath_prepend(str(tmp_path))
    args = ["train", "--model", "cascaded-network", "--builder", f"{module}:tiny", "--dataset", "synthetic",
            "--synthetic-size", "64", "--epochs", "1", "--batch-size", "16", "--out", str(tmp_path), "--name", "run",
            "--threads", "1", "--image-size", "16"]  # fmt: skip
    assert main(["--import", module, *args]) == 0
    files = []
    for i in range(4):
        files.append(tmp_path / f"img{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(files[-1])
    yield module, tmp_path / "run", files
    mp.undo()
    sys.modules.pop(module, None)


def test_predict_files_and_serve_a_users_network_run(users_run, tmp_path):
    from cascadenet.deployment.server import Scheduler
    from cascadenet.evaluation.policies import Confidence

    module, run, files = users_run
    model = cascadenet.load_model(run)
    x = model.preprocess(files)
    with torch.no_grad():  # a threshold that stops some images before the last step
        threshold = model(x).softmax(-1).amax(-1)[2].median().item()
    expected = cascadenet.predict(model, x, Confidence(threshold))
    assert expected.early_exit and expected.steps.min() < model.num_steps - 1
    out = tmp_path / "p.json"
    assert main(["--import", module, "predict", str(run), *map(str, files), "--threshold", str(threshold),
                 "-o", str(out)]) == 0  # fmt: skip
    records = json.loads(out.read_text())
    assert [r["exit"] for r in records] == expected.steps.tolist()
    assert [r["label"] for r in records] == expected.predictions.tolist()
    assert [r["macs"] for r in records] == expected.macs.tolist()
    scheduler = Scheduler(model, max_batch=4, policy=Confidence(threshold))
    try:  # the server's scheduler, without HTTP (tests/test_server.py has that)
        answers = [f.result(timeout=30) for f in [scheduler.submit(image, 30.0) for image in x]]
    finally:
        scheduler.close()
    assert [a["label"] for a in answers] == expected.predictions.tolist()
    assert [a["exit"] for a in answers] == expected.steps.tolist()


@pytest.mark.slow
def test_export_a_users_network_run(users_run, tmp_path):
    module, run, files = users_run
    model = cascadenet.load_model(run)
    x = model.preprocess(files)
    assert main(["--import", module, "export", str(run), "-o", str(tmp_path / "m.pt2")]) == 0
    trajectory = torch.export.load(tmp_path / "m.pt2").module()
    with torch.no_grad():
        assert (trajectory(x) - model(x)).abs().max() <= 1e-5
    assert (tmp_path / "m-step.pt2").is_file()
