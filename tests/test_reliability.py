"""Reliability: one process per run directory, signals, kills at any moment, a full disk, bad and hostile inputs.

The subprocess tests run the real ``cascadenet`` command through a probe (``PROBE`` below) that reports each loss
computation and each fsync on stderr, so that a test can signal or kill it at a chosen point: a step, or inside a
checkpoint write (between the temporary's fsync and its rename). Each process start costs a few seconds (importing
torch), so the normal suite runs each scenario once and ``-m slow`` repeats the kills at many random points.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import cascadenet.training.loop as T
from cascadenet.cli import given_options, main
from cascadenet.evaluation.evaluate import evaluate
from cascadenet.models.checkpoint import CheckpointError, load_checkpoint, load_model
from cascadenet.runs.lock import LOCK, RunLock, RunLockedError
from cascadenet.training.loop import ConfigError, TrainConfig, TrainingError, train
from test_train import config_of, small_cfg, weights

SRC = Path(__file__).resolve().parents[1] / "src"

# The tiny run of every subprocess test: 7 batches per epoch, a few seconds of training on one thread.
RUN = dict(dataset="synthetic", synthetic_size=256, model="resnet10", width=4, batch_size=32, epochs=2, lr=0.05,
           warmup_epochs=0.5, threads=1, eval_batch_size=128)  # fmt: skip

PROBE = """
import os, signal, sys, time
# as a program started from a terminal: a shell that starts background jobs without job control (CI scripts,
# nohup ... &) makes them ignore SIGINT, and cascadenet (rightly) leaves an ignored signal ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
real_fsync = os.fsync
slow = float(os.environ.get("PROBE_SLOW_CHECKPOINT", "0"))
def fsync(fd):
    real_fsync(fd)
    try:
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        name = "?"
    print(f"PROBE fsync {name}", file=sys.stderr, flush=True)
    if slow and name.startswith(".checkpoint.pt."):
        time.sleep(slow)  # widen the window between the temporary's fsync and its rename
os.fsync = fsync
import cascadenet.training.loop as T
real_loss, calls = T.compute_loss, [0]
def compute_loss(*args):
    calls[0] += 1
    print(f"PROBE loss {calls[0]}", file=sys.stderr, flush=True)
    time.sleep(float(os.environ.get("PROBE_STEP_SLEEP", "0")))
    return real_loss(*args)
T.compute_loss = compute_loss
from cascadenet.cli import main
sys.exit(main(sys.argv[1:]))
"""


def cli_args(run: Path, **options) -> list[str]:
    """``cascadenet train`` flags for RUN's options (plus ``options``), writing to ``run``."""
    args = []
    for k, v in {**RUN, **options}.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return [*args, "--out", str(run.parent), "--name", run.name]


def reference(tmp_path: Path, **options) -> dict[str, torch.Tensor]:
    """Weights of the same run trained in this process without interruption."""
    opts = {k: v for k, v in {**RUN, **options}.items() if k not in ("threads", "checkpoint_every")}
    return weights(train(config_of(**opts, out=str(tmp_path / "reference"), name="run")))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Probe:
    """A ``cascadenet`` process run through PROBE; ``wait_for`` reads its stderr up to a marker."""

    def __init__(self, tmp_path: Path, args: list[str], **env: str) -> None:
        script = tmp_path / "probe.py"
        script.write_text(PROBE)
        environ = {**os.environ, "PYTHONPATH": str(SRC), **env}
        self.proc = subprocess.Popen([sys.executable, str(script), *args], stderr=subprocess.PIPE, text=True,
                                     env=environ, cwd=tmp_path)  # fmt: skip
        self.lines: list[str] = []

    def wait_for(self, predicate, timeout: float = 60) -> str | None:
        """Read stderr lines until one satisfies ``predicate`` (returned), or the process ends (None)."""
        deadline = time.monotonic() + timeout
        for line in self.proc.stderr:
            self.lines.append(line)
            if predicate(line):
                return line
            assert time.monotonic() < deadline, "".join(self.lines[-20:])
        return None

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        rest = self.proc.communicate(timeout=timeout)[1]
        return self.proc.returncode, "".join(self.lines) + rest

    def user_lines(self, stderr: str) -> list[str]:
        return [line for line in stderr.splitlines() if not line.startswith("PROBE")]


