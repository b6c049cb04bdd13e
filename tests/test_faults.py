"""The second reliability pass (issue 21): silent wrong results, things left stuck, and errors that were not one
line. Each test reproduces one defect on a tiny run; most share one trained run (``tiny_run``, session-scoped) and
copy it where they change it."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from cascadenet.cli import main
from cascadenet.models.checkpoint import CHECKPOINT, CheckpointError
from cascadenet.runs.config import TrainConfig
from cascadenet.training.loop import train

TINY = dict(dataset="synthetic", synthetic_size=96, width=4, epochs=2, batch_size=16, max_batches=2, lr=0.05,
            warmup_epochs=0.5, threads=1, eval_batch_size=64, recalibrate_batches=1)  # fmt: skip


def tiny_cfg(out: Path, name: str, **kw) -> TrainConfig:
    from cascadenet.models.cascade import CascadeConfig

    options = {**TINY, **kw}
    model = options.pop("model", CascadeConfig(arch="resnet10", width=options.pop("width")))
    options.pop("width", None)
    return TrainConfig(model=model, out=str(out), name=name, **options)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One finished tiny run, shared: tests that change it work on a copy."""
    return train(tiny_cfg(tmp_path_factory.mktemp("tiny"), "run"))


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("cascadenet: error: ") and "Traceback" not in "\n".join(err), err
    return err[-1]


# ---------------------------------------------------------------------------------------------------------------
# options that silently did something else


def test_demo_epochs_zero_is_refused_and_leaves_no_folder(tmp_path, capsys):
    assert main(["demo", "--epochs", "0", "--out", str(tmp_path / "d")]) == 2
    assert "--epochs must be >= 1, got 0" in err_line(capsys)
    assert not (tmp_path / "d").exists()


def test_ic_only_without_init_is_refused():
    from cascadenet.models.sdn import SDNConfig

    with pytest.raises(ValueError, match="--loss ic-only .* without --init the backbone would stay"):
        TrainConfig(model=SDNConfig(), loss="ic-only")
    TrainConfig(model=SDNConfig(), loss="ic-only", init="x.safetensors")  # the file decides: checked when read


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".", ""])
def test_name_must_stay_inside_out(tmp_path, capsys, name):
    argv = ["train", "--dataset", "synthetic", "--width", "4", "--out", str(tmp_path / "o"), "--name", name]
    assert main(argv) == 2
    assert "--name must be a folder name inside --out" in err_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_convert_num_steps_1_with_the_stem_delayed_is_refused(tmp_path, capsys):
    from test_pretrained import torchvision_layout

    src = tmp_path / "r.pth"
    torch.save(torchvision_layout("resnet18", width=4), src)
    out = tmp_path / "c.safetensors"
    assert main(["convert", str(src), "-o", str(out), "--num-steps", "1"]) == 2
    assert "--num-steps 1 leaves no step that sees the input" in err_line(capsys)
    assert not out.exists()
    assert main(["convert", str(src), "-o", str(out), "--num-steps", "1", "--no-stem-delay"]) == 0


def test_checkpoint_position_fields_are_validated(tiny_run, tmp_path, capsys):
    for fields, what in [({"epoch": -7}, "epoch -7 is outside 0..2"), ({"batch": 10**9}, "batch 1000000000"),
                         ({"step": -1}, "step -1"), ({"epoch": 1.5}, "must be integers")]:  # fmt: skip
        run = copy_run(tiny_run, tmp_path / f"r{len(list(tmp_path.iterdir()))}")
        (run / "model.safetensors").unlink()
        ckpt = torch.load(run / CHECKPOINT, weights_only=True)
        ckpt.update(fields)
        torch.save(ckpt, run / CHECKPOINT)
        before = (run / CHECKPOINT).read_bytes()
        assert main(["train", "--resume", str(run)]) == 2
        line = err_line(capsys)
        assert "damaged training position" in line and what in line, line
        assert (run / CHECKPOINT).read_bytes() == before and not (run / "model.safetensors").exists()


def test_threads_are_stored_and_a_change_on_resume_is_warned(tmp_path, caplog):
    cfg = tiny_cfg(tmp_path, "t", threads=None, epochs=2)
    run = train(dataclasses_replace(cfg, max_batches=1))
    stored = json.loads((run / "config.json").read_text())["train"]["threads"]
    assert stored == torch.get_num_threads()  # the count the run computed with, not None
    # an interrupted run resumed without --threads keeps its count; another count warns what it costs
    (run / "model.safetensors").unlink()
    ckpt = torch.load(run / CHECKPOINT, weights_only=True)
    ckpt.update(epoch=1, batch=0, epoch_done=None)
    torch.save(ckpt, run / CHECKPOINT)
    with caplog.at_level(logging.WARNING, logger="cascadenet"):
        train(resume=run, overrides={"threads": stored + 1})
    assert f"--threads {stored + 1} differs from the {stored} threads this run was trained with" in caplog.text


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


