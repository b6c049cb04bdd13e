"""Training on data given from Python (``cascadenet.fit``, ``cascadenet.data.user``)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset, TensorDataset

import cascadenet
import cascadenet.training.loop as T
from cascadenet import CascadeConfig
from cascadenet.cli import main
from cascadenet.data.datasets import DataError, load_dataset
from cascadenet.data.user import as_image_set
from cascadenet.evaluation.evaluate import evaluate
from cascadenet.training.loop import TrainConfig


class Patterns(Dataset):
    """A user's dataset: float images in [0, 1] (as ToTensor gives), int labels, a ``classes`` attribute."""

    classes = ["hstripes", "vstripes", "checker", "rings"]

    def __init__(self, n=256, seed=0):
        synthetic = load_dataset("synthetic", synthetic_size=n, seed=seed)  # the same easy patterns
        self.x = synthetic.images.float() / 255
        self.y = synthetic.labels.tolist()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def config(tmp_path, **kw):
    base = dict(model=CascadeConfig(arch="resnet10", width=4), epochs=2, batch_size=32, lr=0.05, warmup_epochs=0.5,
                out=str(tmp_path), name="run", eval_batch_size=128, threads=1)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_fit_trains_on_a_python_dataset_and_writes_a_complete_run(tmp_path):
    run = cascadenet.fit(config(tmp_path, epochs=4), Patterns(512), test_set=Patterns(128, seed=1), progress=False)
    assert {p.name for p in run.iterdir()} >= {"config.json", "metrics.jsonl", "model.safetensors", "eval.json"}
    stored = json.loads((run / "config.json").read_text())
    assert stored["train"]["dataset"] == "python" and stored["classes"] == Patterns.classes
    assert stored["model"]["num_classes"] == 4 and stored["model"]["in_channels"] == 3  # from the data
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and rows[-1]["val_accuracy_per_step"][-1] >= 0.8
    result = json.loads((run / "eval.json").read_text())
    assert result["split"] == "test" and result["accuracy_per_step"][-1] >= 0.8
    assert cascadenet.load_model(run).config.num_classes == 4


def test_fit_is_the_same_training_as_an_image_set_of_the_same_pixels(tmp_path):
    """Float pixels that are multiples of 1/255 are stored exactly: the same weights as the uint8 set."""
    a = cascadenet.fit(config(tmp_path / "a"), Patterns(), progress=False)
    b = cascadenet.fit(config(tmp_path / "b"), load_dataset("synthetic", synthetic_size=256), progress=False)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_fit_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    full = cascadenet.fit(config(tmp_path / "a"), Patterns(), progress=False)
    calls = {"n": 0}
    real = T.compute_loss

    def interrupt(*args):
        calls["n"] += 1
        if calls["n"] == 9:  # in the second epoch (7 batches each)
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(T, "compute_loss", interrupt)
    with pytest.raises(KeyboardInterrupt):
        cascadenet.fit(config(tmp_path / "b"), Patterns(), progress=False)
    monkeypatch.undo()
    resumed = cascadenet.fit(None, Patterns(), resume=tmp_path / "b" / "run", progress=False)
    wa, wb = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # other data than the run's is refused
    with pytest.raises(Exception, match="trained on"):
        cascadenet.fit(None, Patterns(300), resume=tmp_path / "b" / "run", progress=False)


def test_fit_takes_a_validation_set_and_a_dataloader(tmp_path):
    train = DataLoader(Patterns(256), batch_size=50, shuffle=True)  # its dataset is read, in order
    run = cascadenet.fit(config(tmp_path, epochs=1), train, Patterns(64, seed=3), progress=False)
    stored = json.loads((run / "config.json").read_text())
    assert stored["data"]["examples"] == 256  # all of train_set trains: the validation set is given
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1


def test_a_python_run_is_evaluated_with_its_data_and_the_command_line_says_why_not(tmp_path, capsys):
    run = cascadenet.fit(config(tmp_path, epochs=1), Patterns(), progress=False)
    result = evaluate(run, data=Patterns(64, seed=2))
    assert result["split"] == "test" and len(result["accuracy_per_step"]) == len(result["macs_per_step"])
    assert result["budgeted_batch"] is None  # no validation split given with it
    capsys.readouterr()
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "given from Python" in err[0]


def test_as_image_set_reads_tensors_arrays_and_pil_images():
    x = torch.randint(0, 256, (6, 3, 5, 7), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    ds = as_image_set(TensorDataset(x, y))
    assert torch.equal(ds.images, x) and torch.equal(ds.labels, y) and ds.classes == ["0", "1", "2"]
    floats = as_image_set(TensorDataset(x.float() / 255, y), classes=["a", "b", "c"])
    assert torch.equal(floats.images, x) and floats.classes == ["a", "b", "c"]
    gray = as_image_set([(np.full((4, 4), 7, np.uint8), 1), (np.zeros((4, 4), np.uint8), 0)])
    assert gray.images.shape == (2, 1, 4, 4) and int(gray.images[0].max()) == 7
    from PIL import Image

    pil = as_image_set([(Image.fromarray(x[i].permute(1, 2, 0).numpy()), int(y[i])) for i in range(6)])
    assert torch.equal(pil.images, x)
    assert as_image_set(TensorDataset(x, y), classes=5).num_classes == 5


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (TensorDataset(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)), r"in \[0, 1\]"),
        ([(torch.zeros(3, 8, 8), 0), (torch.zeros(3, 8, 9), 1)], "image 1 has shape"),
        ([(torch.zeros(3, 8, 8), 0), (torch.zeros(3, 8, 8), -1)], "label -1"),
        ([torch.zeros(3, 8, 8)], "not an \\(image, label\\) pair"),
        ([], "empty"),
        (42, "map-style"),
        ([(torch.zeros(3, 8, 8), 0.5)], "label must be an int"),
    ],
)
def test_as_image_set_refuses_bad_data_in_one_line(data, match):
    with pytest.raises(DataError, match=match) as e:
        as_image_set(data, name="train_set")
    assert "\n" not in str(e.value)


def test_float_pixels_off_the_8_bit_grid_are_rounded_with_a_warning():
    with pytest.warns(UserWarning, match="rounded to 8 bits"):
        ds = as_image_set([(torch.full((1, 2, 2), 0.5), 0), (torch.zeros(1, 2, 2), 1)])
    assert int(ds.images[0, 0, 0, 0]) == 128


def test_fit_shows_progress_by_default_when_logging_is_not_configured(tmp_path, capsys, monkeypatch):
    import logging

    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # a plain script (pytest adds its own handlers,
    monkeypatch.setattr(logging.getLogger("cascadenet"), "handlers", [])  # and the command line its own)
    cascadenet.fit(config(tmp_path, epochs=1), Patterns())
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "val acc" in err
    assert not logging.getLogger("cascadenet").handlers  # the handler was the call's only


def test_a_grayscale_folder_trains_and_evaluates_with_one_channel(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("test", 8)):
        for c in ("dark", "light"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(n // 2):
                level = 40 if c == "dark" else 200
                pixels = np.clip(rng.normal(level, 20, (8, 8)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(tmp_path / "data" / split / c / f"{i}.png")
    cfg = config(tmp_path, dataset="imagefolder", data_root=str(tmp_path / "data"), epochs=1, batch_size=8)
    run = T.train(cfg)
    assert json.loads((run / "config.json").read_text())["model"]["in_channels"] == 1
    assert evaluate(run)["split"] == "test"  # the test split read as training read the train split
