"""Benchmark: real batched early exit against running every step, in wall-clock time, next to accuracy.

    python benchmarks/early_exit.py --run-dir runs/resnet18-td-fashion-mnist-s0          # a trained run
    python benchmarks/early_exit.py                     # no run: trains a tiny one on synthetic data first
    python benchmarks/early_exit.py --random            # random weights (timing only; accuracy meaningless)
    python benchmarks/early_exit.py --device cuda --batch 1000

Variants, each over the whole split in batches of --batch:
- ``engine``: ``model(x)``, every step at once (the trajectory engine), prediction of the last step;
- ``anytime``: ``model.anytime(x)`` run to the end (the same computations one step at a time);
- ``exit@q``: ``cascadenet.predict`` with the confidence policy at threshold q: each example stops at the first
  step whose max softmax is >= q and leaves the batch.
Reported per variant: median wall time over --repeats (after a warm-up, variants interleaved so that drifting
machine load hits them alike), its speed ratio against the engine, accuracy, mean stopping step and mean MACs
per example as a fraction of the last step's. Ratios are what to read: absolute times on a shared machine are not
stable. The MAC fraction is the bound the speed ratio can approach when per-step overheads are small.

The operating point (the threshold to quote) is chosen on the run's validation split, never on the split
measured: the threshold among --thresholds with the fewest mean steps whose validation accuracy is within
--tolerance points of the validation last step's (printed, and in the JSON as ``operating_point``).

Then where the time goes: ``model.anytime`` run to the end once more per repeat, timed step by step, each step's
share of the wall time next to its share of the MACs. Every example pays for the steps before its exit, so a step
whose time share is far above its MAC share (a memory-bound stem on a small input) limits what early exit can save.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time

import torch

import cascadenet as cn
from cascadenet.data.loader import iterate_batches
from cascadenet.evaluation.early_exit import Predictions, predict
from cascadenet.evaluation.policies import Confidence
from cascadenet.runs.load import load_run
from cascadenet.utils.device import autocast


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", help="a trained run directory (default: train a tiny one on synthetic data)")
    p.add_argument("--random", action="store_true", help="with no run directory: random weights, no training")
    p.add_argument("--split", default="test")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=500, help="examples per batch")
    p.add_argument("--thresholds", default="0.5,0.8,0.9,0.95,0.99", help="comma-separated confidence thresholds")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N examples of the split")
    p.add_argument("--train-epochs", type=int, default=4, help="epochs of the tiny model trained when no run is given")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--tolerance", type=float, default=0.5,
                   help="accuracy points below the last step the operating point may lose (validation)")  # fmt: skip
    return p.parse_args(argv)


def tiny_run(out: str, epochs: int, device: str) -> str:
    """A ResNet-10 of width 8 trained briefly on the synthetic dataset (seconds on a CPU)."""
    from cascadenet.training.loop import TrainConfig, train

    cfg = TrainConfig(model=cn.CascadeConfig(arch="resnet10", width=8), dataset="synthetic", synthetic_size=1024,
                      epochs=epochs, batch_size=64, lr=0.05, out=out, name="tiny", device=device, progress=False,
                      warmup_epochs=0.5)  # fmt: skip
    return str(train(cfg))


def load(args, tmp: str):
    note = None
    if args.run_dir:
        run = args.run_dir
    elif args.random:
        run = None
        note = "random weights: accuracies are meaningless, and few examples reach high thresholds"
    else:
        run = tiny_run(tmp, args.train_epochs, args.device)
        note = f"a tiny ResNet-10 (width 8) trained {args.train_epochs} epochs on synthetic data"
    if run is not None:
        loaded = load_run(run, split=args.split, device=args.device)
        model, amp = loaded.model.eval(), loaded.amp
        batches = list(iterate_batches(loaded.data, args.batch, shuffle=False, augment=False, mean=loaded.mean,
                                       std=loaded.std))  # fmt: skip
    else:
        torch.manual_seed(0)
        model, amp = cn.create_model("resnet10", width=8, num_classes=4).to(args.device).eval(), False
        n = args.limit or 1024
        x = torch.randn(n, 3, 16, 16, device=args.device)
        y = torch.randint(0, 4, (n,), device=args.device)
        batches = [(x[i : i + args.batch], y[i : i + args.batch]) for i in range(0, n, args.batch)]
    if args.limit:
        kept, seen = [], 0
        for x, y in batches:
            if seen >= args.limit:
                break
            kept.append((x[: args.limit - seen], y[: args.limit - seen]))
            seen += len(kept[-1][1])
        batches = kept
    return model, amp, batches, note


def operating_point(run_dir: str, thresholds: list[float], tolerance: float, device: str) -> dict | None:
    """The threshold chosen on the run's validation split: the fewest mean steps among ``thresholds`` whose
    validation accuracy is within ``tolerance`` points of the last step's (None without a validation split)."""
    from cascadenet.evaluation.logits import dataset_logits
    from cascadenet.evaluation.metrics import threshold_curve

    val = load_run(run_dir, split="val", device=device)
    logits = dataset_logits(val.model.eval(), val.data, val.mean, val.std, amp=val.amp)
    labels = val.data.labels.cpu()
    curve = threshold_curve(logits, labels, thresholds, first_step=val.model.first_informative_exit)
    last = float((logits[-1].argmax(-1) == labels).float().mean())
    ok = [i for i, a in enumerate(curve["accuracy"]) if a >= last - tolerance / 100 - 1e-12]
    if not ok:
        return None
    i = min(ok, key=lambda i: (curve["mean_step"][i], -curve["thresholds"][i]))
    return {"threshold": curve["thresholds"][i], "val_accuracy": curve["accuracy"][i], "val_last_step": last,
            "val_mean_step": curve["mean_step"][i], "tolerance_points": tolerance, "split": "val"}  # fmt: skip


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def step_times(model, batches, device: str) -> list[float]:
    """Wall time of each step of ``model.anytime`` over all the batches."""
    per: list[float] = []
    for x, _ in batches:
        sync(device)
        start = time.perf_counter()
        for t, _step in enumerate(model.anytime(x)):
            sync(device)
            now = time.perf_counter()
            if t == len(per):
                per.append(0.0)
            per[t] += now - start
            start = now
    return per


