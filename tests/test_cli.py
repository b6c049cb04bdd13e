"""One command-line convention for every verb: the shared flags wherever they apply, --flag/--no-flag booleans
(tri-state ones too), one error line for parse errors, no output file replaced without --overwrite, and quiet
exits when the reader of stdout goes away."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cascadenet.cli import main
from cascadenet.cli.commands import VERBS
from cascadenet.cli.parsing import parse, verb_flags

FIXTURE = Path(__file__).parent / "fixtures" / "run-format1"
SRC = Path(__file__).parents[1] / "src"


@pytest.fixture
def run(tmp_path):
    """A finished run (a ResNet-10 of width 2 on 64 synthetic images, val split included) that tests may write in."""
    shutil.copytree(FIXTURE, tmp_path / "run")
    return tmp_path / "run"


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cascadenet: error: "), err
    return err.removeprefix("cascadenet: error: ").rstrip("\n")


# ---- parse errors: one line, exit 2 ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--epoch", "3"], "unknown option --epoch (did you mean --epochs?)"),
        (["train", "--epoch=3"], "unknown option --epoch (did you mean --epochs?)"),
        (["eval", "RUN", "--batchsize", "8"], "unknown option --batchsize (did you mean --batch-size?)"),
        (["predict", "RUN", "--thresold", "0.9"], "unknown option --thresold (did you mean --threshold?)"),
        (["plot", "RUN", "--ouptut", "f.png"], "unknown option --ouptut (did you mean --output?)"),
        (["noise", "RUN", "--sigma", "0.1"], "unknown option --sigma (did you mean --sigmas?)"),
        (["recalibrate", "RUN", "--no-progres"], "unknown option --no-progres (see cascadenet recalibrate --help)"),
        (["trian"], "unknown command 'trian' (did you mean train?)"),
        (["eval"], "missing RUN_DIR (see cascadenet eval --help)"),
        (["convert", "r.pth"], "missing --output (see cascadenet convert --help)"),
        (["eval", "RUN", "extra"], "unexpected argument 'extra' (see cascadenet eval --help)"),
        (["eval", "RUN", "--batch-size", "x"], "--batch-size: invalid value 'x' (expected INT)"),
        (["eval", "RUN", "--batch-size"], "--batch-size: missing value (expected INT)"),
        (["eval", "RUN", "--split", "dev"], "--split: invalid choice 'dev' (choose from test, val, train)"),
        (["noise", "RUN", "--burst", "1"], "--burst: invalid value '1' (expected INT INT)"),
    ],
)
def test_parse_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    assert error_line(capsys) == message


def test_a_typo_is_matched_against_the_verbs_own_flags_only(capsys):
    # a flag of train, not of eval (--epochs would now be taken for eval's --poe)
    assert main(["eval", "RUN", "--momentum", "3"]) == 2
    assert error_line(capsys) == "unknown option --momentum (see cascadenet eval --help)"
    assert main([]) == 2
    assert error_line(capsys).startswith("missing command: one of train, eval, predict")


@pytest.mark.parametrize("verb", list(VERBS))
def test_the_flags_suggested_are_the_flags_tyro_makes(verb, capsys):
    """verb_flags reads the dataclass as tyro does: the same set as the help lists (a wrong set would suggest
    flags that do not exist, or miss some)."""
    assert main([verb, "--help"]) == 0
    listed = set()
    for line in capsys.readouterr().out.splitlines():
        entry = re.match(r"  (--?[a-z].*?)(?:\s{2,}|$)", line)  # an entry (2 spaces), not a help line (more)
        if entry:
            listed |= {part.split()[0] for part in entry.group(1).split(", ")}
    assert listed == set(verb_flags(VERBS[verb]))


def test_without_tyros_error_hook_errors_are_still_one_line(monkeypatch, capsys):
    """The hook is private to tyro (>= 1.0.14): without it, typos are found from the verb's flags and any other
    error is tyro's box squeezed onto one line."""
    import contextlib

    from cascadenet.cli import parsing

    monkeypatch.setattr(parsing, "_on_parse_error", lambda hook: contextlib.nullcontext())
    assert main(["train", "--epoch", "3"]) == 2
    assert error_line(capsys) == "unknown option --epoch (did you mean --epochs?)"
    assert main(["eval", "RUN", "--split", "dev"]) == 2
    message = error_line(capsys)
    assert "dev" in message and "--split" in message and "╭" not in message
    assert main(["eval"]) == 2
    message = error_line(capsys)
    assert "RUN_DIR" in message and "--help" not in message and "│" not in message


