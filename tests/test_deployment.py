"""Deployment: a loaded model carries its classes and input transform; predict on image files gives what the
labelled split gives for the same images; deadlines in time with an injected clock."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cascadenet as cn
from cascadenet.cli import main
from cascadenet.deployment.images import Preprocess, expand_paths
from cascadenet.deployment.loading import model_metadata
from cascadenet.evaluation.early_exit import predict, predict_run
from cascadenet.evaluation.policies import Confidence
from cascadenet.models.checkpoint import save_weights
from cascadenet.runs.load import load_run
from conftest import perturb_norms, tiny_model

FIXTURE = Path(__file__).parent / "fixtures" / "run-format1"


@pytest.fixture(scope="module")
def run_and_images(tmp_path_factory):
    """A copy of the fixture run and its test split written as PNG files (lossless: the same pixels)."""
    root = tmp_path_factory.mktemp("deploy")
    run = root / "run"
    shutil.copytree(FIXTURE, run)
    loaded = load_run(run, device="cpu")
    folder = root / "images"
    (folder / "sub").mkdir(parents=True)
    files = []
    for i, im in enumerate(loaded.data.images[:12]):
        path = folder / ("sub" if i % 2 else "") / f"img{i:02d}.png"
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(path)
        files.append(path)
    return run, files, loaded


def test_load_model_carries_classes_and_the_training_transform(run_and_images):
    run, files, loaded = run_and_images
    model = cn.load_model(run)
    assert model.classes == loaded.data.classes == ["hstripes", "vstripes", "checker", "rings"]
    x = model.preprocess(files)
    images = loaded.data.images[:12].float()
    expected = (images / 255 - loaded.mean.view(1, -1, 1, 1)) / loaded.std.view(1, -1, 1, 1)
    assert x.shape == expected.shape and torch.allclose(x, expected, atol=1e-6)
    # one image, a path string, a PIL image, a uint8 array and a tensor: the same batch of one
    one = x[:1]
    for given in (str(files[0]), Image.open(files[0]), np.asarray(Image.open(files[0])), loaded.data.images[0]):
        assert torch.allclose(model.preprocess(given), one, atol=1e-6)


def test_preprocess_converts_channels_and_size():
    rgb = torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8)
    grey = Preprocess((0.5,), (0.25,), channels=1, size=(16, 16))
    x = grey(rgb)
    pil_l = np.asarray(Image.fromarray(rgb.permute(1, 2, 0).numpy()).convert("L"))  # Pillow's own luma
    from cascadenet.data.datasets import resize_crop

    want = resize_crop(torch.from_numpy(pil_l.copy())[None, None], (16, 16)).float()
    assert x.shape == (1, 1, 16, 16) and torch.allclose(x, (want / 255 - 0.5) / 0.25, atol=1e-6)
    colour = Preprocess((0.0,) * 3, (1.0,) * 3, channels=3)
    g = torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8)
    assert torch.equal(colour.to_uint8(g)[0], g.expand(3, -1, -1))  # grey repeated into three channels


def test_metadata_reads_the_input_shape_of_a_bare_weights_file(tmp_path):
    model = tiny_model("resnet10", num_classes=3)
    path = tmp_path / "elsewhere.safetensors"
    extra = {"normalization": {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5]}, "classes": ["a", "b", "c"],
             "input_shape": [3, 20, 24]}  # fmt: skip
    save_weights(path, model, extra)
    assert model_metadata(path) == {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5], "classes": ["a", "b", "c"],
                                    "size": (20, 24)}  # fmt: skip
    loaded = cn.load_model(path)
    assert loaded.preprocess(torch.zeros(3, 50, 50, dtype=torch.uint8)).shape == (1, 3, 20, 24)
    bare = tmp_path / "bare.safetensors"  # saved from Python without statistics: loads, but will not guess them
    save_weights(bare, model)
    plain = cn.load_model(bare)
    assert plain.classes is None and plain.preprocess.to_uint8(torch.zeros(3, 5, 5, dtype=torch.uint8)).shape == (
        1,
        3,
        5,
        5,
    )
    with pytest.raises(ValueError, match="no normalisation statistics"):
        plain.preprocess(torch.zeros(3, 5, 5, dtype=torch.uint8))


def test_expand_paths_files_folders_globs(run_and_images, tmp_path):
    _, files, _ = run_and_images
    folder = files[0].parent
    assert expand_paths([folder]) == sorted(files, key=lambda p: str(p))
    assert expand_paths([str(folder / "sub" / "*.png")]) == sorted(f for f in files if f.parent.name == "sub")
    with pytest.raises(cn.data.datasets.DataError, match="no such file"):
        expand_paths([tmp_path / "missing.png"])
    with pytest.raises(cn.data.datasets.DataError, match="matches no file"):
        expand_paths([str(tmp_path / "*.png")])


def test_cli_predict_files_matches_the_labelled_split(run_and_images, tmp_path, capsys):
    run, files, loaded = run_and_images
    split = tmp_path / "split.npz"
    assert main(["predict", str(run), "--threshold", "0.4", "-o", str(split)]) == 0
    capsys.readouterr()
    saved = np.load(split)
    assert saved["classes"].tolist() == loaded.data.classes
    assert saved["probabilities"].shape == (len(loaded.data), 4)
    assert np.allclose(saved["probabilities"].sum(1), 1, atol=1e-5)
    out = tmp_path / "p.csv"
    folder = files[0].parent
    assert main(["predict", str(run), str(folder), "--threshold", "0.4", "-o", str(out), "--batch-size", "5"]) == 0
    rows = list(csv.DictReader(out.open()))
    by_name = {Path(r["path"]).name: r for r in rows}
    assert len(rows) == len(files)
    for i, f in enumerate(files):
        r = by_name[f.name]
        k = int(saved["predictions"][i])
        assert r["class"] == loaded.data.classes[k] and int(r["label"]) == k
        assert int(r["exit"]) == int(saved["steps"][i]) and int(r["macs"]) == int(saved["macs"][i])
        assert float(r["probability"]) == pytest.approx(float(saved["probabilities"][i, k]), abs=1e-5)
    # JSON, and an existing file kept without --overwrite
    js = tmp_path / "p.json"
    assert main(["predict", str(run), str(files[0]), str(files[1]), "-o", str(js)]) == 0
    records = json.loads(js.read_text())
    assert [Path(r["path"]).name for r in records] == [files[0].name, files[1].name]
    assert set(records[0]) == {"path", "class", "label", "probability", "exit", "macs"}
    before = js.read_bytes()
    assert main(["predict", str(run), str(files[0]), "-o", str(js)]) == 2
    assert "exists" in capsys.readouterr().err and js.read_bytes() == before
    # no -o: a table on the screen
    assert main(["predict", str(run), str(files[0])]) == 0
    assert files[0].name in capsys.readouterr().out


def test_cli_predict_files_bad_input_is_one_line(run_and_images, tmp_path, capsys):
    run, files, _ = run_and_images
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    for argv, message in [
        ([str(broken)], "cannot read image"),
        ([str(tmp_path / "nothing.png")], "no such file"),
        ([str(files[0]), "-o", str(tmp_path / "p.txt")], ".csv or .json"),
        ([str(files[0]), "--deadline-ms", "0"], "--deadline-ms"),
    ]:
        assert main(["predict", str(run), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


class StepClock:
    """A clock read once at the start and once after each step: each step takes ``seconds_per_work`` times its
    work (MACs per example x examples still running), as the deadline's estimate assumes."""

    def __init__(self, step_work, seconds_per_work):
        self.times = [0.0]
        for w in step_work:
            self.times.append(self.times[-1] + w * seconds_per_work)
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.times[self.calls - 1]


