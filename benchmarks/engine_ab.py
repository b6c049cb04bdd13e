"""Benchmark: the trajectory engine of two source trees side by side (a change's before and after).

    python benchmarks/engine_ab.py OLD/src NEW/src --rounds 6    # e.g. from `git archive COMMIT src | tar -x`

Each round runs one fresh subprocess per tree (alternating, so that drifting load hits both alike) that times the
engine of ``resnet18`` width 16 (32x32, batch 64, 1 thread): ``--calls`` inference calls (no grad), as many runs of
``model.anytime`` through every step (the step-by-step engine of real early exit; trees that have it) and half as
many training steps (engine, per-step cross-entropy, backward), and reports their medians; the script prints, per
tree, the median and the minimum of the rounds' medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

CHILD = """
import statistics, sys, time, torch
torch.set_num_threads(1)
import cascadenet as cn
torch.manual_seed(0)
m = cn.create_model("resnet18", num_classes=10, width=16).eval()
t_ = cn.create_model("resnet18", num_classes=10, width=16).train()
x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
calls = int(sys.argv[1])
with torch.no_grad():
    for _ in range(3):
        m(x)
    ts = []
    for _ in range(calls):
        t = time.perf_counter(); m(x); ts.append(time.perf_counter() - t)
ta = []
with torch.no_grad():
    for _ in range(calls if hasattr(m, "anytime") else 0):
        t = time.perf_counter(); list(m.anytime(x)); ta.append(time.perf_counter() - t)
tt = []
for _ in range(max(calls // 2, 1)):
    t = time.perf_counter()
    out = t_(x)
    torch.nn.functional.cross_entropy(out.flatten(0, 1), y.repeat(out.shape[0])).backward()
    tt.append(time.perf_counter() - t)
print(statistics.median(ts), statistics.median(tt), statistics.median(ta) if ta else float("nan"))
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("trees", nargs=2, help="two src folders (each holding the cascadenet package)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--calls", type=int, default=10)
    args = p.parse_args()
    res: dict[str, tuple[list[float], list[float], list[float]]] = {t: ([], [], []) for t in args.trees}
    for _ in range(args.rounds):
        for tree in args.trees:
            out = subprocess.run([sys.executable, "-c", CHILD, str(args.calls)], capture_output=True, text=True,
                                 check=True, env={**os.environ, "PYTHONPATH": tree}).stdout.split()  # fmt: skip
            res[tree][0].append(float(out[0]))
            res[tree][1].append(float(out[1]))
            res[tree][2].append(float(out[2]))
    for tree, (inf, train, anytime) in res.items():
        print(f"{tree}: inference {statistics.median(inf) * 1e3:.1f} ms (min {min(inf) * 1e3:.1f}), "
              f"anytime {statistics.median(anytime) * 1e3:.1f} ms (min {min(anytime) * 1e3:.1f}), "
              f"training step {statistics.median(train) * 1e3:.1f} ms (min {min(train) * 1e3:.1f})")  # fmt: skip


if __name__ == "__main__":
    main()