def test_help_exits_0_and_a_closed_pipe_is_quiet(tmp_path):
    # `cascadenet train --help | head -1`: the reader is gone before the help is written
    proc = subprocess.Popen([sys.executable, "-m", "cascadenet", "train", "--help"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(SRC)})  # fmt: skip
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


def test_broken_pipe_in_process(monkeypatch, capsys):
    class ClosedPipe(io.StringIO):  # a stdout whose reader has gone; no file descriptor
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["models"]) == 141
    assert main(["eval", "--help"]) == 141
    assert capsys.readouterr().err == ""


# ---- shared flags ------------------------------------------------------------------------------------------------

SHARED = {"--data-root": "/d", "--device": "cpu", "--threads": "1", "--batch-size": "8"}
RUN_VERBS = {
    "train": [],
    "eval": ["RUN"],
    "predict": ["RUN"],
    "recalibrate": ["RUN"],
    "ood": ["RUN"],
    "noise": ["RUN"],
    "policy": ["RUN"],
    "typicality": ["RUN"],
    "demo": [],
    "reproduce": [],
}


@pytest.mark.parametrize("verb", list(RUN_VERBS))
def test_every_verb_that_runs_a_model_takes_the_shared_flags(verb):
    flags = set(verb_flags(VERBS[verb]))
    assert {"--data-root", "--device", "--threads"} <= flags
    shared = {k: v for k, v in SHARED.items() if k in flags}
    pairs = [["--progress"], ["--no-progress"]] if "--progress" in flags else [[]]
    for pair in pairs:
        cmd = parse([verb, *RUN_VERBS[verb], *[x for kv in shared.items() for x in kv], *pair])
        assert cmd.data_root == "/d" and cmd.device == "cpu" and cmd.threads == 1
        if "--batch-size" in shared:
            assert cmd.batch_size == 8
        if pair:
            assert cmd.progress is (pair == ["--progress"])
    # recalibrate, demo and reproduce have no --batch-size (their recipes fix it); recalibrate no progress bar
    assert ("--batch-size" in flags) == (verb not in ("recalibrate", "demo", "reproduce"))
    assert ("--progress" in flags) == (verb != "recalibrate")