@pytest.fixture(scope="module")
def cascade():
    torch.manual_seed(0)
    model = tiny_model("resnet10", num_classes=6, num_steps=8).double().eval()
    perturb_norms(model, seed=3)
    x = torch.randn(10, 3, 16, 16, dtype=torch.float64)
    return model, x


def test_deadline_stops_at_the_last_step_that_fits(cascade):
    model, x = cascade
    n = x.shape[0]
    step_macs = model.anytime(x).step_macs()
    work = [m * n for m in step_macs]
    ends = np.cumsum(work) * 1e-9
    first = model.first_informative_exit
    full = predict(model, x)
    with torch.no_grad():
        probs = model(x).softmax(-1)
    for t in range(first + 1, len(work) - 1):
        deadline = (ends[t] + ends[t + 1]) / 2  # step t ends in time, step t+1 would not
        got = predict(model, x, deadline=deadline, clock=StepClock(work, 1e-9))
        assert got.steps.tolist() == [t] * n, (t, got.steps.tolist())
        assert got.predictions.tolist() == probs[t].argmax(-1).tolist()
        assert torch.allclose(got.probabilities.double(), probs[t], atol=1e-6)
    # a deadline shorter than the first informative step still answers from it; a long one changes nothing
    got = predict(model, x, deadline=1e-12, clock=StepClock(work, 1e-9))
    assert got.steps.tolist() == [first] * n
    got = predict(model, x, deadline=ends[-1] * 2, clock=StepClock(work, 1e-9))
    assert got.steps.tolist() == full.steps.tolist() and got.predictions.tolist() == full.predictions.tolist()


def test_deadline_with_a_policy_counts_only_the_examples_still_running(cascade):
    model, x = cascade
    policy = Confidence(0.2)
    free = predict(model, x, policy)
    # with no deadline pressure the policy decides alone; a real clock and a generous deadline agree
    timed = predict(model, x, policy, deadline=60.0)
    assert timed.steps.tolist() == free.steps.tolist()
    with pytest.raises(ValueError, match="deadline must be a positive"):
        predict(model, x, deadline=0)


def test_predict_run_keeps_probabilities(run_and_images):
    run, _, loaded = run_and_images
    summary = predict_run(run, device="cpu", deadline=60.0)
    assert summary["deadline"] == 60.0 and 0 <= summary["accuracy"] <= 1