@torch.no_grad()
def variants(model, batches, thresholds):
    """name -> function running the whole split and returning (correct predictions, Predictions or None)."""

    def engine():
        correct = sum(int((model(x)[-1].argmax(-1) == y).sum()) for x, y in batches)
        return correct, None

    def anytime():
        correct = 0
        for x, y in batches:
            *_, last = model.anytime(x)  # every step, one at a time
            correct += int((last.logits.argmax(-1) == y).sum())
        return correct, None

    def early(q):
        def run():
            parts = [predict(model, x, Confidence(q)) for x, _ in batches]
            result = Predictions.cat(parts)
            labels = torch.cat([y.cpu() for _, y in batches])
            return int((result.predictions == labels).sum()), result

        return run

    table = {"engine": engine, "anytime": anytime}
    for q in thresholds:
        table[f"exit@{q:g}"] = early(q)
    return table


def main(argv=None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    thresholds = [float(q) for q in args.thresholds.split(",") if q]
    with tempfile.TemporaryDirectory() as tmp:
        model, amp, batches, note = load(args, tmp)
    n = sum(len(y) for _, y in batches)
    input_size = tuple(batches[0][0].shape[1:])
    macs = model.exit_costs(input_size).macs
    table = variants(model, batches, thresholds)
    times: dict[str, list[float]] = {name: [] for name in table}
    outcome = {}
    with autocast(args.device.split(":")[0], amp):
        for name, fn in table.items():  # warm-up, and the outcome (it does not change between repeats)
            outcome[name] = fn()
        for _ in range(args.repeats):
            for name, fn in table.items():
                sync(args.device)
                start = time.perf_counter()
                fn()
                sync(args.device)
                times[name].append(time.perf_counter() - start)
        profiles = [step_times(model, batches, args.device) for _ in range(args.repeats)]
    per_step = [statistics.median(p[t] for p in profiles) for t in range(len(macs))]
    step_macs = [macs[0], *(b - a for a, b in zip(macs, macs[1:]))]
    base = statistics.median(times["engine"])
    rows = []
    for name in table:
        correct, result = outcome[name]
        t = statistics.median(times[name])
        mean_step = len(macs) - 1 if result is None else float(result.steps.float().mean())
        mean_macs = macs[-1] if result is None else float(result.macs.double().mean())
        rows.append(dict(variant=name, seconds=t, speedup_vs_engine=base / t, accuracy=correct / n,
                         mean_step=mean_step, macs_fraction=mean_macs / macs[-1]))  # fmt: skip
    print(f"{n} examples, batch {args.batch}, {args.device}, {torch.get_num_threads()} threads, "
          f"{len(macs)} steps, {macs[-1] / 1e6:.2f} MMACs per example to the last step")  # fmt: skip
    if note:
        print(f"note: {note}")
    print(f"{'variant':>10} {'seconds':>9} {'vs engine':>9} {'accuracy':>9} {'mean step':>9} {'MACs':>7}")
    for r in rows:
        print(f"{r['variant']:>10} {r['seconds']:>9.3f} {r['speedup_vs_engine']:>8.2f}x {100 * r['accuracy']:>8.2f}% "
              f"{r['mean_step']:>9.2f} {100 * r['macs_fraction']:>6.1f}%")  # fmt: skip
    point = operating_point(args.run_dir, thresholds, args.tolerance, args.device) if args.run_dir else None
    if point:
        print(f"operating point chosen on validation: exit@{point['threshold']:g} "
              f"(validation {100 * point['val_accuracy']:.2f}% against {100 * point['val_last_step']:.2f}% at the "
              f"last step, within {point['tolerance_points']:g} points, fewest mean steps)")  # fmt: skip
    print(f"where the time goes (model.anytime to the end, median of {args.repeats}): per step, share of the wall time "
          "/ share of the MACs")  # fmt: skip
    print("  " + ", ".join(f"step {t}: {100 * p / sum(per_step):.0f}% / {100 * m / macs[-1]:.0f}%"
                           for t, (p, m) in enumerate(zip(per_step, step_macs))))  # fmt: skip
    if args.json:
        meta = dict(examples=n, batch=args.batch, device=args.device, threads=torch.get_num_threads(),
                    steps=len(macs), macs_last_step=macs[-1], note=note, run_dir=args.run_dir,
                    machine=platform.processor() or platform.machine(), torch=torch.__version__)  # fmt: skip
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "step_seconds": per_step, "step_macs": step_macs,
                       "operating_point": point}, f, indent=2)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
