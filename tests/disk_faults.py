"""Every writing verb on a real full disk and a real read-only one (run by ``tests/test_faults.py`` inside a user
and mount namespace: ``unshare -rm python tests/disk_faults.py DISK [VERB...]``; also by the fault campaign).

DISK becomes a private tmpfs. For each verb: a first run on the good disk (its outputs are "the good files");
then the disk filled to the last byte, and the same command (with ``--overwrite`` where the verb has it) must
fail with one line ``cascadenet: error: ...`` saying that the disk is full (exit 2, no traceback) and leave the
disk exactly as it was: no new file or folder, no temporary, the good files byte for byte; the same on the disk
remounted read-only; then, the disk good again, the command must work. Prints one JSON line per verb and exits
1 if any check failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

FILLER = ".filler"


def snapshot(disk: Path) -> dict[str, str]:
    """Every file and folder under ``disk`` (the filler aside), a file by its content's hash."""
    found = {}
    for path in sorted(disk.rglob("*")):
        rel = str(path.relative_to(disk))
        if rel == FILLER:
            continue
        found[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def fill(disk: Path) -> None:
    """Take every free byte of ``disk``."""
    fd = os.open(disk / FILLER, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for chunk in (1 << 20, 1 << 12, 1):
            try:
                while os.write(fd, b"\0" * chunk):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)


def free(disk: Path) -> None:
    (disk / FILLER).unlink(missing_ok=True)


def mount(disk: Path, options: str) -> None:
    subprocess.run(["mount", "-o", options, "-t", "tmpfs", "tmpfs", str(disk)], check=True)


def command(argv: list[str]) -> tuple[int | str, str]:
    """``cascadenet ARGV`` in this process: its exit status (``traceback`` when an exception escaped) and stderr."""
    from cascadenet.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc: int | str = main(argv)
        except BaseException as e:  # noqa: BLE001 -- anything escaping main is the defect this looks for
            rc, _ = "traceback", err.write(f"Traceback (most recent call last): {type(e).__name__}: {e}")
    return rc, err.getvalue()


def one_line_error(rc: int | str, err: str) -> bool:
    lines = [line for line in err.strip().splitlines() if line]
    return (rc == 2 and "Traceback" not in err and bool(lines) and lines[-1].startswith("cascadenet: error: ")
            and sum(line.startswith("cascadenet: error: ") for line in lines) == 1)  # fmt: skip


def verbs(disk: Path) -> list[tuple[str, list[str], list[str]]]:
    """(name, the command, the flags its repeats add); the run of the first one is the others' input."""
    run, o = disk / "runs" / "t", disk / "out"
    tiny = ["--dataset", "synthetic", "--synthetic-size", "96", "--width", "4", "--epochs", "1", "--batch-size", "16",
            "--max-batches", "2", "--threads", "1", "--no-progress", "--out", str(disk / "runs")]  # fmt: skip
    ow = ["--overwrite"]
    return [
        ("train", ["train", *tiny, "--name", "t"], []),
        ("eval", ["eval", str(run), "--no-progress"], []),
        ("calibrate", ["calibrate", str(run)], ow),
        ("recalibrate", ["recalibrate", str(run), "--batches", "1", "--output", "recal.safetensors"], ow),
        ("plot", ["plot", str(run), "-o", str(o / "fig" / "curves.png")], ow),
        ("predict", ["predict", str(run), "-o", str(o / "pred.npz")], ow),
        ("export", ["export", str(run), "-o", str(o / "model.pt2"), "--program", "trajectory"], ow),
        ("noise", ["noise", str(run), "--sigmas", "0.1", "--max-examples", "16", "--out", str(o / "noise")], ow),
        ("policy", ["policy", str(run), "--out", str(o / "policy")], ow),
        ("ood", ["ood", str(run), "--synthetic-ood", "--out", str(o / "ood")], ow),
        ("typicality", ["typicality", str(run), "--out", str(o / "typ")], ow),
        ("guarantees", ["guarantees", str(run), "--splits", "2", "--out", str(o / "guar")], ow),
        ("reproduce", ["reproduce", "--dataset", "synthetic", "--budget", "small", "--models", "cascaded-td",
                       "--seeds", "1", "--threads", "1", "--no-progress", "--out", str(disk / "repro")], []),
    ]  # fmt: skip


def main(disk: Path, only: list[str]) -> int:
    import cascadenet.experiments.reproduce as R

    # a reproduction small enough for a test (the command's budgets take minutes): "small" made tiny
    R.BUDGETS["small"] = R.Budget(description="tiny", arch="resnet10", width=4, stem="cifar_pool", epochs=1,
                                 batch_size=16, max_batches=2, warmup_epochs=0.5, sweep=(0.0,), lrs=(0.1,),
                                 ic_lrs=(0.1,), tuning_seeds=1)  # fmt: skip
    mount(disk, "size=32m")
    (disk / "out").mkdir()
    failed = 0
    for name, argv, repeat in verbs(disk):
        if only and name not in only and name != "train":
            continue
        checks: dict[str, object] = {}
        if name == "train":  # the run directory must not exist yet: the full disk comes first
            before = snapshot(disk)
            fill(disk)
            rc, err = command(argv)
            free(disk)
            changed = sorted(set(snapshot(disk)) ^ set(before))
            checks["full"] = (
                one_line_error(rc, err) and "the disk is full" in err and not changed or (rc, err[-400:], changed)
            )
            rc, err = command(argv)
            checks["good"] = rc == 0 or (rc, err[-400:])
            argv = [*argv[:-1], "t2"]  # another run for the read-only disk
        else:
            rc, err = command(argv)
            checks["good"] = rc == 0 or (rc, err[-400:])
            argv = argv + repeat
            before = snapshot(disk)
            fill(disk)
            rc, err = command(argv)
            free(disk)
            after = snapshot(disk)
            changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            checks["full"] = (
                one_line_error(rc, err) and "the disk is full" in err and not changed or (rc, err[-400:], changed)
            )
        before = snapshot(disk)
        mount(disk, "remount,ro")
        rc, err = command(argv)
        mount(disk, "remount,rw")
        checks["read-only"] = one_line_error(rc, err) and snapshot(disk) == before or (rc, err[-400:])
        rc, err = command(argv)
        checks["again"] = rc == 0 or (rc, err[-400:])
        ok = all(v is True for v in checks.values())
        failed += not ok
        print(json.dumps({"verb": name, "ok": ok, **{k: v if v is True else repr(v) for k, v in checks.items()}}),
              flush=True)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