def loss_call(n: int):
    return lambda line: line.strip() == f"PROBE loss {n}"


# ----------------------------------------------------------------------------------------------------------------
# One live process per run directory


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_lock_refuses_a_second_owner_and_names_it(tmp_path):
    with RunLock.acquire(tmp_path):
        record = json.loads((tmp_path / LOCK).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(RunLockedError, match=f"in use by process {os.getpid()} on {socket.gethostname()}"):
            RunLock.acquire(tmp_path)
    assert not (tmp_path / LOCK).exists()  # released: the file goes with it
    RunLock.acquire(tmp_path).release()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    record = {"pid": dead_pid(), "host": socket.gethostname(), "since": 0}
    (tmp_path / LOCK).write_text(json.dumps(record))
    with RunLock.acquire(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert f"stale lock of process {record['pid']}" in caplog.text


def test_lock_without_flock_decides_by_the_record(tmp_path, monkeypatch):
    """Where flock does not work (some network file systems), the PID and host decide."""
    import cascadenet.runs.lock as R

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(R.fcntl, "flock", no_flock)
    lock = tmp_path / LOCK
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))  # alive, here
    with pytest.raises(RunLockedError, match=f"process {os.getppid()}"):
        RunLock.acquire(tmp_path)
    lock.write_text(json.dumps({"pid": 1234, "host": "elsewhere"}))  # cannot be checked from here
    with pytest.raises(RunLockedError, match=f"if that process is gone, remove {lock}"):
        RunLock.acquire(tmp_path)
    lock.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))  # stale
    RunLock.acquire(tmp_path).release()
    assert not lock.exists()


def test_resume_while_another_process_trains_is_refused(tmp_path):
    run = train(small_cfg(tmp_path, epochs=1))
    before = (run / "checkpoint.pt").read_bytes()
    with RunLock.acquire(run), pytest.raises(TrainingError, match="is in use by process"):
        train(resume=run)
    claimed = tmp_path / "claimed"  # another process has just claimed this name and not yet written anything
    claimed.mkdir()
    with RunLock.acquire(claimed), pytest.raises(TrainingError, match="in use"):
        train(small_cfg(tmp_path, epochs=1, name="claimed"))
    assert claimed.is_dir()  # the refused run did not remove the directory it did not create
    assert (run / "checkpoint.pt").read_bytes() == before


def test_two_runs_started_at_once_on_one_directory(tmp_path):
    """Both start together; exactly one trains, the other exits 2 naming the owner; the run is whole."""
    run = tmp_path / "runs" / "same"
    # each checkpoint write is slowed down, so that the winner still holds the directory when the other arrives
    probes = [Probe(tmp_path, ["train", *cli_args(run, epochs=1)], PROBE_SLOW_CHECKPOINT="1") for _ in range(2)]
    results = [p.finish() for p in probes]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    winner = next(p for p, (rc, _) in zip(probes, results) if rc == 0)
    loser_err = next(p.user_lines(err) for p, (rc, err) in zip(probes, results) if rc == 2)
    assert len(loser_err) == 1 and loser_err[0].startswith("cascadenet: error:")
    assert f"in use by process {winner.proc.pid}" in loser_err[0], loser_err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]
    assert not (run / LOCK).exists()


# ----------------------------------------------------------------------------------------------------------------
# Signals and kills: a real process, resumed each time, ends with the uninterrupted weights