# ---------------------------------------------------------------------------------------------------------------
# one line, always


def test_corrupt_or_truncated_npz_scores_are_one_line(tmp_path):
    import numpy as np

    from cascadenet.properties.typicality import read_scores

    good = tmp_path / "s.npz"
    np.savez(good, scores=np.arange(10.0), labels=np.arange(10) % 3)
    raw = good.read_bytes()
    for name, data in [("trunc.npz", raw[: len(raw) // 2]), ("garbage.npz", b"PK\x03\x04" + b"\x00" * 50),
                       ("random.npz", bytes(range(256)))]:  # fmt: skip
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"--scores {tmp_path / name}: not a readable numpy file"):
            read_scores(tmp_path / name, 10)
    assert read_scores(good, 10).shape == (10,)


def test_corrupt_consistency_cache_is_recomputed(tmp_path, monkeypatch):
    import cascadenet.properties.consistency as C
    from cascadenet.data.datasets import load_dataset

    pool = load_dataset("synthetic", None, "train", synthetic_size=20)
    calls = []

    def fake(pool, options, **kw):
        calls.append(1)
        return {"score": np.arange(len(pool), dtype=np.float64)}

    import numpy as np

    monkeypatch.setattr(C, "consistency_scores", fake)
    options = C.EstimatorOptions()
    _, path, reused = C.cached_consistency_scores(pool, options, tmp_path)
    assert not reused and path.is_file()
    path.write_bytes(path.read_bytes()[:40])  # truncated: zipfile.BadZipFile before the fix
    with pytest.warns(UserWarning, match="unreadable cache"):
        scores, _, reused = C.cached_consistency_scores(pool, options, tmp_path)
    assert not reused and len(calls) == 2 and len(scores["score"]) == 20


@pytest.mark.parametrize(
    "damage,what",
    [("garbage\n", "line 1 is not JSON"), ("{}\n", "line 1 has no"), ("[1]\n", "line 1 has no"), ("", "no epoch")],
)
def test_damaged_metrics_of_a_reused_run_are_one_line(tiny_run, tmp_path, damage, what):
    from cascadenet.experiments.reproduce import _last_row, _train_seconds

    run = copy_run(tiny_run, tmp_path / "r")
    assert _last_row(run)["epoch"] == 2 and _train_seconds(run) > 0
    (run / "metrics.jsonl").write_text(damage)
    for read in (_last_row, _train_seconds):
        with pytest.raises(ValueError, match=f"{run / 'metrics.jsonl'}: {what}"):
            read(run)


def test_random_bytes_as_a_checkpoint_are_not_called_a_planted_pickle(tmp_path):
    import os

    from cascadenet.models.checkpoint import load_checkpoint

    (tmp_path / "c.pt").write_bytes(bytes([7]) + os.urandom(2000))
    with pytest.raises(CheckpointError, match="neither a PyTorch archive nor a pickle") as e:
        load_checkpoint(tmp_path / "c.pt")
    assert "objects other than tensors" not in str(e.value)


def test_ood_dataset_without_its_folder_names_ood_data(tiny_run, capsys, tmp_path):
    assert main(["ood", str(tiny_run), "--ood-dataset", "cifar10", "--ood-data", str(tmp_path / "none")]) == 2
    line = err_line(capsys)
    assert "--ood-data" in line and "--data-root" not in line, line


def test_plot_names_the_file_it_writes_and_writes_atomically(tiny_run, tmp_path, capsys, monkeypatch):
    from cascadenet.evaluation.evaluate import evaluate

    run = copy_run(tiny_run, tmp_path / "r")
    evaluate(run)
    # no suffix: refused (it was written as curves.png while `curves` was printed)
    assert main(["plot", str(run), "-o", str(tmp_path / "curves")]) == 2
    assert "name the figure with its format's suffix" in err_line(capsys)
    assert list(tmp_path.glob("curves*")) == []
    fig = tmp_path / "f.png"
    assert main(["plot", str(run), "-o", str(fig)]) == 0
    assert capsys.readouterr().out.strip() == str(fig)
    old = fig.read_bytes()
    # a full disk while writing: the old figure stays, nothing is left behind, the error names the figure
    import cascadenet.utils.files as F

    def full(fd, *a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(F.os, "fsync", full)
    assert main(["plot", str(run), "-o", str(fig), "--overwrite"]) == 2
    line = err_line(capsys)
    assert line == f"cascadenet: error: {fig}: the disk is full", line
    assert fig.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["f.png", "r"]


def test_atomic_write_onto_a_missing_folder_names_the_target(tmp_path):
    from cascadenet.utils.files import atomic_write

    target = tmp_path / "no" / "x.json"
    with pytest.raises(FileNotFoundError) as e:
        atomic_write(target, b"{}")
    assert e.value.filename == str(target)


def test_suggested_commands_are_shell_quoted(tmp_path, capsys):
    out = tmp_path / "my runs"
    argv = ["train", "--dataset", "synthetic", "--synthetic-size", "64", "--width", "4", "--epochs", "1",
            "--max-batches", "1", "--batch-size", "16", "--threads", "1", "--out", str(out),
            "--name", "a b"]  # fmt: skip
    assert main(argv) == 0
    assert f"next: cascadenet eval '{out / 'a b'}'" in capsys.readouterr().out
    assert main(argv) == 2
    assert f"--resume '{out / 'a b'}'" in err_line(capsys)


# ---------------------------------------------------------------------------------------------------------------
# analyses of unfinished runs, and of other data


def unfinished_copy(tiny_run: Path, dest: Path) -> Path:
    """A run killed after its last checkpoint, before its final weights."""
    run = copy_run(tiny_run, dest)
    (run / "model.safetensors").unlink()
    return run


def test_analyses_of_an_unfinished_run_refuse_and_eval_says_it(tiny_run, tmp_path, capsys):
    run = unfinished_copy(tiny_run, tmp_path / "r")
    for argv in (["predict", str(run)], ["noise", str(run), "--sigmas", "0.1", "--out", str(tmp_path / "n")],
                 ["policy", str(run), "--out", str(tmp_path / "p")], ["ood", str(run), "--synthetic-ood"],
                 ["typicality", str(run), "--out", str(tmp_path / "t")]):  # fmt: skip
        assert main(argv) == 2, argv
        line = err_line(capsys)
        assert "has not finished training" in line and "--resume" in line, (argv, line)
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert "NOT FINISHED TRAINING" in out and "2 epoch(s) done" in out
    result = json.loads((run / "eval.json").read_text())
    assert result["finished_training"] is False and result["checkpoint_epoch"] == 2
    assert main(["plot", str(run), "-o", str(tmp_path / "f.png")]) == 0
    assert "before it finished training" in capsys.readouterr().err
    # training resumed: the evaluation of the checkpoint is removed, none describes other weights than the final
    train(resume=run)
    assert (run / "model.safetensors").is_file() and not (run / "eval.json").exists()


def test_a_run_being_trained_is_not_evaluated(tiny_run, tmp_path, capsys):
    from cascadenet.runs.lock import RunLock

    run = unfinished_copy(tiny_run, tmp_path / "r")
    with RunLock.acquire(run):  # as a training process holds it
        assert main(["eval", str(run)]) == 2
        assert "is being trained by process" in err_line(capsys)
        assert not (run / "eval.json").exists()
    assert main(["eval", str(run)]) == 0  # the lock released (or left by a dead process): evaluated
    assert not (run / "train.lock").exists()


def image_folder(root: Path, size: int, classes=("a", "b"), test_classes=None, seed=0, n_train=12) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, names, n in (("train", classes, n_train), ("test", test_classes or classes, 4)):
        for c in names:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                    root / split / c / f"{k}.png"
                )
    return root


@pytest.fixture(scope="session")
def folder_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("folder")
    data = image_folder(base / "data16", 16)
    return train(tiny_cfg(base, "run", dataset="imagefolder", data_root=str(data), batch_size=8, val_fraction=0.25,
                          synthetic_size=None))  # fmt: skip


def test_eval_and_predict_refuse_other_data_unless_asked_and_record_it(folder_run, tmp_path, capsys):
    run = copy_run(folder_run, tmp_path / "r")
    big = image_folder(tmp_path / "data32", 32)
    same_shape = image_folder(tmp_path / "other16", 16, seed=5)
    moved = shutil.copytree(Path(TrainConfig.from_file(run / "config.json").data_root), tmp_path / "moved")
    for root, what in ((big, "images of 3x32x32, the run's are 3x16x16"), (same_shape, "other training images")):
        for verb in ("eval", "predict"):
            assert main([verb, str(run), "--data-root", str(root)]) == 2
            line = err_line(capsys)
            assert what in line and "--other-data" in line, line
    assert not (run / "eval.json").exists()
    # the same data moved elsewhere is the run's
    assert main(["eval", str(run), "--data-root", str(moved)]) == 0
    data = json.loads((run / "eval.json").read_text())["data"]
    assert data["other_data"] is False and data["shape"] == [3, 16, 16] and data["split"] == "test"
    assert data["dataset"] == "imagefolder" and data["root"] == str(moved) and len(data["labels_sha256"]) == 16
    # asked explicitly: evaluated, and said in the table and the JSON
    assert main(["eval", str(run), "--data-root", str(big), "--other-data"]) == 0
    assert "OTHER DATA than the run's" in capsys.readouterr().out
    data = json.loads((run / "eval.json").read_text())["data"]
    assert data["other_data"] is True and data["shape"] == [3, 32, 32] and "3x32x32" in data["differs"]


def test_a_test_class_missing_from_train_is_found_before_training(tmp_path, capsys):
    data = image_folder(tmp_path / "d", 16, test_classes=("a", "b", "zebra"))
    argv = ["train", "--dataset", "imagefolder", "--data-root", str(data), "--width", "4", "--epochs", "1",
            "--batch-size", "8", "--out", str(tmp_path / "runs"), "--threads", "1"]  # fmt: skip
    assert main(argv) == 2
    line = err_line(capsys)
    assert "'zebra' does not exist in" in line and "could not be evaluated" in line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_data_mismatch_on_resume_says_what_differs(folder_run, tmp_path, capsys):
    run = unfinished_copy(folder_run, tmp_path / "r")
    other = image_folder(tmp_path / "other16", 16, seed=5)
    assert main(["train", "--resume", str(run), "--data-root", str(other)]) == 2
    line = err_line(capsys)
    assert "other images (their mean and std differ" in line, line


def test_damaged_normalization_is_named(tiny_run, tmp_path, capsys):
    cases = [({"mean": [0.5, 0.5, 0.5], "std": [1.0, 1.0]}, "3 channel(s) (mean) and 2 (std)"),
             ({"mean": [0.5, 0.5, 0.5], "std": [0.0, 1.0, 1.0]}, "damaged normalization statistics")]  # fmt: skip
    for norm, what in cases:
        run = copy_run(tiny_run, tmp_path / f"r{len(list(tmp_path.iterdir()))}")
        stored = json.loads((run / "config.json").read_text())
        stored["normalization"] = norm
        (run / "config.json").write_text(json.dumps(stored))
        assert main(["eval", str(run)]) == 2
        line = err_line(capsys)
        assert what in line and str(run / "config.json") in line, line


# ---------------------------------------------------------------------------------------------------------------
# nothing stuck: huge values, movable folders, temporaries


@pytest.mark.parametrize(
    "flags,what",
    [
        (["--synthetic-size", "10000000000"], "--synthetic-size 10000000000 of 16x16 images would need at least"),
        (["--width", "1000000"], "training this model (2.94e+15 parameters) would need at least"),
        (["--synthetic-size", "64", "--image-size", "1000000"], "of 1000000x1000000 images would need at least"),
        (["--synthetic-size", "64", "--num-steps", "1000000000000"], "training this model"),
    ],
)
def test_huge_training_values_are_refused_by_an_estimate(tmp_path, capsys, flags, what):
    argv = ["train", "--dataset", "synthetic", "--epochs", "1", "--threads", "1", "--out", str(tmp_path / "o"), *flags]
    assert main(argv) == 2
    line = err_line(capsys)
    assert what in line and "available" in line, line
    assert not (tmp_path / "o").exists()


def test_huge_steps_in_analyses_and_stored_configs_are_refused(tiny_run, tmp_path, capsys):
    assert main(["eval", str(tiny_run), "--num-steps", "100000000"]) == 2
    assert "the logits of 100000000 exits for" in err_line(capsys)
    assert main(["noise", str(tiny_run), "--num-steps", "100000000", "--out", str(tmp_path / "n")]) == 2
    assert "100000000 steps for" in err_line(capsys)
    assert not (tmp_path / "n").exists()
    # a config of 10^12 steps stored with the weights: refused before building the model
    from safetensors.torch import load_file, save_file

    run = copy_run(tiny_run, tmp_path / "r")
    weights = run / "model.safetensors"
    from cascadenet.models.checkpoint import read_metadata

    meta = read_metadata(weights)
    meta["model_config"]["num_steps"] = 10**12
    save_file(load_file(str(weights)), str(weights), metadata={k: json.dumps(v) for k, v in meta.items()})
    assert main(["eval", str(run)]) == 2
    line = err_line(capsys)
    assert f"loading {weights}" in line and "would need at least" in line, line


def test_estimate_is_close_for_real_sizes():
    from cascadenet.models.cascade import CascadeConfig
    from cascadenet.models.footprint import estimate_elements
    from cascadenet.models.msdnet import MSDNetConfig

    for cfg in (CascadeConfig(width=4, num_classes=10), CascadeConfig(width=16, num_classes=10),
                CascadeConfig(width=8, num_classes=10, num_steps=70, multi_head=True),
                MSDNetConfig(num_blocks=9, num_classes=10)):  # fmt: skip
        model = cfg.build()
        real = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
        assert 0.7 * real <= estimate_elements(cfg) <= 1.05 * real, (cfg, real, estimate_elements(cfg))


def test_a_serialisation_failure_is_an_os_error_naming_the_checkpoint(tmp_path, monkeypatch):
    import errno

    import cascadenet.models.checkpoint as C

    def fail(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1545677696 vs 1545677584")

    monkeypatch.setattr(C.torch, "save", fail)
    with pytest.raises(OSError) as e:
        C.save_checkpoint(tmp_path / "checkpoint.pt", {"model": {}, "model_config": {}})
    assert e.value.errno == errno.ENOMEM and e.value.filename == str(tmp_path / "checkpoint.pt")
    assert list(tmp_path.iterdir()) == []


def test_temporaries_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    import os
    import subprocess
    import time

    from cascadenet.utils.files import atomic_write

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".eval.json.{dead.pid}-abc.tmp"
    live = tmp_path / f".eval.json.{os.getppid()}-def.tmp"  # a live writer's: kept
    fresh = tmp_path / f".eval.json.{dead.pid}-ghi.tmp"  # too recent to judge
    other = tmp_path / f".report.md.{dead.pid}-jkl.tmp"  # another file's: left to its own writes
    old = time.time() - 3600
    for p in (stale, live, other):
        p.write_bytes(b"x")
        os.utime(p, (old, old))
    fresh.write_bytes(b"x")
    atomic_write(tmp_path / "eval.json", b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["eval.json", live.name, fresh.name, other.name])


def test_a_reproduction_folder_can_move(tmp_path):
    from cascadenet.experiments.reproduce import train_or_reuse
    from cascadenet.models.sdn import SDNConfig

    model = SDNConfig(arch="resnet10", width=4)
    out = tmp_path / "a" / "runs"
    backbone = train(tiny_cfg(out, "backbone", model=model, loss="final"))
    ic = tiny_cfg(out, "ic", model=model, loss="ic-only", init=str(backbone / "model.safetensors"), optimizer="adamw")
    assert train_or_reuse(ic) == "trained"
    stored = json.loads((out / "ic" / "config.json").read_text())
    assert stored["train"]["init"] == "../backbone/model.safetensors" and stored["relative_paths"] == ["init"]
    moved = tmp_path / "b"
    shutil.move(tmp_path / "a", moved)
    out2 = moved / "runs"
    ic2 = tiny_cfg(out2, "ic", model=model, loss="ic-only", init=str(out2 / "backbone" / "model.safetensors"),
                   optimizer="adamw")  # fmt: skip
    assert TrainConfig.from_file(out2 / "ic" / "config.json").init == str(out2 / "backbone" / "model.safetensors")
    assert train_or_reuse(ic2) == "reused"
    # a folder of an older version (the path stored absolute, into the old place) is recognised too
    stored["train"]["init"] = str(tmp_path / "a" / "runs" / "backbone" / "model.safetensors")
    stored["train"]["out"] = str(tmp_path / "a" / "runs")
    del stored["relative_paths"]
    (out2 / "ic" / "config.json").write_text(json.dumps(stored))
    assert train_or_reuse(ic2) == "reused"


def test_read_only_run_directory_is_refused_before_the_work(tiny_run, tmp_path, capsys, monkeypatch):
    import os

    import cascadenet.evaluation.evaluate as E
    import cascadenet.utils.files as F

    run = copy_run(tiny_run, tmp_path / "r")
    real = os.access
    monkeypatch.setattr(F.os, "access", lambda p, mode: False if Path(p) == run else real(p, mode))
    monkeypatch.setattr(E, "load_run", lambda *a, **k: pytest.fail("the work started"))
    for argv in (["eval", str(run)], ["recalibrate", str(run)]):
        assert main(argv) == 2
        line = err_line(capsys)
        assert line.startswith(f"cascadenet: error: {run}: not writable") and "nothing was done" in line, line
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in tiny_run.iterdir())


def test_nan_weights_are_named_with_their_file(tiny_run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from cascadenet.models.checkpoint import read_metadata

    run = copy_run(tiny_run, tmp_path / "r")
    weights = run / "model.safetensors"
    state = load_file(str(weights))
    name = next(k for k in state if k.endswith("weight"))
    state[name][0] = float("nan")
    save_file(state, str(weights), metadata={k: json.dumps(v) for k, v in read_metadata(weights).items()})
    assert main(["eval", str(run)]) == 2
    line = err_line(capsys)
    assert f"{weights}: {name} holds NaN or infinite values" in line, line


def test_a_bad_image_in_a_streaming_worker_is_one_short_line(tmp_path, capsys):
    data = image_folder(tmp_path / "d", 16)
    bad = data / "train" / "a" / "0.png"
    bad.write_bytes(b"not a png at all")
    argv = ["train", "--dataset", "imagefolder", "--data-root", str(data), "--stream", "on", "--workers", "1",
            "--image-size", "16", "--width", "4", "--epochs", "1", "--batch-size", "8", "--threads", "1",
            "--out", str(tmp_path / "runs")]  # fmt: skip
    assert main(argv) == 2
    line = err_line(capsys)
    assert "Traceback" not in line and "worker" not in line and len(line) < 300 and str(bad) in line, line


CTRL_C_IN_IMPORT = """
import builtins, importlib.util, runpy, sys
real = builtins.__import__
def interrupted(name, globals=None, locals=None, fromlist=(), level=0):
    full = importlib.util.resolve_name("." * level + name, (globals or {}).get("__package__")) if level else name
    if full == TARGET:  # as Ctrl-C would, at the first import of TARGET (deterministic, unlike a timed signal)
        builtins.__import__ = real
        raise KeyboardInterrupt
    return real(name, globals, locals, fromlist, level)
builtins.__import__ = interrupted
sys.argv = ["cascadenet", *VERB]
runpy.run_module("cascadenet", run_name="__main__", alter_sys=True)
"""

# the imports a command goes through, from the package's first line (os) to a verb's own modules
CTRL_C_MOMENTS = [("os", ["models"]), ("cascadenet.deployment.loading", ["models"]), ("torch", ["models"]),
                  ("logging", ["models"]), ("cascadenet.cli.parsing", ["models"]), ("tyro", ["models"]),
                  ("cascadenet.cli.commands", ["models"]),
                  ("cascadenet.evaluation.evaluate", ["eval", "/nonexistent"])]  # fmt: skip


@pytest.mark.parametrize("target,verb", CTRL_C_MOMENTS)
def test_ctrl_c_while_the_command_imports_is_quiet(target, verb):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    script = f"TARGET = {target!r}\nVERB = {verb!r}\n" + CTRL_C_IN_IMPORT
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, env=env, timeout=120)
    assert p.returncode == 130 and b"Traceback" not in p.stderr, (target, p.returncode, p.stderr.decode()[-2000:])


def test_ctrl_c_while_a_library_imports_cascadenet_is_the_callers():
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    library = (
        ("TARGET = 'torch'\nVERB = []\n" + CTRL_C_IN_IMPORT)
        .replace('sys.argv = ["cascadenet", *VERB]', 'sys.argv = ["script.py"]')
        .replace('runpy.run_module("cascadenet", run_name="__main__", alter_sys=True)', "import cascadenet")
    )
    p = subprocess.run([sys.executable, "-c", library], capture_output=True, env=env, timeout=120)
    assert p.returncode != 130 and b"KeyboardInterrupt" in p.stderr


def test_long_recalibration_logs_its_progress(tiny_run, tmp_path, capsys, monkeypatch):
    import cascadenet.utils.progress as P

    run = copy_run(tiny_run, tmp_path / "r")
    monkeypatch.setattr(P, "EVERY_S", 0.0)  # a line per batch
    assert main(["recalibrate", str(run), "--batches", "3"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("recalibrate: 3 batches")]
    assert lines and lines[0].startswith("recalibrate: 3 batches: 1/3 (33%) after") and "left" in lines[0], lines


def test_a_refused_reproduction_leaves_no_empty_folders(tmp_path, monkeypatch):
    import cascadenet.experiments.reproduce as R

    def refused(*a, **k):
        raise ValueError("refused")

    monkeypatch.setattr(R, "_reproduce_in", refused)
    (tmp_path / "keep").mkdir()
    with pytest.raises(ValueError, match="refused"):
        R.reproduce("synthetic", out=tmp_path / "keep" / "new" / "out", synthetic_size=32, threads=None)
    assert list(tmp_path.iterdir()) == [tmp_path / "keep"] and list((tmp_path / "keep").iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# second round: a refused or failed command leaves nothing new on disk


class _FullDisk:
    """``tempfile`` as ``cascadenet.utils.files`` sees it, on a disk with no space left."""

    @staticmethod
    def mkstemp(*args, **kwargs):
        import errno
        import os

        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), kwargs.get("dir", "?"))


def _reporting_verbs(run: Path, out: Path) -> dict[str, list[str]]:
    """Every verb that makes its --out folder, with that folder two levels below ``out`` (neither exists)."""
    new = out / "new" / "report"
    return {
        "noise": ["noise", str(run), "--sigmas", "0.1", "--max-examples", "16", "--out", str(new)],
        "policy": ["policy", str(run), "--out", str(new)],
        "ood": ["ood", str(run), "--synthetic-ood", "--out", str(new)],
        "typicality": ["typicality", str(run), "--out", str(new)],
        "guarantees": ["guarantees", str(run), "--splits", "2", "--out", str(new)],
        "plot": ["plot", str(run), "-o", str(new / "curves.png")],
    }


@pytest.mark.parametrize("verb", ["noise", "policy", "ood", "typicality", "guarantees", "plot"])
def test_a_failed_report_leaves_no_new_folder(verb, tiny_run, tmp_path, capsys, monkeypatch):
    import cascadenet.utils.files as F

    out = tmp_path / "out"
    out.mkdir()
    run = tiny_run
    if verb == "plot":  # it draws evaluations
        run = copy_run(tiny_run, tmp_path / "run")
        assert main(["eval", str(run)]) == 0
        capsys.readouterr()
    argv = _reporting_verbs(run, out)[verb]
    if verb == "typicality":  # the estimator's work is not what this test is about
        import cascadenet.properties.typicality as T

        monkeypatch.setattr(T, "_figure_png", lambda result: b"figure")
    monkeypatch.setattr(F, "tempfile", _FullDisk)
    assert main(argv) == 2, verb
    line = err_line(capsys)
    assert "the disk is full" in line and str(out / "new" / "report") in line, line
    if verb == "typicality":  # its estimator's cache could not be written either: nothing at all was kept
        assert not (out / "new").exists() or not any((out / "new").rglob("*.json")), list((out / "new").rglob("*"))
    else:
        assert list(out.iterdir()) == [], list(out.rglob("*"))


def test_atomic_write_all_keeps_every_old_file_when_one_fails(tmp_path, monkeypatch):
    import errno

    import cascadenet.utils.files as F

    a, b = tmp_path / "a.json", tmp_path / "b.png"
    a.write_bytes(b"old a")
    b.write_bytes(b"old b")
    real = F._temporary
    calls = []

    def second_fails(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "the disk is full", str(path))
        return real(path, data)

    monkeypatch.setattr(F, "_temporary", second_fails)
    with pytest.raises(OSError, match="the disk is full"):
        F.atomic_write_all({a: b"new a", b: b"new b"})
    assert a.read_bytes() == b"old a" and b.read_bytes() == b"old b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.png"]  # no temporary left
    monkeypatch.setattr(F, "_temporary", real)
    F.atomic_write_all({a: b"new a", b: b"new b"})
    assert a.read_bytes() == b"new a" and b.read_bytes() == b"new b"


