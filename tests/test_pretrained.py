"""Pretrained ResNets: a torchvision-layout state dict converted to a cascade settles on the original network.

The reference here is an independent forward pass written with torch.nn.functional from the state dict itself
(torchvision's ResNet, layer by layer), so the test proves the conversion without torchvision; where torchvision
imports, its own model is compared as well.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cascadenet import CascadeConfig
from cascadenet.cli import main
from cascadenet.models.checkpoint import CheckpointError, load_model, read_metadata
from cascadenet.models.pretrained import convert_file, convert_state_dict
from cascadenet.runs.config import TrainConfig
from test_train import small_cfg

LAYERS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}


def _bn(sd, name, c, g):
    sd[f"{name}.weight"] = torch.rand(c, generator=g) + 0.5
    sd[f"{name}.bias"] = torch.randn(c, generator=g) * 0.1
    sd[f"{name}.running_mean"] = torch.randn(c, generator=g) * 0.1
    sd[f"{name}.running_var"] = torch.rand(c, generator=g) + 0.5
    sd[f"{name}.num_batches_tracked"] = torch.tensor(100)


def _conv(sd, name, cout, cin, k, g):
    sd[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) * (2 / (cin * k * k)) ** 0.5


def torchvision_layout(arch="resnet18", width=8, classes=7, in_channels=3, seed=0):
    """A state dict with the names and shapes of torchvision.models.<arch>(num_classes=classes) (width 64 there;
    any width here) and random weights and batch-norm statistics."""
    g = torch.Generator().manual_seed(seed)
    kind, layers = LAYERS[arch]
    expansion = 4 if kind == "bottleneck" else 1
    sd = {}
    _conv(sd, "conv1", width, in_channels, 7, g)
    _bn(sd, "bn1", width, g)
    cin = width
    for s, n in enumerate(layers, start=1):
        planes = width * 2 ** (s - 1)
        for i in range(n):
            p, stride = f"layer{s}.{i}", 2 if s > 1 and i == 0 else 1
            if kind == "basic":
                _conv(sd, f"{p}.conv1", planes, cin, 3, g), _bn(sd, f"{p}.bn1", planes, g)
                _conv(sd, f"{p}.conv2", planes, planes, 3, g), _bn(sd, f"{p}.bn2", planes, g)
            else:
                _conv(sd, f"{p}.conv1", planes, cin, 1, g), _bn(sd, f"{p}.bn1", planes, g)
                _conv(sd, f"{p}.conv2", planes, planes, 3, g), _bn(sd, f"{p}.bn2", planes, g)
                _conv(sd, f"{p}.conv3", planes * 4, planes, 1, g), _bn(sd, f"{p}.bn3", planes * 4, g)
            if stride != 1 or cin != planes * expansion:
                _conv(sd, f"{p}.downsample.0", planes * expansion, cin, 1, g)
                _bn(sd, f"{p}.downsample.1", planes * expansion, g)
            cin = planes * expansion
    sd["fc.weight"] = torch.randn(classes, cin, generator=g) * cin**-0.5
    sd["fc.bias"] = torch.randn(classes, generator=g) * 0.1
    return sd


def reference_forward(sd, x):
    """torchvision's ResNet forward (evaluation mode), written from the state dict with functional ops."""

    def bn(x, name):
        return F.batch_norm(x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                            sd[f"{name}.bias"], False, 0.0, 1e-5)  # fmt: skip

    x = F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    s = 1
    while f"layer{s}.0.conv1.weight" in sd:
        i = 0
        while f"layer{s}.{i}.conv1.weight" in sd:
            p, stride = f"layer{s}.{i}", 2 if s > 1 and i == 0 else 1
            if f"{p}.conv3.weight" in sd:  # bottleneck: the stride on the 3x3 conv (torchvision's v1.5)
                out = F.relu(bn(F.conv2d(x, sd[f"{p}.conv1.weight"]), f"{p}.bn1"))
                out = F.relu(bn(F.conv2d(out, sd[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn2"))
                out = bn(F.conv2d(out, sd[f"{p}.conv3.weight"]), f"{p}.bn3")
            else:
                out = F.relu(bn(F.conv2d(x, sd[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1"))
                out = bn(F.conv2d(out, sd[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            if f"{p}.downsample.0.weight" in sd:
                x = bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1")
            x = F.relu(out + x)
            i += 1
        s += 1
    return F.linear(x.mean(dim=(2, 3)), sd["fc.weight"], sd["fc.bias"])


def _double(sd):
    return {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("options", [{}, {"temporal_affine": True, "multi_head": True}, {"stem_delay": False}])
def test_converted_cascade_settles_on_the_original_network(arch, options):
    sd = torchvision_layout(arch, width=4 if arch == "resnet50" else 8)
    model = convert_state_dict(sd, **options).double()
    assert not model.training and model.config.arch == arch and model.config.stem == "imagenet"
    assert model.num_steps == model.settle_steps
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    expected = reference_forward(_double(sd), x)
    with torch.no_grad():
        trajectory = model(x)
        loop = model(x, method="loop")
        ff = model.feedforward(x)
    torch.testing.assert_close(trajectory[-1], expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(loop[-1], expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ff, expected, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(trajectory[model.first_informative_exit], expected)  # early steps are shallower
    for bn in model.norms():  # every slot holds the pretrained statistics
        assert (bn.running_mean == bn.running_mean[:1]).all() and (bn.running_var == bn.running_var[:1]).all()


def test_against_torchvision_itself():
    torchvision = pytest.importorskip("torchvision")
    tv = torchvision.models.resnet18(num_classes=7).double().eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    model = convert_state_dict(tv.state_dict()).double()
    # the hand-built layout is torchvision's: same keys and shapes
    assert {k: v.shape for k, v in torchvision_layout("resnet18", width=64, classes=7).items()} == {
        k: v.shape for k, v in tv.state_dict().items()
    }
    with torch.no_grad():
        torch.testing.assert_close(model(x)[-1], tv(x), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(reference_forward(tv.state_dict(), x), tv(x), rtol=1e-9, atol=1e-9)


def test_bad_state_dicts_are_refused_clearly():
    sd = torchvision_layout("resnet18")
    with pytest.raises(CheckpointError, match="missing layer2.0.downsample.1.running_var"):
        convert_state_dict({k: v for k, v in sd.items() if k != "layer2.0.downsample.1.running_var"})
    with pytest.raises(CheckpointError, match="has no place for: extra.weight"):
        convert_state_dict({**sd, "extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="layer1.0.conv2.weight has shape"):
        convert_state_dict({**sd, "layer1.0.conv2.weight": torch.zeros(8, 8, 1, 1)})
    short = {k: v for k, v in sd.items() if not k.startswith("layer4.1.")}
    with pytest.raises(CheckpointError, match="basic blocks 2-2-2-1 per stage matches no known architecture"):
        convert_state_dict(short)
    with pytest.raises(CheckpointError, match="not a torchvision-layout ResNet"):
        convert_state_dict({"weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="width: set by the weights"):
        convert_state_dict(sd, width=16)


def test_convert_file_and_cli(tmp_path, capsys):
    sd = torchvision_layout("resnet18")
    src = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, src)  # wrapped, DDP-prefixed
    out = tmp_path / "cascade.safetensors"
    assert main(["convert", str(src), "-o", str(out), "--num-steps", "12"]) == 0
    assert "wrote" in capsys.readouterr().out
    model = load_model(out)
    assert model.num_steps == 12 and read_metadata(out)["converted_from"] == "resnet18.pth"
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[-1], reference_forward(sd, x), rtol=1e-4, atol=1e-4)

    before = out.read_bytes()
    assert main(["convert", str(src), "-o", str(out)]) == 2  # never over an existing file unless told
    err = capsys.readouterr().err.strip()
    assert err.startswith("cascadenet: error:") and "exists" in err and "--overwrite" in err and "\n" not in err
    assert out.read_bytes() == before
    assert main(["convert", str(src), "-o", str(out), "--overwrite"]) == 0
    assert load_model(out).num_steps == model.settle_steps

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    for argv, message in [
        (["convert", str(tmp_path / "junk.pth"), "-o", str(tmp_path / "a.safetensors")], "not a readable"),
        (["convert", str(tmp_path / "none.pth"), "-o", str(tmp_path / "b.safetensors")], "no such file"),
        (["convert", str(src), "-o", str(tmp_path / "c.pt")], "name it *.safetensors"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("cascadenet: error:") and message in err and "\n" not in err
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "b.safetensors").exists()
    # a pickled model (not a state dict) is refused unread
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match="nothing in it was run"):
        convert_file(tmp_path / "pickled.pth", tmp_path / "d.safetensors")


def test_train_init_fine_tunes_and_replaces_a_changed_classifier(tmp_path, caplog):
    sd = torchvision_layout("resnet18", width=4, classes=7)
    src = tmp_path / "r18.pth"
    torch.save(sd, src)
    init = tmp_path / "init.safetensors"
    convert_file(src, init)
    cfg = small_cfg(tmp_path, init=str(init), epochs=1, image_size=32, max_batches=2)
    with caplog.at_level("WARNING", logger="cascadenet"):
        run = T_train(cfg)
    assert "trained for 7 classes and the dataset has 4: its classifier is replaced" in caplog.text
    stored = json.loads((run / "config.json").read_text())
    assert stored["model"]["arch"] == "resnet18" and stored["model"]["width"] == 4
    assert stored["model"]["stem"] == "imagenet" and stored["model"]["num_classes"] == 4
    # an --init inside the folder that holds the run is stored relative to the run (the folder can move)
    assert stored["train"]["init"] == "../init.safetensors" and stored["relative_paths"] == ["init"]
    assert TrainConfig.from_file(run / "config.json").init == str(init)
    # training started from the file: after two small steps the convolutions are still close to it
    final = load_file(str(run / "model.safetensors"))
    start = load_file(str(init))
    w = "blocks.3.residual.units.0.conv.weight"
    assert (final[w] - start[w]).norm() < 0.2 * start[w].norm()
    assert final["heads.0.weight"].shape == (4, 32)

    # the same number of classes: every weight, the classifier included, comes from the file
    cfg = small_cfg(tmp_path, init=str(init), epochs=1, image_size=32, max_batches=1, lr=1e-6, name="same",
                    dataset="synthetic")  # fmt: skip
    torch.save(torchvision_layout("resnet18", width=4, classes=4), src)
    convert_file(src, init, overwrite=True)
    caplog.clear()
    with caplog.at_level("WARNING", logger="cascadenet"):
        run = T_train(cfg)
    assert "classifier is replaced" not in caplog.text
    final, start = load_file(str(run / "model.safetensors")), load_file(str(init))
    torch.testing.assert_close(final["heads.0.weight"], start["heads.0.weight"], atol=1e-4, rtol=0)


def test_train_init_refusals(tmp_path, capsys):
    sd = torchvision_layout("resnet18", width=4, classes=4)
    torch.save(sd, tmp_path / "r.pth")
    init = tmp_path / "init.safetensors"
    convert_file(tmp_path / "r.pth", init)
    base = ["train", "--dataset", "synthetic", "--synthetic-size", "64", "--batch-size", "16", "--epochs", "1",
            "--warmup-epochs", "0", "--out", str(tmp_path / "runs")]  # fmt: skip
    for extra, message in [
        (["--init", str(init), "--width", "16"], "(width 16 vs 4 in the file): leave the model options out"),
        (["--init", str(tmp_path / "r.pth")], "not a .safetensors model file (convert"),
        (["--init", str(tmp_path / "missing.safetensors")], "no such file"),
    ]:
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("cascadenet: error:") and message in err and "\n" not in err, err
    assert not (tmp_path / "runs").exists()  # nothing was written


def T_train(cfg):
    """Train from --init with the model left at its default (the file decides it)."""
    from cascadenet.training.loop import train

    return train(dataclasses.replace(cfg, model=CascadeConfig()))
