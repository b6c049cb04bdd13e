"""Benchmark: the trajectory engine against its bound, the step loop and one feed-forward pass.

    python benchmarks/engine.py                 # ResNet-18, width 16, 32x32, batch 64, 2 CPU threads
    python benchmarks/engine.py --threads 1     # per-call overhead shows most with one thread
    python benchmarks/engine.py --device cuda   # the same on a GPU (default: cuda when present, else cpu)

The *bound* is what the engine cannot avoid: the same convolutions, batch norms, ReLUs and max-pools on the
same distinct states (recorded from one engine call, stacked once outside the timed region, normalisation
parameters gathered in advance), plus one add and ReLU per block over its stacked output states; no
bookkeeping, no copies. Training: the same computations from leaf inputs with batch statistics, backward
included (each output weighted by a fixed random cotangent). The engine's own overhead is engine / bound.

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
import torch.nn.functional as F

import cascadenet as cn
from cascadenet.models import engine
from cascadenet.models.blocks import Branch
from cascadenet.training.losses import td_loss

TARGETS = {  # from the issues: what the engine must reach on the reference configuration
    "inference_speedup_vs_loop": (">=", 2.0),
    "inference_vs_bound": ("<=", 1.15),
    "train_speedup_vs_loop": (">=", 1.8),
    "train_vs_bound": ("<=", 1.25),
    "train_peak_memory_vs_loop": ("<=", 0.6),
    "inference_vs_feedforward": ("<=", 5.5),
}


def build(args, device):
    torch.manual_seed(0)
    model = cn.create_model(args.model, num_classes=10, width=args.width, stem="cifar").to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    return model, x, y


def record(model, x):
    """Run the engine once and record what it computes: every grouped branch call (its stacked input, the steps
    its groups stand for, and whether they are input-independent) and the stacked shape of every block output."""
    calls, blocks = [], []
    forward_groups, combine = Branch.forward_groups, engine._combine

    def record_call(branch, xs, steps, count=None):
        calls.append((branch, xs.detach().clone(), list(steps), count))
        return forward_groups(branch, xs, steps, count)

    def record_combine(steps, key_of, make, relu, *rest, **options):  # (steps, key_of, make, relu, batch)
        level = combine(steps, key_of, make, relu, *rest, **options)
        if relu:  # a block output: shortcut + delayed residual, ReLU
            blocks.extend(stack.shape for stack, _ in level.stacks.values())
        return level

    Branch.forward_groups, engine._combine = record_call, record_combine
    try:
        with torch.no_grad():
            model(x)
    finally:
        Branch.forward_groups, engine._combine = forward_groups, combine
    return calls, blocks


def make_bound(model, x, train: bool):
    """The engine's arithmetic without its bookkeeping (see the module docstring), as a function to time."""
    calls, blocks = record(model, x)
    plan = []
    for branch, xs, steps, _ in calls:
        units = []
        for u in branch.units:
            bn = u.bn
            stat = [bn.stat_slot(t) for t in steps]
            aff = [bn.affine_slot(t) for t in steps]
            w, b = bn.weight[aff].reshape(-1).detach(), bn.bias[aff].reshape(-1).detach()
            if train:
                w.requires_grad_(True)
                b.requires_grad_(True)
            mean, var = bn.running_mean[stat].reshape(-1), bn.running_var[stat].reshape(-1)
            units.append((u.conv, mean, var, w, b, bn.eps, u.relu))
        plan.append((xs.requires_grad_(train and branch is not model.stem), units, branch.pool))
    adds = [(torch.randn(shape, device=x.device, requires_grad=train), torch.randn(shape, device=x.device))
            for shape in blocks]  # fmt: skip

    def forward():
        outs = []
        for xs, units, pool in plan:
            b, g = xs.shape[:2]
            y = xs.flatten(0, 1)
            for conv, mean, var, w, bias, eps, relu in units:
                y = conv(y)
                n, c, h, wd = y.shape
                stats = (torch.zeros_like(mean), torch.ones_like(var)) if train else (mean, var)
                y = F.batch_norm(y.view(b, g * c, h, wd), *stats, w, bias, train, 1.0 if train else 0.0, eps)
                y = y.view(n, c, h, wd)
                if relu:
                    y = F.relu(y)
            y = F.max_pool2d(y, 3, 2, 1) if pool else y
            if train:  # kept for the backward pass; in inference each output dies at once, as in the engine
                outs.append(y)
        for a, b in adds:
            y = F.relu(a + b)
            if train:
                outs.append(y)
        return outs

    if not train:
        return forward
    cotangents = [torch.randn_like(o) for o in forward()]

    def step():
        outs = forward()
        torch.autograd.backward(outs, cotangents)

    return step


def fwd_bwd(model, x, y):
    """Forward (trajectory), TD loss, backward: a training step without the optimizer."""
    model.zero_grad(set_to_none=True)
    td_loss(model(x), y, 0.5, first_step=1).backward()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(model, opt, x, y, method):
    opt.zero_grad(set_to_none=True)
    td_loss(model(x, method=method), y, 0.5, first_step=1).backward()
    opt.step()


CLOCK = time.perf_counter  # --clock cpu: process CPU time, robust to other processes when --threads 1


def time_interleaved(fns: dict, reps: int, warmup: int, device) -> dict[str, float]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            t0 = CLOCK()
            fn()
            sync(device)
            times[name].append(CLOCK() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def cpu_model() -> str:
    """The CPU's model name (figures differ between CPUs: record it with every figure)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: process CPU time (with --threads 1, unaffected by other processes sharing the machine)",
    )
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        return memory_child(args)

    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    device = torch.device(args.device)
    model, x, y = build(args, device)
    cpu = cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(
        f"{args.model} width {args.width}, {args.size}x{args.size}, batch {args.batch}, T={model.num_steps}, "
        f"{device.type} ({args.threads} threads), torch {torch.__version__}, {cpu}"
    )

    model.eval()
    bound = make_bound(model, x, train=False)
    with torch.no_grad():
        inf = time_interleaved(
            {
                "engine": lambda: model(x),
                "bound": bound,
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
    train_bound = make_bound(model, x, train=True)
    grads = time_interleaved(
        {"engine": lambda: fwd_bwd(model, x, y), "bound": train_bound}, args.reps, args.warmup, device
    )
    mem = {m: measure_memory(args, m, args.memory_reps) for m in ("engine", "loop")}

    results = {
        "config": vars(args) | {"num_steps": model.num_steps, "torch": torch.__version__, "cpu": cpu},
        "seconds": {"inference": inf, "train_step": train, "forward_backward": grads},
        "train_memory_bytes": mem,
        "ratios": {
            "inference_speedup_vs_loop": inf["loop"] / inf["engine"],
            "inference_vs_bound": inf["engine"] / inf["bound"],
            "inference_vs_feedforward": inf["engine"] / inf["feedforward"],
            "train_speedup_vs_loop": train["loop"] / train["engine"],
            "train_vs_bound": grads["engine"] / grads["bound"],
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
    for label, a, b, key in [
        ("inference vs one feed-forward pass", inf["engine"], inf["feedforward"], "inference_vs_feedforward"),
        ("inference vs its bound (s)", inf["engine"], inf["bound"], "inference_vs_bound"),
        ("fwd + TD loss + bwd vs its bound (s)", grads["engine"], grads["bound"], "train_vs_bound"),
    ]:
        target = " ".join(map(str, TARGETS[key]))
        print(f"{label:36s} {a:10.4f} {b:10.4f} {results['ratios'][key]:8.2f}  {target}")
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
