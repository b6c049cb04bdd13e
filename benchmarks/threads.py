"""Benchmark: training throughput with 1 or 2 threads, alone and beside a competing process.

    python benchmarks/threads.py                # ResNet-18 width 16, batch 64, CascadedTD training steps

Each setting runs in a fresh process (OpenMP reads its environment once, at start-up): a number of warm-up
steps, then timed training steps (trajectory engine, TD loss, backward, SGD), reporting images per second. The
competitor is what a user sharing the machine runs beside a training: one single-threaded CPU-bound process
(a pure-Python loop), started before and stopped after the timed steps. Settings: torch's default thread count
(one per core) or 1 thread, with OpenMP's default wait policy or ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads
sleep instead of spinning, which is what stalls a thread team when one of its cores is taken).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def child(args) -> None:
    import torch

    import cascadenet as cn
    from cascadenet.training.losses import td_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = cn.create_model("resnet18", num_classes=10, width=16).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        td_loss(model(x), y, 0.5, first_step=1).backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = time.perf_counter() - t0
    print(json.dumps({"images_per_s": args.steps * args.batch / seconds, "threads": torch.get_num_threads()}))


def run(args, threads: int | None, passive: bool, competitor: bool) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    cmd = [sys.executable, __file__, "--child", "--batch", str(args.batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(threads or 0)]  # fmt: skip
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if competitor else None
    try:
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    if args.child:
        return child(args)
    print(f"cpus: {os.cpu_count()}; ResNet-18 width 16, batch {args.batch}, {args.steps} timed training steps")
    print(f"{'threads':>8s} {'wait policy':>12s} {'alone (img/s)':>14s} {'beside a busy process':>22s} {'kept':>6s}")
    rows = []
    for threads in (None, 1):
        for passive in (False, True):
            alone = run(args, threads, passive, competitor=False)
            shared = run(args, threads, passive, competitor=True)
            rows.append({"threads": alone["threads"], "passive": passive, "alone": alone["images_per_s"],
                         "shared": shared["images_per_s"]})  # fmt: skip
            r = rows[-1]
            print(f"{r['threads']:>8d} {'PASSIVE' if passive else 'default':>12s} {r['alone']:14.1f} "
                  f"{r['shared']:22.1f} {r['shared'] / r['alone']:6.2f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
