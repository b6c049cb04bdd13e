"""Weights and their preprocessing together: ``create_model(name, pretrained=PATH)``, the normalisation stored with
converted weights, and ``--normalize``."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

import cascadenet
from cascadenet import CascadeConfig
from cascadenet.cli import main
from cascadenet.models.checkpoint import read_metadata
from cascadenet.models.pretrained import IMAGENET_NORMALIZATION, convert_file
from cascadenet.training.loop import TrainConfig, train
from test_pretrained import torchvision_layout


@pytest.fixture
def converted(tmp_path):
    torch.save(torchvision_layout("resnet18", width=4, classes=7), tmp_path / "r18.pth")
    convert_file(tmp_path / "r18.pth", tmp_path / "init.safetensors")
    return tmp_path / "init.safetensors"


def run_cfg(tmp_path, **kw):
    base = dict(model=CascadeConfig(), dataset="synthetic", synthetic_size=64, image_size=32, epochs=1,
                batch_size=16, max_batches=1, recalibrate_batches=0, out=str(tmp_path), threads=1)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def stored_normalization(run):
    return json.loads((run / "config.json").read_text())["normalization"]


def test_converted_weights_carry_imagenet_normalisation_and_init_uses_it(tmp_path, converted):
    assert read_metadata(converted)["normalization"] == IMAGENET_NORMALIZATION
    run = train(run_cfg(tmp_path, init=str(converted), name="init"))
    norm = stored_normalization(run)
    assert norm["mean"] == pytest.approx(IMAGENET_NORMALIZATION["mean"])
    assert norm["std"] == pytest.approx(IMAGENET_NORMALIZATION["std"])
    # resumable with the same statistics (the run recorded them)
    assert train(resume=run) == run
    own = stored_normalization(train(run_cfg(tmp_path, init=str(converted), normalize="dataset", name="own")))
    assert own["mean"] != pytest.approx(IMAGENET_NORMALIZATION["mean"])
    small = CascadeConfig(arch="resnet10", width=4)
    given = stored_normalization(train(run_cfg(tmp_path, model=small, normalize="0.5,0.25", name="given")))
    assert given == {"mean": [0.5] * 3, "std": [0.25] * 3}
    imagenet = stored_normalization(train(run_cfg(tmp_path, model=small, normalize="imagenet", name="imagenet")))
    assert imagenet["std"] == pytest.approx(IMAGENET_NORMALIZATION["std"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--normalize", "what"], "--normalize takes dataset, imagenet or MEAN,STD numbers"),
        (["--normalize", "0.5,0"], "must be > 0"),
        (["--normalize", "1,2,3,4"], "statistics of 2 channel(s), but the images have 3"),
    ],
)
def test_bad_normalize_is_one_line(tmp_path, capsys, flags, message):
    line = ["train", "--dataset", "synthetic", "--synthetic-size", "64", "--batch-size", "16", "--epochs", "1",
            "--out", str(tmp_path / "runs"), "--width", "4", *flags]  # fmt: skip
    assert main(line) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cascadenet: error:") and message in err and "\n" not in err
    assert not (tmp_path / "runs").exists()


def test_create_model_pretrained(tmp_path, converted):
    model = cascadenet.create_model("resnet18", pretrained=converted)
    start = load_file(str(converted))
    state = model.state_dict()
    assert all(torch.equal(state[k], start[k]) for k in start)
    assert model.normalization == IMAGENET_NORMALIZATION and model.config.width == 4
    # another number of classes: a new classifier, every other weight the file's
    tuned = cascadenet.create_model("resnet18", pretrained=converted, num_classes=3, num_steps=4)
    assert tuned.config.num_classes == 3 and tuned.num_steps == 4
    w = "blocks.0.residual.units.0.conv.weight"
    assert torch.equal(tuned.state_dict()[w], start[w])
    # a torchvision state dict directly
    direct = cascadenet.create_model("resnet18", pretrained=tmp_path / "r18.pth")
    assert all(torch.equal(direct.state_dict()[k], start[k]) for k in start)
    with pytest.raises(ValueError, match="holds a resnet18 model, not resnet34"):
        cascadenet.create_model("resnet34", pretrained=converted)
    with pytest.raises(ValueError, match="width 8 vs 4 in the file"):
        cascadenet.create_model("resnet18", pretrained=converted, width=8)
    # a run's weights carry the run's normalisation
    run = train(dataclasses.replace(run_cfg(tmp_path, normalize="0.5,0.25", name="n"), model=CascadeConfig(
        arch="resnet10", width=4)))  # fmt: skip
    again = cascadenet.create_model("resnet10", pretrained=run / "model.safetensors")
    assert again.normalization == {"mean": [0.5] * 3, "std": [0.25] * 3}