def test_new_folder_removes_only_what_it_made(tmp_path):
    from cascadenet.utils.files import new_folder

    (tmp_path / "had").mkdir()
    (tmp_path / "had" / "file").write_text("x")
    with pytest.raises(RuntimeError), new_folder(tmp_path / "had" / "a" / "b"):
        raise RuntimeError("refused")
    assert sorted(p.name for p in (tmp_path / "had").iterdir()) == ["file"]
    with pytest.raises(RuntimeError), new_folder(tmp_path / "c" / "d") as d:
        (d / "kept").write_text("partial work is not removed")
        raise RuntimeError("failed")
    assert (tmp_path / "c" / "d" / "kept").exists()
    with new_folder(tmp_path / "e" / "f") as f:
        assert f.is_dir()
    assert (tmp_path / "e" / "f").is_dir()


# ---------------------------------------------------------------------------------------------------------------
# second round: the activations of the batch asked for are part of the estimate


def _saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """What a real forward pass keeps for the backward pass: each storage once, the weights not."""
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(kept.values())


def test_activation_estimate_matches_a_real_forward():
    from cascadenet.models.cascade import CascadeConfig
    from cascadenet.models.footprint import activation_bytes
    from cascadenet.models.msdnet import MSDNetConfig
    from cascadenet.models.sdn import SDNConfig

    for cfg, shape in ((CascadeConfig(width=4, num_classes=10, in_channels=1), (1, 28, 28)),
                       (CascadeConfig(arch="resnet10", width=8, num_classes=10, num_steps=9), (3, 32, 32)),
                       (SDNConfig(width=8, num_classes=10), (3, 32, 32)),
                       (MSDNetConfig(num_blocks=4, num_classes=10), (3, 32, 32))):  # fmt: skip
        per_example, largest = activation_bytes(cfg, shape)
        torch.manual_seed(0)
        model = cfg.build().train()
        real = (_saved_bytes(model, torch.randn(6, *shape)) - _saved_bytes(model, torch.randn(2, *shape))) / 4
        assert 0.9 * real <= per_example <= 1.1 * real, (cfg, real, per_example)
        assert 0 < largest < per_example


