"""Benchmark: the trajectory engine against the step loop and one feed-forward pass.

    python benchmarks/engine.py                 # ResNet-18, width 16, 32x32, batch 64, 2 CPU threads
    python benchmarks/engine.py --device cuda   # the same on a GPU (default: cuda when present, else cpu)

All variants run side by side in one process, interleaved (A, B, C, A, B, C, ...) so that drifting machine
load hits them alike; times are medians over repetitions after warm-up. Peak memory of a training step is
measured in fresh subprocesses (growth of the peak resident set size, VmHWM, on CPU;
torch.cuda.max_memory_allocated on a GPU), together with the bytes autograd saves for the backward pass,
which does not depend on the allocator. Ratios are what we report: absolute times on a shared machine are not stable.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import torch

import cascadenet as cn
from cascadenet.losses import td_loss

TARGETS = {  # from the issue: what the engine must reach on the reference configuration
    "inference_speedup_vs_loop": (">=", 1.9),
    "train_speedup_vs_loop": (">=", 1.8),
    "train_peak_memory_vs_loop": ("<=", 0.6),
    "inference_vs_feedforward": ("<=", 5.5),
}


def build(args, device):
    torch.manual_seed(0)
    model = cn.create_model(args.model, num_classes=10, width=args.width, stem="cifar").to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    return model, x, y


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(model, opt, x, y, method):
    opt.zero_grad(set_to_none=True)
    td_loss(model(x, method=method), y, 0.5).backward()
    opt.step()


def time_interleaved(fns: dict, reps: int, warmup: int, device) -> dict[str, float]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def proc_status_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process. VmHWM belongs to the current address space, unlike
    getrusage's ru_maxrss, which a child started by fork + exec inherits from its (large) parent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")


def memory_child(args) -> None:
    """One training step in a fresh process; print its peak memory growth and saved-tensor bytes as JSON."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, x, y = build(args, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = proc_status_bytes("VmRSS")
        reset_peak_rss()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(model, opt, x, y, args.memory_child)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = proc_status_bytes("VmHWM") - base
    print(json.dumps({"peak": peak, "saved": saved}))


def measure_memory(args, method: str, reps: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--memory-child", method, "--device", args.device, "--threads", str(args.threads)]
    cmd += ["--model", args.model, "--width", str(args.width), "--batch", str(args.batch), "--size", str(args.size)]
    runs = [json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout) for _ in range(reps)]
    return {k: statistics.median(r[k] for r in runs) for k in ("peak", "saved")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--memory-reps", type=int, default=3)
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        return memory_child(args)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, x, y = build(args, device)
    cpu = platform.processor() or platform.machine()
    print(
        f"{args.model} width {args.width}, {args.size}x{args.size}, batch {args.batch}, T={model.num_steps}, "
        f"{device.type} ({args.threads} threads), torch {torch.__version__}, {cpu}"
    )

    model.eval()
    with torch.no_grad():
        inf = time_interleaved(
            {
                "engine": lambda: model(x),
                "loop": lambda: model(x, method="loop"),
                "feedforward": lambda: model.feedforward(x),
            },
            args.reps,
            args.warmup,
            device,
        )
    model.train()
    models = {m: build(args, device)[0].train() for m in ("engine", "loop")}
    opts = {m: torch.optim.SGD(models[m].parameters(), lr=0.01, momentum=0.9, nesterov=True) for m in models}
    train = time_interleaved(
        {m: (lambda m=m: train_step(models[m], opts[m], x, y, m)) for m in models}, args.reps, args.warmup, device
    )
    mem = {m: measure_memory(args, m, args.memory_reps) for m in ("engine", "loop")}

    results = {
        "config": vars(args) | {"num_steps": model.num_steps, "torch": torch.__version__},
        "seconds": {"inference": inf, "train_step": train},
        "train_memory_bytes": mem,
        "ratios": {
            "inference_speedup_vs_loop": inf["loop"] / inf["engine"],
            "inference_vs_feedforward": inf["engine"] / inf["feedforward"],
            "train_speedup_vs_loop": train["loop"] / train["engine"],
            "train_peak_memory_vs_loop": mem["engine"]["peak"] / mem["loop"]["peak"],
            "train_saved_activations_vs_loop": mem["engine"]["saved"] / mem["loop"]["saved"],
        },
    }
    print(f"{'measure':36s} {'engine':>10s} {'loop':>10s} {'ratio':>8s}  target")
    rows = [
        ("inference (s, median)", inf["engine"], inf["loop"], "inference_speedup_vs_loop"),
        ("train step (s, median)", train["engine"], train["loop"], "train_speedup_vs_loop"),
        ("train peak memory (MiB)", mem["engine"]["peak"] / 2**20, mem["loop"]["peak"] / 2**20,
         "train_peak_memory_vs_loop"),
        ("train saved activations (MiB)", mem["engine"]["saved"] / 2**20, mem["loop"]["saved"] / 2**20,
         "train_saved_activations_vs_loop"),
    ]  # fmt: skip
    for label, a, b, key in rows:
        target = " ".join(map(str, TARGETS.get(key, ("", ""))))
        print(f"{label:36s} {a:10.4f} {b:10.4f} {results['ratios'][key]:8.2f}  {target}")
    ff_ratio = results["ratios"]["inference_vs_feedforward"]
    label = "inference vs one feed-forward pass"
    print(f"{label:36s} {inf['engine']:10.4f} {inf['feedforward']:10.4f} {ff_ratio:8.2f}  <= 5.5")
    failed = [
        k
        for k, (op, v) in TARGETS.items()
        if not (results["ratios"][k] >= v if op == ">=" else results["ratios"][k] <= v)
    ]
    print("all targets met" if not failed else f"targets missed: {', '.join(failed)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