def test_sigterm_and_sigint_checkpoint_and_resume_to_identical_weights(tmp_path):
    run = tmp_path / "runs" / "sig"
    p = Probe(tmp_path, ["train", *cli_args(run)])
    assert p.wait_for(loss_call(5))  # the 5th loss: 4 steps done, no checkpoint yet (--checkpoint-every 0)
    p.proc.send_signal(signal.SIGTERM)
    rc, err = p.finish()
    assert rc == 143, err
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["epoch"] == 0 and 4 <= ckpt["batch"] <= 5
    assert [line for line in p.user_lines(err) if "SIGTERM" in line] == [
        f"terminated (SIGTERM) after {ckpt['batch']} batches of epoch 1; checkpoint saved; continue with: "
        f"cascadenet train --resume {run}"
    ]
    p = Probe(tmp_path, ["train", "--resume", str(run), "--epochs", "2", "--threads", "1"])  # --epochs 2: as stored
    assert p.wait_for(loss_call(6))  # 6 more steps: into epoch 2
    p.proc.send_signal(signal.SIGINT)
    rc, err = p.finish()
    assert rc == 130, err
    assert load_checkpoint(run / "checkpoint.pt")["step"] > ckpt["step"]
    assert not (run / LOCK).exists()
    resumed = train(resume=run)
    assert same_weights(weights(resumed), reference(tmp_path))
    full = [json.loads(r) for r in (tmp_path / "reference" / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    # the epochs' train loss covers all of their batches, across the interruptions
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in full]


def nth_checkpoint_write(n: int):
    writes = []

    def predicate(line: str) -> bool:
        if line.startswith("PROBE fsync .checkpoint.pt."):
            writes.append(line)
        return len(writes) == n

    return predicate


def kill_and_resume(tmp_path: Path, points: list) -> None:
    """Start the run, SIGKILL it at each point (resuming each time), finish it, compare with the reference."""
    run = tmp_path / "runs" / "k"
    args = ["train", *cli_args(run, checkpoint_every=3)]
    for point in points:
        slow = "2" if point == "checkpoint" else "0"
        p = Probe(tmp_path, args, PROBE_SLOW_CHECKPOINT=slow)
        if point == "checkpoint":  # inside the 2nd checkpoint write: the temporary is complete, not yet renamed
            seen = p.wait_for(nth_checkpoint_write(2))
        else:
            steps, delay = point
            seen = p.wait_for(loss_call(steps))
            time.sleep(delay)
        p.proc.kill()
        p.finish()
        assert seen, "the process ended before the kill point"
        if point == "checkpoint":
            assert any(f.name.startswith(".checkpoint.pt.") for f in run.iterdir())  # what a kill leaves
            assert load_checkpoint(run / "checkpoint.pt")["step"] == 3  # and the previous checkpoint, whole
        args = ["train", "--resume", str(run), "--threads", "1"]
    resumed = train(resume=run)
    assert not [f.name for f in run.iterdir() if f.name.startswith(".")]  # the resume removed the temporaries
    assert same_weights(weights(resumed), reference(tmp_path))
    rows = [json.loads(r)["epoch"] for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2]


def test_sigkill_inside_a_checkpoint_write_then_resume(tmp_path):
    kill_and_resume(tmp_path, ["checkpoint"])


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_sigkill_at_random_points_then_resume(tmp_path, seed):
    rng = random.Random(seed)
    # each resumed process counts its own steps; 3 kills of at most 3 steps each leave the run unfinished
    kill_and_resume(tmp_path, ["checkpoint", *[(rng.randint(1, 3), rng.uniform(0, 0.05)) for _ in range(3)]])


# ----------------------------------------------------------------------------------------------------------------
# Interruptions inside the loop (in-process)


def test_interrupt_during_validation_loses_nothing(tmp_path, monkeypatch):
    full = train(small_cfg(tmp_path / "a", epochs=2))
    real = T.dataset_logits

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "dataset_logits", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(small_cfg(tmp_path / "b", epochs=2))
    run = tmp_path / "b" / "run"
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (1, 0, 7)  # the epoch was checkpointed before validating
    assert not (run / "metrics.jsonl").exists()
    monkeypatch.setattr(T, "dataset_logits", real)
    resumed = train(resume=run)
    assert same_weights(weights(resumed), weights(full))
    a = [json.loads(r) for r in (full / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(r) for r in (resumed / "metrics.jsonl").read_text().splitlines()]
    drop = ("seconds", "train_images_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == [
        {k: v for k, v in r.items() if k not in drop} for r in b
    ]


def test_stale_temporaries_are_removed_on_resume_and_only_ours(tmp_path):
    run = train(small_cfg(tmp_path, epochs=1))
    ours = [".checkpoint.pt.x1.tmp", ".metrics.jsonl.x2.tmp", ".config.json.x3.tmp", ".model.safetensors.x4.tmp"]
    others = [".eval.json.x5.tmp", "notes.tmp"]
    for name in ours + others:
        (run / name).write_bytes(b"x" * 100)
    train(resume=run)
    assert sorted(f.name for f in run.iterdir() if "tmp" in f.name) == sorted(others)


def test_a_run_stopped_before_its_first_checkpoint_leaves_nothing(tmp_path, monkeypatch):
    def nan_loss(*args):
        return torch.tensor(float("nan"), requires_grad=True)

    monkeypatch.setattr(T, "compute_loss", nan_loss)
    with pytest.raises(TrainingError, match="nothing was checkpointed, so .* was removed"):
        train(small_cfg(tmp_path, epochs=1))
    assert not (tmp_path / "run").exists()

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "compute_loss", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(small_cfg(tmp_path, epochs=1))
    assert not (tmp_path / "run").exists()
    monkeypatch.undo()
    # a kill -9 before the first checkpoint leaves config.json (and a stale lock): the same command starts again
    run = tmp_path / "run"
    run.mkdir()
    cfg = small_cfg(tmp_path, epochs=1)
    (run / "config.json").write_text(json.dumps({"train": cfg.to_dict()}))
    (run / LOCK).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    with pytest.raises(TrainingError, match="already exists"):  # another command does not
        train(small_cfg(tmp_path, epochs=1, lr=0.01))
    assert train(cfg) == run and (run / "model.safetensors").is_file()


def test_full_disk_keeps_the_last_checkpoint_and_resumes_identically(tmp_path, monkeypatch):
    """Simulated in-process (the real thing is test_full_tmpfs): the second checkpoint write finds no space."""
    full = train(small_cfg(tmp_path / "a", epochs=2, checkpoint_every=3))
    real, calls = T.save_checkpoint, {"n": 0}

    def no_space(path, state):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, state)

    monkeypatch.setattr(T, "save_checkpoint", no_space)
    with pytest.raises(TrainingError, match="the disk is full; the last checkpoint \\(step 3\\) was kept") as e:
        train(small_cfg(tmp_path / "b", epochs=2, checkpoint_every=3))
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    resumed = train(resume=tmp_path / "b" / "run")
    assert same_weights(weights(resumed), weights(full))


def _namespace_ok() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)  # fmt: skip
    return probe.returncode == 0


