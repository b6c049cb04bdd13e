"""A fault campaign: the ``cascadenet`` command run as a hostile but realistic user and operator would, on tiny runs.

Every case is a real process (a memory cap of ``--mem-gb`` through ``ulimit -v``, so that a case that would
exhaust the machine fails alone), classified as

- ok: the expected exit status, and for a refusal one line ``cascadenet: error: ...`` on stderr;
- defect: another exit status, several lines, or a silent success where a refusal was due;
- traceback: a Python traceback on stderr (always a defect);
- killed: ended by a signal (the memory cap, a segfault).

    python benchmarks/fault_campaign.py --out /tmp/campaign [--kills 4] [--mem-gb 6]

Prints one line per case and the totals (cases, defects, tracebacks, kills), and writes ``campaign.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = ["--dataset", "synthetic", "--synthetic-size", "96", "--width", "4", "--epochs", "2", "--batch-size", "16",
        "--max-batches", "3", "--threads", "1", "--no-progress"]  # fmt: skip


def run(argv: list[str], mem_gb: float, timeout: float = 300, kill_after: float | None = None) -> dict:
    def limit() -> None:
        cap = int(mem_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    env = {**os.environ, "PYTHONPATH": str(SRC)}
    start = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "cascadenet", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=env, preexec_fn=limit)  # fmt: skip
    if kill_after is not None:
        time.sleep(kill_after)
        p.send_signal(signal.SIGKILL)
    timed_out = False
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        timed_out = True
    return {"rc": p.returncode, "out": out.decode(errors="replace"), "err": err.decode(errors="replace"),
            "seconds": round(time.monotonic() - start, 1), "timed_out": timed_out}  # fmt: skip


def classify(result: dict, expect: int | tuple[int, ...] | None) -> str:
    """``expect``: the exit status due, or the statuses allowed (a damaged file that may or may not matter)."""
    err = result["err"]
    if "Traceback (most recent call last)" in err:
        return "traceback"
    if expect is None:  # a kill of our own (SIGKILL at a random moment): anything but a traceback
        return "ok"
    if result.get("timed_out"):
        return "stuck"
    if result["rc"] < 0:
        return "killed"
    allowed = expect if isinstance(expect, tuple) else (expect,)
    if result["rc"] not in allowed:
        return "defect"
    if result["rc"] == 2:
        lines = [line for line in err.splitlines() if line.startswith("cascadenet: error:")]
        if len(lines) != 1 or not err.strip().splitlines()[-1].startswith("cascadenet: error:"):
            return "defect"
    return "ok"


def cases(w: Path) -> list[tuple[str, list[str], int | None, dict]]:
    """(name, argv, expected exit status, options) -- the options ``setup`` (a callable run first)."""
    run_dir = w / "runs" / "tiny"
    unfinished = w / "runs" / "unfinished"

    def corrupt(path: Path, data: bytes):
        return lambda: path.write_bytes(data)

    def copy_run(dest: Path, change=None):
        def make() -> None:
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(run_dir, dest)
            if change:
                change(dest)

        return make

    def stored(key: str, value):
        def change(d: Path) -> None:
            c = json.loads((d / "config.json").read_text())
            c["train"][key] = value
            (d / "config.json").write_text(json.dumps(c))

        return change

    def norm(value):
        def change(d: Path) -> None:
            c = json.loads((d / "config.json").read_text())
            c["normalization"] = value
            (d / "config.json").write_text(json.dumps(c))

        return change

    def metrics(text: str):
        return lambda d: (d / "metrics.jsonl").write_text(text)

    out = ["--out", str(w / "o")]
    lst: list[tuple[str, list[str], int | None, dict]] = [
        # silent wrong results
        ("demo --epochs 0", ["demo", "--epochs", "0", "--out", str(w / "demo")], 2, {}),
        ("ic-only without --init", ["train", *TINY, "--model", "sdn-resnet10", "--loss", "ic-only", *out], 2, {}),
        ("--name ../../x", ["train", *TINY, *out, "--name", "../../x"], 2, {}),
        ("--name a/b", ["train", *TINY, *out, "--name", "a/b"], 2, {}),
        ("predict unfinished", ["predict", str(unfinished)], 2, {}),
        ("noise unfinished", ["noise", str(unfinished), "--sigmas", "0.1", "--out", str(w / "n1")], 2, {}),
        ("policy unfinished", ["policy", str(unfinished), "--out", str(w / "p1")], 2, {}),
        ("ood unfinished", ["ood", str(unfinished), "--synthetic-ood"], 2, {}),
        ("typicality unfinished", ["typicality", str(unfinished), "--out", str(w / "t1")], 2, {}),
        ("eval unfinished (says so)", ["eval", str(unfinished)], 0, {}),
        (
            "resume with damaged position",
            ["train", "--resume", str(w / "pos")],
            2,
            {"setup": copy_run(w / "pos", lambda d: _position(d, epoch=-7, batch=10**9))},
        ),
        # huge values
        ("--synthetic-size 1e10", ["train", *TINY[:2], "--synthetic-size", "10000000000", *out], 2, {}),
        ("--width 1000000", ["train", *TINY, "--width", "1000000", *out], 2, {}),
        ("--image-size 1000000", ["train", *TINY, "--image-size", "1000000", *out], 2, {}),
        ("--num-steps 10^12", ["train", *TINY, "--num-steps", "1000000000000", *out], 2, {}),
        (
            "msdnet --num-blocks 100",
            [
                "train",
                *TINY[:4],
                "--model",
                "msdnet-cifar",
                "--num-blocks",
                "100",
                "--epochs",
                "1",
                "--batch-size",
                "16",
                *out,
            ],
            2,
            {},
        ),  # fmt: skip
        ("eval --num-steps 1e8", ["eval", str(run_dir), "--num-steps", "100000000"], 2, {}),
        ("noise --num-steps 1e8", ["noise", str(run_dir), "--num-steps", "100000000", "--out", str(w / "n2")], 2, {}),
        (
            "config num_steps 10^12",
            ["eval", str(w / "steps")],
            2,
            {"setup": copy_run(w / "steps", lambda d: _meta_steps(d, 10**12))},
        ),
        # bad files
        (
            "corrupt --scores npz",
            ["typicality", str(run_dir), "--scores", str(w / "s.npz"), "--out", str(w / "t2")],
            2,
            {"setup": corrupt(w / "s.npz", b"PK\x03\x04" + b"\0" * 64)},
        ),
        (
            "random checkpoint",
            ["train", "--resume", str(w / "rb")],
            2,
            {
                "setup": copy_run(
                    w / "rb",
                    lambda d: ((d / "model.safetensors").unlink(), (d / "checkpoint.pt").write_bytes(os.urandom(4096))),
                )
            },
        ),  # fmt: skip
        (
            "config std 0",
            ["eval", str(w / "std0")],
            2,
            {"setup": copy_run(w / "std0", norm({"mean": [0.5] * 3, "std": [0.0] * 3}))},
        ),
        (
            "config std of 2 channels",
            ["eval", str(w / "std2")],
            2,
            {"setup": copy_run(w / "std2", norm({"mean": [0.5] * 3, "std": [1.0] * 2}))},
        ),
        (
            "config epochs '2'",
            ["train", "--resume", str(w / "cfg1")],
            2,
            {"setup": copy_run(w / "cfg1", stored("epochs", "2"))},
        ),
        ("config lr NaN", ["eval", str(w / "cfg2")], 2, {"setup": copy_run(w / "cfg2", stored("lr", float("nan")))}),
        ("config threads 0", ["eval", str(w / "cfg3")], 2, {"setup": copy_run(w / "cfg3", stored("threads", 0))}),
        (
            "config batch 10^12",
            ["eval", str(w / "cfg4")],
            0,
            {"setup": copy_run(w / "cfg4", stored("batch_size", 10**12))},
        ),
        ("metrics.jsonl garbage (eval)", ["eval", str(w / "m1")], 0, {"setup": copy_run(w / "m1", metrics("garbage"))}),
        (
            "empty config.json",
            ["eval", str(w / "c0")],
            2,
            {"setup": copy_run(w / "c0", lambda d: (d / "config.json").write_text(""))},
        ),
        ("plot -o without suffix", ["plot", str(run_dir), "-o", str(w / "curves")], 2, {}),
        (
            "plot onto existing",
            ["plot", str(run_dir), "-o", str(w / "exists.png")],
            2,
            {"setup": corrupt(w / "exists.png", b"old")},
        ),
        (
            "ood --ood-dataset without data",
            ["ood", str(run_dir), "--ood-dataset", "cifar10", "--ood-data", str(w / "none")],
            2,
            {},
        ),  # fmt: skip
        (
            "convert --num-steps 1",
            ["convert", str(w / "missing.pth"), "-o", str(w / "c.safetensors"), "--num-steps", "1"],
            2,
            {},
        ),  # fmt: skip
        ("eval --split bogus", ["eval", str(run_dir), "--split", "bogus"], 2, {}),
        ("train --help", ["train", "--help"], 0, {}),
        ("unknown verb", ["trian"], 2, {}),
        ("mistyped flag", ["train", "--epoch", "3"], 2, {}),
        ("eval missing dir", ["eval", str(w / "nope")], 2, {}),
        ("recalibrate unfinished", ["recalibrate", str(unfinished)], 2, {}),
        (
            "resume with another --threads (warned)",
            ["train", "--resume", str(w / "thr"), "--threads", "2"],
            0,
            {
                "setup": copy_run(
                    w / "thr", lambda d: ((d / "model.safetensors").unlink(), _position(d, epoch=1, batch=0))
                )
            },
        ),
        ("eval finished", ["eval", str(run_dir)], 0, {}),
        ("predict finished", ["predict", str(run_dir), "--threshold", "0.9"], 0, {}),
    ]
    return lst


# ---------------------------------------------------------------------------------------------------------------
# generated cases (seeded): every verb, damaged files, huge values, kills at random moments

VERBS_WITH_RUN = {  # a verb on a run directory, writing into its own folder D (tiny settings)
    "eval": lambda r, d: ["eval", str(r), "--no-progress"],
    "predict": lambda r, d: ["predict", str(r), "-o", str(d / "p.npz"), "--overwrite"],
    "calibrate": lambda r, d: ["calibrate", str(r), "--overwrite"],
    "recalibrate": lambda r, d: ["recalibrate", str(r), "--batches", "1", "--output", "re.safetensors", "--overwrite"],
    "plot": lambda r, d: ["plot", str(r), "-o", str(d / "f.png"), "--overwrite"],
    "noise": lambda r, d: ["noise", str(r), "--sigmas", "0.1", "--max-examples", "16", "--out", str(d / "n"),
                           "--overwrite"],
    "policy": lambda r, d: ["policy", str(r), "--out", str(d / "p"), "--overwrite"],
    "ood": lambda r, d: ["ood", str(r), "--synthetic-ood", "--out", str(d / "o"), "--overwrite"],
    "typicality": lambda r, d: ["typicality", str(r), "--out", str(d / "t"), "--overwrite"],
    "guarantees": lambda r, d: ["guarantees", str(r), "--splits", "2", "--out", str(d / "g"), "--overwrite"],
    "export": lambda r, d: ["export", str(r), "-o", str(d / "m.pt2"), "--program", "trajectory", "--overwrite"],
    "train --resume": lambda r, d: ["train", "--resume", str(r), "--no-progress"],
}  # fmt: skip
FILES = ("config.json", "model.safetensors", "checkpoint.pt", "metrics.jsonl", "eval.json")
DAMAGE = ("empty", "truncated", "random bytes", "one flipped byte", "garbage text", "JSON list", "JSON null")
# the files each verb needs (a damaged one must be refused): plot draws eval.json alone; export reads what it
# needs from the weights' own metadata (config.json is only a fallback); a finished run resumes without weights
NEEDED = {"config.json": set(VERBS_WITH_RUN) - {"plot", "export"},
          "model.safetensors": set(VERBS_WITH_RUN) - {"train --resume", "plot"}, "eval.json": {"plot"}}  # fmt: skip


def _damage(path: Path, kind: str, rng: random.Random) -> None:
    data = path.read_bytes()
    if kind == "empty":
        data = b""
    elif kind == "truncated":
        data = data[: rng.randrange(1, max(len(data), 2))]
    elif kind == "random bytes":
        data = rng.randbytes(len(data))
    elif kind == "one flipped byte":
        i = rng.randrange(len(data))
        data = data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1 :]
    elif kind == "garbage text":
        data = b"garbage\n"
    elif kind == "JSON list":
        data = b"[1, 2]\n"
    else:
        data = b"null\n"
    path.write_bytes(data)


def _damage_in(run: Path, name: str, kind: str, seed: int) -> None:
    _damage(run / name, kind, random.Random(seed))


def generated(w: Path, rng: random.Random, files: int, huge: int, kills: int) -> list:
    run_dir = w / "runs" / "tiny"
    g = w / "g"
    lst: list[tuple[str, list[str], int | tuple[int, ...] | None, dict]] = []

    def copy(dest: Path, change=None):
        def make() -> None:
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(run_dir, dest / "run")
            if change:
                change(dest / "run")

        return make

    # every verb: its help, and a missing run directory
    for verb in ("train", "eval", "predict", "recalibrate", "ood", "noise", "plot", "policy", "demo", "reproduce",
                 "models", "convert", "typicality", "export", "serve", "calibrate", "guarantees"):  # fmt: skip
        lst.append((f"{verb} --help", [verb, "--help"], 0, {}))
    for verb, make in VERBS_WITH_RUN.items():
        lst.append((f"{verb} of a missing run", make(w / "missing", g / "missing"), 2, {}))
    # damaged files: a sample of (file, damage, verb)
    combos = [(f, k, v) for f in FILES for k in DAMAGE for v in VERBS_WITH_RUN
              if not (k.startswith("JSON") and not f.endswith(".json"))]  # fmt: skip
    for n, (f, k, v) in enumerate(rng.sample(combos, min(files, len(combos)))):
        d = g / f"file{n}"
        seed = rng.randrange(2**32)
        expect = 2 if k != "one flipped byte" and v in NEEDED.get(f, ()) else (0, 2)
        change = functools.partial(_damage_in, name=f, kind=k, seed=seed)
        lst.append((f"{f} {k}, {v}", VERBS_WITH_RUN[v](d / "run", d), expect, {"setup": copy(d, change)}))
    # huge (and zero, negative) values
    tiny = [a for a in TINY]
    flags = [("train", "--width"), ("train", "--num-steps"), ("train", "--image-size"), ("train", "--synthetic-size"),
             ("train", "--eval-batch-size"), ("train", "--batch-size"), ("eval", "--num-steps"),
             ("eval", "--batch-size"), ("noise", "--num-steps"), ("noise", "--max-examples"), ("noise", "--burst"),
             ("typicality", "--bins"), ("predict", "--num-steps")]  # fmt: skip
    for n in range(huge):
        verb, flag = rng.choice(flags)
        value = rng.choice(["0", "-1", str(10 ** rng.randint(3, 12)), str(rng.randint(2, 9) * 10 ** rng.randint(4, 9))])
        d = g / f"huge{n}"
        values = [value, value] if flag == "--burst" else [value]
        if verb == "train":
            if flag == "--image-size":
                argv = ["train", *tiny, "--image-size", *values]
            else:
                argv = [*_replace(["train", *tiny], flag, values)]
            if flag == "--batch-size" and value.isdigit():  # a batch of the whole training set
                argv = _replace(argv, "--synthetic-size", [str(int(value) + 32)])
            argv += ["--out", str(d)]
        else:
            argv = [*VERBS_WITH_RUN[verb](run_dir, d), flag, *values]
        lst.append((f"{verb} {flag} {value}", argv, (0, 2), {}))
    # kills at random moments of every verb that writes, then the same command again
    writers = [v for v in VERBS_WITH_RUN if v != "train --resume"] + ["train"]
    for n in range(kills):
        verb = writers[n % len(writers)]
        d = g / f"kill{n}"
        if verb == "train":  # resumed, or started again if killed before its configuration was written
            argv = ["train", *TINY, "--checkpoint-every", "1", "--out", str(d), "--name", "run"]
            again = functools.partial(_train_again, argv, d / "run")
            setup = None
        else:
            argv = VERBS_WITH_RUN[verb](d / "run", d)
            again = argv
            setup = copy(d)
            if verb == "plot":
                setup = copy(d, lambda r: shutil.copy(run_dir / "eval.json", r / "eval.json"))
        lst.append((f"SIGKILL {verb}, then again", argv, 0,
                    {"setup": setup, "kill_after": rng.uniform(0.2, 8.0), "again": again}))  # fmt: skip
    return lst


def _train_again(argv: list[str], run: Path) -> list[str]:
    return ["train", "--resume", str(run), "--no-progress"] if (run / "config.json").is_file() else argv


def _replace(argv: list[str], flag: str, values: list[str]) -> list[str]:
    if flag in argv:
        i = argv.index(flag)
        return [*argv[:i], flag, *values, *argv[i + 2 :]]
    return [*argv, flag, *values]


def _position(run: Path, **fields) -> None:
    import torch

    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt.update(fields)
    if fields.get("batch") == 0:
        ckpt["epoch_done"] = None
    torch.save(ckpt, run / "checkpoint.pt")


def _meta_steps(run: Path, steps: int) -> None:
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(SRC))
    from cascadenet.models.checkpoint import read_metadata

    weights = run / "model.safetensors"
    meta = read_metadata(weights)
    meta["model_config"]["num_steps"] = steps
    save_file(load_file(str(weights)), str(weights), metadata={k: json.dumps(v) for k, v in meta.items()})


def one_case(case: tuple, mem_gb: float, timeout: float) -> dict:
    name, argv, expect, opts = case
    if opts.get("setup"):
        opts["setup"]()
    if "kill_after" in opts:  # killed at a random moment, then the same command again must work
        first = run(argv, mem_gb, timeout, kill_after=opts["kill_after"])
        again = opts["again"]() if callable(opts["again"]) else opts["again"]
        result = run(again, mem_gb, timeout)
        verdict = "traceback" if classify(first, None) == "traceback" else classify(result, expect)
    else:
        result = run(argv, mem_gb, timeout)
        verdict = classify(result, expect)
    return {"case": name, "argv": argv, "expect": expect, "rc": result["rc"], "verdict": verdict,
            "stderr_tail": result["err"].strip().splitlines()[-1:] if result["err"].strip() else [],
            "seconds": result["seconds"]}  # fmt: skip


def disk_cases(w: Path) -> list[dict]:
    """tests/disk_faults.py (every writing verb on a real full and read-only tmpfs) in a user+mount namespace;
    one row per check. None where namespaces are not allowed."""
    if shutil.which("unshare") is None:
        return []
    disk = w / "disk"
    disk.mkdir()
    script = Path(__file__).resolve().parents[1] / "tests" / "disk_faults.py"
    p = subprocess.run(["unshare", "-rm", sys.executable, str(script), str(disk)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=3600)  # fmt: skip
    rows = []
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            for check in ("good", "full", "read-only", "again"):
                if check in r:
                    ok = r[check] is True
                    tb = not ok and "Traceback" in str(r[check])
                    rows.append({"case": f"{r['verb']} disk {check}", "argv": [], "expect": 2 if check in
                                 ("full", "read-only") else 0, "rc": None, "verdict": "ok" if ok else
                                 ("traceback" if tb else "defect"), "stderr_tail": [] if ok else [str(r[check])],
                                 "seconds": 0})  # fmt: skip
    if not rows:
        tail = p.stderr.strip().splitlines()[-1:]
        rows.append({"case": "disk faults (not run)", "argv": [], "expect": 0, "rc": p.returncode,
                     "verdict": "skipped", "stderr_tail": tail, "seconds": 0})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/fault-campaign")
    ap.add_argument("--kills", type=int, default=4, help="random SIGKILLs of one training, each resumed")
    ap.add_argument("--verb-kills", type=int, default=24, help="SIGKILLs of every writing verb, then run again")
    ap.add_argument("--files", type=int, default=120, help="damaged files (file, damage, verb sampled)")
    ap.add_argument("--huge", type=int, default=40, help="huge, zero and negative values (flag, value sampled)")
    ap.add_argument("--disks", action=argparse.BooleanOptionalAction, default=True, help="full and read-only disks")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=180.0, help="a case running longer is stuck")
    ap.add_argument("--mem-gb", type=float, default=6.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    w = Path(args.out)
    shutil.rmtree(w, ignore_errors=True)
    w.mkdir(parents=True)
    base = run(["train", *TINY, "--out", str(w / "runs"), "--name", "tiny"], args.mem_gb)
    assert base["rc"] == 0, base["err"]
    assert run(["eval", str(w / "runs" / "tiny")], args.mem_gb)["rc"] == 0
    shutil.copytree(w / "runs" / "tiny", w / "runs" / "unfinished")
    (w / "runs" / "unfinished" / "model.safetensors").unlink()
    (w / "runs" / "unfinished" / "eval.json").unlink()
    rng = random.Random(args.seed)
    todo = cases(w) + generated(w, rng, args.files, args.huge, args.verb_kills)
    rows = []
    start = time.monotonic()
    with ThreadPoolExecutor(args.jobs) as pool:
        for row in pool.map(lambda c: one_case(c, args.mem_gb, args.timeout), todo):
            rows.append(row)
            print(f"{row['verdict']:9s} rc={row['rc']:>4} {row['seconds']:6.1f}s  {row['case']}", flush=True)
    # kills at random moments of a training, each resumed; the end must equal an uninterrupted run
    ref = run(["train", *TINY, "--out", str(w / "k"), "--name", "ref"], args.mem_gb)
    target = ["train", *TINY, "--out", str(w / "k"), "--name", "killed", "--checkpoint-every", "1"]
    for k in range(args.kills):
        exists = (w / "k" / "killed" / "config.json").is_file()
        argv = ["train", "--resume", str(w / "k" / "killed")] if exists else target
        result = run(argv, args.mem_gb, kill_after=rng.uniform(2.0, 6.0))
        verdict = classify(result, None)
        rows.append({"case": f"SIGKILL #{k + 1}", "argv": argv, "expect": None, "rc": result["rc"], "verdict": verdict,
                     "stderr_tail": result["err"].strip().splitlines()[-1:], "seconds": result["seconds"]})  # fmt: skip
        print(f"{verdict:9s} rc={result['rc']:>4} {result['seconds']:6.1f}s  SIGKILL #{k + 1}", flush=True)
    exists = (w / "k" / "killed" / "config.json").is_file()
    final = run(["train", "--resume", str(w / "k" / "killed")] if exists else target, args.mem_gb)
    same = _same_weights(w / "k" / "ref", w / "k" / "killed") if final["rc"] == 0 and ref["rc"] == 0 else False
    rows.append({"case": "killed run resumed = uninterrupted", "rc": final["rc"],
                 "verdict": "ok" if same else "defect", "argv": [], "expect": 0, "stderr_tail": [],
                 "seconds": final["seconds"]})  # fmt: skip
    print(f"{'ok' if same else 'defect':9s} rc={final['rc']:>4}  killed run resumed = uninterrupted", flush=True)
    if args.disks:
        for row in disk_cases(w):
            rows.append(row)
            print(f"{row['verdict']:9s}                {row['case']}", flush=True)
    verdicts = ("ok", "defect", "traceback", "killed", "stuck", "skipped")
    totals = {v: sum(r["verdict"] == v for r in rows) for v in verdicts}
    print(f"cases {len(rows)} in {time.monotonic() - start:.0f}s: ok {totals['ok']}, defects {totals['defect']}, "
          f"tracebacks {totals['traceback']}, killed {totals['killed']}, stuck {totals['stuck']}, "
          f"skipped {totals['skipped']}")  # fmt: skip
    (w / "campaign.json").write_text(json.dumps({"rows": rows, "totals": totals, "seed": args.seed}, indent=1))


def _same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(bool((x[k] == y[k]).all()) for k in x)


if __name__ == "__main__":
    main()