def test_an_absurd_batch_size_is_refused_before_allocating(tmp_path, capsys, monkeypatch):
    import cascadenet.utils.memory as M
    from cascadenet.models.footprint import check_training_fits
    from cascadenet.runs.config import TrainConfig

    monkeypatch.setattr(M, "available_bytes", lambda: 4 * 10**9)  # a 4 GB machine, whatever this one has
    argv = ["train", "--dataset", "synthetic", "--synthetic-size", "8192", "--batch-size", "8192", "--width", "16",
            "--epochs", "1", "--threads", "1", "--no-progress", "--out", str(tmp_path / "runs")]  # fmt: skip
    assert main(argv) == 2
    line = err_line(capsys)
    assert "with --batch-size 8192 (" in line and "of activations per example) would need at least" in line, line
    assert "choose a smaller --batch-size" in line and "4 GB available" in line, line
    assert not (tmp_path / "runs").exists()
    # the defaults (Fashion-MNIST's shape) fit such a machine easily
    model = TrainConfig().model
    model = type(model)(**{**model.__dict__, "num_classes": 10, "in_channels": 1})
    check_training_fits(model, (1, 28, 28), TrainConfig().batch_size, TrainConfig().eval_batch_size)


# ---------------------------------------------------------------------------------------------------------------
# second round: real full and read-only disks (a tmpfs in a user and mount namespace), every writing verb