needs_mounts = pytest.mark.skipif(not _namespace_ok(), reason="cannot mount a tmpfs in a user+mount namespace here")


def in_tmpfs(tmp_path: Path, size: str, args: list[str], readonly: bool = False) -> subprocess.CompletedProcess:
    """Run ``cascadenet ARGS`` with ``tmp_path/disk`` a private tmpfs of ``size`` (read-only if asked); the
    tmpfs's content is copied to ``tmp_path/copy`` afterwards."""
    disk, copy = tmp_path / "disk", tmp_path / "copy"
    disk.mkdir()
    remount = f"mount -o remount,ro {disk} && " if readonly else ""
    cmd = " ".join([sys.executable, "-m", "cascadenet", *args])
    script = (f"mount -t tmpfs -o size={size} tmpfs {disk} && {remount}"
              f"{{ {cmd}; rc=$?; cp -a {disk} {copy}; exit $rc; }}")  # fmt: skip
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=120)  # fmt: skip


@needs_mounts
def test_full_tmpfs(tmp_path):
    """A real full disk: a 400 KB tmpfs holds one checkpoint (~210 KB) but not its replacement's temporary."""
    result = in_tmpfs(tmp_path, "400k", ["train", *cli_args(tmp_path / "disk" / "run", checkpoint_every=3)])
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(err) == 1, result.stderr
    assert "the disk is full; the last checkpoint (step 3) was kept" in err[0]
    run = tmp_path / "copy" / "run"
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 3
    assert not [f for f in run.iterdir() if f.name.startswith(".checkpoint")]  # the failed temporary was removed
    resumed = train(resume=run)
    assert same_weights(weights(resumed), reference(tmp_path))


@needs_mounts
def test_read_only_output_folder(tmp_path):
    result = in_tmpfs(tmp_path, "1m", ["train", *cli_args(tmp_path / "disk" / "run")], readonly=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"cascadenet: error: {tmp_path / 'disk'}: cannot create the run directory {tmp_path / 'disk' / 'run'} "
        "there (not writable)"
    )


# ----------------------------------------------------------------------------------------------------------------
# What a run directory holds must agree with itself


