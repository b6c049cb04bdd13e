"""Where the trajectory engine's time goes: torch.profiler's operator table for inference and a training step.

    python benchmarks/profile_engine.py                 # ResNet-18 width 16, 32x32, batch 64, 2 threads
    python benchmarks/profile_engine.py --threads 1 --batch 8

Prints, per mode, the operators sorted by their own CPU time (share of the total, calls per trajectory), and the
share of everything that is not a convolution, batch norm or ReLU (the arithmetic the bound counts): the
engine's overhead as the profiler sees it (copies, stacking, adds, indexing, small ops).
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import cascadenet as cn
from cascadenet.training.losses import td_loss

ARITHMETIC = ("convolution", "batch_norm", "relu", "clamp_min", "threshold", "max_pool", "addmm", "mm")


def table(prof, reps: int, rows: int) -> str:
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    lines = [f"{'operator':40s} {'share':>7s} {'calls/run':>10s}"]
    for e in events[:rows]:
        lines.append(f"{e.key[:40]:40s} {100 * e.self_cpu_time_total / total:6.1f}% {e.count / reps:10.1f}")
    other = sum(e.self_cpu_time_total for e in events if not any(a in e.key for a in ARITHMETIC))
    lines.append(f"{'not conv / batch norm / relu / pool / linear':40s} {100 * other / total:6.1f}%")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rows", type=int, default=14)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = cn.create_model("resnet18", num_classes=10, width=16)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        td_loss(model(x), y, 0.5, first_step=1).backward()

    model.train()
    for _ in range(2):
        train_step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.reps):
            train_step()
    print(f"training step (trajectory + TD loss + backward), batch {args.batch}, {args.threads} threads")
    print(table(prof, args.reps, args.rows))

    model.eval()
    with torch.no_grad():
        for _ in range(2):
            model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.reps):
                model(x)
    print(f"\ninference (trajectory), batch {args.batch}, {args.threads} threads")
    print(table(prof, args.reps, args.rows))


if __name__ == "__main__":
    main()