def test_the_shared_flags_have_one_help_text(capsys):
    texts = {}
    for verb in RUN_VERBS:
        main([verb, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        texts[verb] = re.search(r"--threads \{None\}\|INT (.*?) \(default:", out).group(1)
    assert len(set(texts.values())) == 1, texts


def test_tri_state_flags_are_pairs_left_out_automatic():
    assert parse(["train"]).amp is None and parse(["train"]).progress is None
    cmd = parse(["train", "--no-amp", "--no-channels-last", "--no-progress"])
    assert (cmd.amp, cmd.channels_last, cmd.progress) == (False, False, False)
    cmd = parse(["train", "--amp", "--channels-last", "--progress"])
    assert (cmd.amp, cmd.channels_last, cmd.progress) == (True, True, True)
    # the value forms of before still work
    cmd = parse(["train", "--amp", "False", "--channels_last=True", "--progress", "None", "--epochs", "2"])
    assert (cmd.amp, cmd.channels_last, cmd.progress, cmd.epochs) == (False, True, None, 2)
    assert parse(["eval", "RUN", "--progress", "False"]).progress is False


def test_no_flag_takes_true_or_false(capsys):
    for verb in VERBS:
        main([verb, "--help"])
        assert "{None,True,False}" not in capsys.readouterr().out, verb


def test_no_amp_and_no_progress_reach_the_run(tmp_path, capsys):
    args = ["train", "--model", "resnet10", "--width", "2", "--dataset", "synthetic", "--synthetic-size", "64",
            "--epochs", "1", "--max-batches", "1", "--batch-size", "16", "--warmup-epochs", "0.5",
            "--recalibrate-batches", "0", "--out", str(tmp_path), "--name", "r", "--no-amp", "--no-channels-last",
            "--no-progress", "--threads", "1"]  # fmt: skip
    assert main(args) == 0
    stored = json.loads((tmp_path / "r" / "config.json").read_text())["train"]
    assert (stored["amp"], stored["channels_last"], stored["progress"]) == (False, False, False)


def test_progress_flags_mean_what_they_say(run, capsys):
    assert main(["eval", str(run), "--device", "cpu", "--progress"]) == 0
    assert "it/s]" in capsys.readouterr().err
    assert main(["eval", str(run), "--device", "cpu", "--no-progress"]) == 0
    assert "it/s]" not in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["eval", "predict"])
def test_threads_sets_torchs_threads(run, verb, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert main([verb, str(run), "--device", "cpu", "--threads", "1"]) == 0
    assert calls == [1]
    assert main([verb, str(run), "--threads", "0"]) == 2
    assert error_line(capsys) == "--threads must be >= 1, got 0"


# ---- never replacing the user's files ----------------------------------------------------------------------------


def test_plot_refuses_an_existing_file_without_overwrite(run, tmp_path, capsys):
    assert main(["eval", str(run), "--device", "cpu"]) == 0
    figure = tmp_path / "mine.png"
    figure.write_bytes(b"my figure")
    assert main(["plot", str(run), "-o", str(figure)]) == 2
    assert error_line(capsys) == f"{figure} exists; pass --overwrite to replace it (nothing was written)"
    assert figure.read_bytes() == b"my figure" and sorted(p.name for p in tmp_path.iterdir()) == ["mine.png", "run"]
    assert main(["plot", str(run), "-o", str(figure), "--overwrite"]) == 0
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(run), "-o", str(tmp_path / "new.pdf")]) == 0  # a new file needs no --overwrite
    assert (tmp_path / "new.pdf").read_bytes()[:5] == b"%PDF-"


def test_recalibrate_twice_names_the_ways_out(run, capsys):
    args = ["recalibrate", str(run), "--batches", "1", "--device", "cpu"]
    assert main(args) == 0
    target = run / "model-recalibrated.safetensors"
    before = target.read_bytes()
    assert main(args) == 2
    message = error_line(capsys)
    assert message.startswith(f"{target} exists (nothing was written)")
    assert "--output model-recalibrated-2.safetensors" in message and "--overwrite" in message
    assert target.read_bytes() == before
    assert main([*args, "--output", "model-recalibrated-2.safetensors"]) == 0
    assert main([*args, "--overwrite"]) == 0
    # the run's own weights never, --overwrite or not
    weights = (run / "model.safetensors").read_bytes()
    assert main([*args, "-o", "model.safetensors", "--overwrite"]) == 2
    assert "the run's own weights are never replaced" in error_line(capsys)
    assert (run / "model.safetensors").read_bytes() == weights


def test_predict_takes_the_val_split(run, tmp_path, capsys):
    out = tmp_path / "val.npz"
    assert main(["predict", str(run), "--split", "val", "--threshold", "0.5", "--device", "cpu", "-o", str(out)]) == 0
    screen = capsys.readouterr().out
    assert "val examples" in screen
    config = json.loads((run / "config.json").read_text())["train"]
    val = round(config["synthetic_size"] * config["val_fraction"])
    import numpy as np

    assert len(np.load(out)["labels"]) == val