def test_foreign_model_files_are_refused(tmp_path, capsys):
    run = train(small_cfg(tmp_path, epochs=1))
    other = train(small_cfg(tmp_path, epochs=1, name="other", model="resnet18"))
    before = {f.name: f.read_bytes() for f in run.iterdir()}
    shutil.copy(other / "model.safetensors", run / "model.safetensors")
    with pytest.raises(TrainingError, match="model.safetensors holds another model than .*model resnet18 vs resnet10"):
        train(resume=run)
    with pytest.raises(CheckpointError, match="model.safetensors holds another model .*arch resnet18 vs resnet10"):
        evaluate(run)
    assert main(["eval", str(run)]) == 2 and "holds another model" in capsys.readouterr().err
    (run / "model.safetensors").write_bytes(before["model.safetensors"])
    shutil.copy(other / "checkpoint.pt", run / "checkpoint.pt")
    with pytest.raises(TrainingError, match="checkpoint.pt holds another model than .*config.json"):
        train(resume=run)
    assert (run / "model.safetensors").read_bytes() == before["model.safetensors"]  # nothing was replaced


def test_save_logits_is_checked_before_evaluating_and_never_overwrites(tmp_path, monkeypatch):
    run = train(small_cfg(tmp_path, epochs=1))
    with pytest.raises(ValueError, match="the folder .*missing of --save-logits does not exist"):
        evaluate(run, save_logits=tmp_path / "missing" / "x.npz")
    assert not (run / "eval.json").exists()  # refused before evaluating
    import cascadenet.evaluation.evaluate as E

    real = E.dataset_logits

    def a_file_appears_meanwhile(*args, **kwargs):
        (tmp_path / "x.npz").write_text("mine")
        return real(*args, **kwargs)

    monkeypatch.setattr(E, "dataset_logits", a_file_appears_meanwhile)
    with pytest.raises(FileExistsError):
        evaluate(run, save_logits=tmp_path / "x.npz")
    assert (tmp_path / "x.npz").read_text() == "mine"
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".x.npz")]


