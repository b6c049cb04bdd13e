"""Benchmark: exported programs against eager PyTorch, side by side in one run.

    python benchmarks/export.py --threads 1                      # ResNet-18 width 16, 32x32, random weights
    python benchmarks/export.py --run-dir runs/demo/cascaded-td  # a trained run at its input size

Trajectory: eager ``model(x)`` (the engine) against the exported trajectory program under ONNX Runtime, under
``torch.export`` (``ExportedProgram.module()``) and compiled by AOTInductor (``--format aoti``; ``--no-aoti`` skips
it, its compilation takes tens of seconds per program), at several batch sizes. Step: the eager ``model.step``
against the step program (one program for every step, the step index a tensor input) under the same runtimes, per
step, over a whole trajectory. Each timing is the median of ``--repeats`` rounds, the variants interleaved
within each round so that a change of machine load hits all of them; every program is checked against eager
first (max abs difference printed). Prints a markdown table and writes JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import cascadenet as cn
from cascadenet.deployment.export import export_program, load_compiled
from cascadenet.models.precise_bn import recalibrate_bn
from cascadenet.models.program import StepProgram


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def make_model(args) -> tuple[torch.nn.Module, tuple[int, int, int]]:
    if args.run_dir:
        model = cn.load_model(args.run_dir)
        size = model.preprocess.size or (args.size, args.size)
        return model, (model.in_channels, *size)
    torch.manual_seed(0)
    model = cn.create_model(args.model, num_classes=10, width=args.width)
    recalibrate_bn(model, [torch.randn(64, 3, args.size, args.size) for _ in range(2)])
    return model.eval(), (3, args.size, args.size)


def timed(fn, repeats_inner: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats_inner):
        fn()
    return (time.perf_counter() - start) / repeats_inner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    parser.add_argument("--aoti", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    model, shape = make_model(args)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    results: dict = {"cpu": cpu_name(), "threads": args.threads, "model": args.run_dir or f"{args.model} w{args.width}",
                     "input": list(shape), "steps": model.num_steps, "trajectory": [], "step": []}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for program in ("trajectory", "step"):
            for fmt in ("onnx", "pt2", "aoti") if args.aoti else ("onnx", "pt2"):
                t0 = time.perf_counter()
                paths[program, fmt] = export_program(model, Path(tmp) / f"{program}.{fmt}", program=program,
                                                     format=fmt, input_size=shape)  # fmt: skip
                print(f"exported {program} {fmt} in {time.perf_counter() - t0:.1f} s", flush=True)
        traj_ort = ort.InferenceSession(str(paths["trajectory", "onnx"]), options, providers=["CPUExecutionProvider"])
        traj_pt2 = torch.export.load(paths["trajectory", "pt2"]).module()
        step_ort = ort.InferenceSession(str(paths["step", "onnx"]), options, providers=["CPUExecutionProvider"])
        step_pt2 = torch.export.load(paths["step", "pt2"]).module()
        traj_aoti = load_compiled(paths["trajectory", "aoti"]) if args.aoti else None
        step_aoti = load_compiled(paths["step", "aoti"]) if args.aoti else None
        program = StepProgram(model, shape)
        names = program.state_names
        with torch.no_grad():
            for b in args.batches:
                x = torch.randn(b, *shape)
                xn = x.numpy()
                variants = {
                    "eager model(x)": lambda x=x: model(x),
                    "ONNX Runtime": lambda xn=xn: traj_ort.run(None, {"x": xn}),
                    "torch.export": lambda x=x: traj_pt2(x),
                }
                ref = model(x)
                diff = {"ONNX Runtime": float(np.abs(traj_ort.run(None, {"x": xn})[0] - ref.numpy()).max()),
                        "torch.export": float((traj_pt2(x) - ref).abs().max())}  # fmt: skip
                if traj_aoti is not None:
                    variants["AOTInductor"] = lambda x=x: traj_aoti(x)
                    diff["AOTInductor"] = float((traj_aoti(x) - ref).abs().max())
                inner = max(1, 64 // b)
                times = {k: [] for k in variants}
                for _ in range(args.repeats):
                    for k, fn in variants.items():
                        times[k].append(timed(fn, inner))
                row = {"batch": b, **{k: statistics.median(v) for k, v in times.items()}, "max_abs_diff": diff}
                results["trajectory"].append(row)
                print(json.dumps(row), flush=True)

                def eager_steps(x=x):
                    state = None
                    for _ in range(model.num_steps):
                        _, state = model.step(x, state)

                def ort_steps(xn=xn, b=b):
                    state = [np.asarray(s) for s in program.initial_state(torch.zeros(b, *shape))]
                    for t in range(model.num_steps):
                        out = step_ort.run(None, {"x": xn, "t": np.array(t, dtype=np.int64), **dict(zip(names, state))})
                        state = out[1:]

                def pt2_steps(x=x):
                    state = program.initial_state(x)
                    for t in range(model.num_steps):
                        _, *state = step_pt2(x, torch.tensor(t), *state)

                def aoti_steps(x=x):
                    state = program.initial_state(x)
                    for t in range(model.num_steps):
                        _, *state = step_aoti(x, torch.tensor(t), *state)

                steps = {"eager model.step": eager_steps, "ONNX Runtime": ort_steps, "torch.export": pt2_steps}
                if step_aoti is not None:
                    steps["AOTInductor"] = aoti_steps
                    diff_steps, state, ref_state = 0.0, program.initial_state(x), None
                    for t in range(model.num_steps):
                        ref_logits, ref_state = model.step(x, ref_state)
                        logits, *state = step_aoti(x, torch.tensor(t), *state)
                        diff_steps = max(diff_steps, float((logits - ref_logits).abs().max()))
                times = {k: [] for k in steps}
                for _ in range(args.repeats):
                    for k, fn in steps.items():
                        times[k].append(timed(fn, max(1, inner // 4)) / model.num_steps)
                row = {"batch": b, **{k: statistics.median(v) for k, v in times.items()}}
                if step_aoti is not None:
                    row["max_abs_diff"] = {"AOTInductor": diff_steps}
                results["step"].append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{results['model']}, input {shape}, {model.num_steps} steps, {args.threads} thread(s), {results['cpu']}")
    runtimes = ["ONNX Runtime", "torch.export"] + (["AOTInductor"] if args.aoti else [])
    for table, eager, unit, digits in (
        ("trajectory", "eager model(x)", "ms", 2),
        ("step", "eager model.step", "ms/step", 3),
    ):
        print(f"\n| {table}, batch | {eager} {unit} | " + " | ".join(f"{k} {unit} (speed-up)" for k in runtimes) + " |")
        print("|---" * (2 + len(runtimes)) + "|")
        for r in results[table]:
            e = r[eager]
            cells = [f"{1e3 * r[k]:.{digits}f} ({e / r[k]:.2f}x)" for k in runtimes]
            print(f"| {r['batch']} | {1e3 * e:.{digits}f} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