def _mounts_allowed() -> bool:
    import subprocess
    import sys

    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)  # fmt: skip
    return probe.returncode == 0


@pytest.mark.slow  # about 3 minutes on 2 busy cores: 13 verbs, 4 or 5 commands each
@pytest.mark.skipif(not _mounts_allowed(), reason="cannot mount a tmpfs in a user+mount namespace here")
def test_every_writing_verb_on_a_full_and_a_read_only_disk(tmp_path):
    import os
    import subprocess
    import sys

    here = Path(__file__).resolve().parent
    disk = tmp_path / "disk"
    disk.mkdir()
    env = {**os.environ, "PYTHONPATH": str(here.parent / "src")}
    p = subprocess.run(["unshare", "-rm", sys.executable, str(here / "disk_faults.py"), str(disk)],
                       capture_output=True, text=True, env=env, timeout=1200)  # fmt: skip
    results = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert [r["verb"] for r in results] == [
        "train",
        "eval",
        "calibrate",
        "recalibrate",
        "plot",
        "predict",
        "export",
        "noise",
        "policy",
        "ood",
        "typicality",
        "guarantees",
        "reproduce",
    ], p.stderr
    assert p.returncode == 0 and all(r["ok"] for r in results), [r for r in results if not r["ok"]]


def test_synthetic_images_count_every_copy_drawing_them(monkeypatch):
    """The campaign's one traceback: 96 synthetic images of 1000x1000 under a 6 GB cap passed the estimate (one
    float64 plane per image) and died in the allocator (three float64 copies of the images live at once)."""
    import cascadenet.utils.memory as M
    from cascadenet.data.datasets import load_dataset
    from cascadenet.utils.memory import MemoryEstimateError

    monkeypatch.setattr(M, "available_bytes", lambda: 10**9)
    with pytest.raises(MemoryEstimateError, match=r"--synthetic-size 96 of 400x400 images would need at least 1.2"):
        load_dataset("synthetic", None, "train", image_size=400, synthetic_size=96)