def test_a_run_of_the_first_release_resumes_and_evaluates(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(Path(__file__).parent / "fixtures" / "run-format1", run)
    before = (run / "model.safetensors").read_bytes()
    assert train(resume=run) == run  # finished: nothing to train, nothing rewritten
    assert (run / "model.safetensors").read_bytes() == before
    result = evaluate(run)
    expected = json.loads((run / "expected-eval.json").read_text())
    assert result["accuracy_per_step"] == expected["accuracy_per_step"]


def write_fashion(root: Path, n: int, seed: int) -> None:
    from test_data import write_idx

    rng = np.random.default_rng(seed)
    write_idx(root, "train", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 10, gz=False)


def test_resume_with_another_dataset_is_refused(tmp_path):
    write_fashion(tmp_path / "a", 60, 0)
    write_fashion(tmp_path / "b", 80, 1)
    cfg = config_of(model="resnet10", width=4, dataset="fashion-mnist", data_root=str(tmp_path / "a"), epochs=1,
                    batch_size=16, warmup_epochs=0.5, max_batches=2, out=str(tmp_path), name="run")  # fmt: skip
    run = train(cfg)
    with pytest.raises(TrainingError, match="holds 80 images of 1x28x28 in 10 classes, but .* trained on 60 images"):
        train(resume=run, overrides={"data_root": str(tmp_path / "b")})
    write_fashion(tmp_path / "c", 60, 2)  # same shape and count, other images
    with pytest.raises(TrainingError, match="resume with the data it was trained on"):
        train(resume=run, overrides={"data_root": str(tmp_path / "c")})
    shutil.copytree(tmp_path / "a", tmp_path / "moved")  # the same data elsewhere is fine
    train(resume=run, overrides={"data_root": str(tmp_path / "moved")})


# ----------------------------------------------------------------------------------------------------------------
# Options: compared with what was given, checked before anything is written


def test_given_options_are_the_flags_typed():
    argv = ["--epochs", "30", "--no-augment", "--data_root=/x", "--model", "resnet10", "--resume", "r", "--", "--lr"]
    assert given_options(argv) == {"epochs", "augment", "data_root", "model"}


def test_resume_compares_given_options_with_the_stored_ones(tmp_path, capsys):
    run = train(small_cfg(tmp_path, epochs=1))
    assert main(["train", "--resume", str(run), "--epochs", "30"]) == 2  # 30 is the default, not the stored 1
    assert "--epochs cannot change" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--model", "resnet18"]) == 2  # the default model, not resnet10
    assert "--model cannot change" in capsys.readouterr().err
    # equal to the stored values, or allowed to change: accepted
    assert main(["train", "--resume", str(run), "--epochs", "1", "--width", "4", "--threads", "1"]) == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[]", "a configuration is a JSON object of options, got list"),
        ('"x"', "got str"),
        ('{"epochs": "2"}', "--epochs must be an integer, got '2'"),
        ('{"epochs": 1.5}', "--epochs must be an integer, got 1.5"),
        ('{"lr": "fast"}', "--lr must be a number, got 'fast'"),
        ('{"augment": "false"}', "--augment must be true or false, got 'false'"),
        ('{"model": {"format": 2, "family": "cascaded-resnet", "width": "4"}}', "width must be an integer"),
        ('{"model": 5}', "model must be a model name or a model configuration"),
        ('{"epochs": 2, "bogus": 1}', "unknown configuration keys: bogus"),
        ("{", "not JSON"),
        ("[" * 100000, "not JSON"),
    ],
)
def test_bad_config_files_are_one_line_and_write_nothing(tmp_path, monkeypatch, capsys, content, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.json").write_text(content)
    assert main(["train", "--config", "c.json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cascadenet: error: c.json: ") and message in err and "\n" not in err, err
    assert list(tmp_path.iterdir()) == [tmp_path / "c.json"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--out", "afile"], "afile is a file, not a folder: --out must name a folder"),
        (["--name", "afile", "--out", "."], "afile exists and is not a directory"),
        (["--batch-size", "1000"], "--batch-size 1000 is larger than the training set"),
        (
            ["--warmup-epochs", "0.99", "--epochs", "1", "--batch-size", "16", "--max-batches", "3"],
            "is 3 steps, the whole run (3 steps): the learning rate would never decay",
        ),
        (["--num-steps", "1"], "--num-steps 1 leaves no step that sees the input"),
        (["--temporal-affine", "--no-temporal-bn"], "--temporal-affine needs --temporal-bn"),
    ],
)
def test_bad_targets_and_combinations_are_refused_up_front(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("mine")
    base = ["train", "--dataset", "synthetic", "--synthetic-size", "64", "--model", "resnet10", "--width", "4"]
    assert main([*base, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cascadenet: error:") and message in err and "\n" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] and (tmp_path / "afile").read_text() == "mine"


# ----------------------------------------------------------------------------------------------------------------
# Hostile files


def test_malicious_checkpoint_is_refused_unread(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    run = train(small_cfg(tmp_path, epochs=1))
    (run / "model.safetensors").unlink()
    (run / "checkpoint.pt").write_bytes(pickle.dumps(Evil()))
    capsys.readouterr()
    with pytest.raises(CheckpointError, match="not a cascadenet checkpoint .*nothing in it was run"):
        load_model(run)
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "weights_only" not in err and "not a cascadenet checkpoint" in err
    with pytest.raises(CheckpointError, match="not a cascadenet checkpoint"):
        train(resume=run)
    assert not marker.exists()


def test_training_configs_from_python_are_type_checked():
    with pytest.raises(ValueError, match="--augment must be true or false"):
        TrainConfig(augment="false")
    with pytest.raises(ValueError, match="--lr must be a finite number"):
        TrainConfig(lr=float("inf"))
    assert TrainConfig(lr=1, epochs=np.int64(3)).lr == 1  # integers are numbers; numpy integers are integers
    with pytest.raises(ConfigError):
        TrainConfig.from_file(Path(__file__).parent)  # a directory


def test_cli_errors_on_unreadable_paths_are_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    for argv, message in [
        (["train", "--resume", str(tmp_path / "f" / "x")], "not a run directory"),
        (["eval", str(tmp_path / "f")], "no such run directory"),
        (["train", "--dataset", "cifar10", "--data-root", str(tmp_path / "f")], "not a directory"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("cascadenet: error:") and message in err and "\n" not in err, err
