"""Before and after precise batch norm, on trained runs: per-step accuracy, mean confidence per step and the
threshold policy, with and without the rule that no example stops before the first step that sees the input.

    python benchmarks/recalibration.py runs/demo/cascaded-td runs/demo/cascaded-ce --out docs/results/recalibration

"Before" is the run's last training checkpoint (``checkpoint.pt``: the running statistics as training left
them); "after" is its final weights (``model.safetensors``), whose statistics training recomputed at the final
weights over ``--recalibrate-batches`` training batches. Both are evaluated on the test split. Writes
``recalibration.md``, ``recalibration.json`` and ``recalibration.png`` in --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from cascadenet.evaluation import metrics
from cascadenet.evaluation.logits import dataset_logits
from cascadenet.models.checkpoint import CHECKPOINT, load_model
from cascadenet.runs.load import load_run


def measure(run_dir: Path, device: str) -> dict:
    loaded = load_run(run_dir, split="test", device=device)
    if not loaded.finished or not (run_dir / CHECKPOINT).is_file():
        raise SystemExit(f"{run_dir}: needs a finished run with its last checkpoint")
    before = load_model(run_dir / CHECKPOINT, map_location=loaded.data.images.device)
    labels = loaded.data.labels.cpu()
    out = {}
    for name, model in (("before", before), ("after", loaded.model)):
        logits = dataset_logits(model, loaded.data, loaded.mean, loaded.std, amp=loaded.amp)
        first = model.first_informative_exit
        # as eval.json computes them: the policy never stops before `first`, and its area starts at step 0's
        # accuracy; the other one lets the policy stop at step 0, which cannot see the input
        with_rule = metrics.summarize(logits, labels, first_step=first)
        without_rule = metrics.summarize(logits, labels, first_step=0)
        out[name] = {
            "accuracy_per_step": with_rule["accuracy_per_step"],
            "mean_confidence_per_step": with_rule["mean_confidence_per_step"],
            "threshold_auc": with_rule["threshold_auc"],
            "threshold_auc_stop_at_step0_allowed": without_rule["threshold_auc"],
            "threshold_curve": with_rule["threshold_curve"],
            "threshold_curve_stop_at_step0_allowed": without_rule["threshold_curve"],
        }
    return out


def report(results: dict[str, dict]) -> str:
    lines = ["# Precise batch norm: before and after, test split", ""]
    for run, r in results.items():
        T = len(r["before"]["accuracy_per_step"])
        lines += [f"## {run}", "", "| | " + " | ".join(f"t={t}" for t in range(T)) + " | threshold AUC | "
                  "threshold AUC, stopping at step 0 allowed |", "|---" * (T + 3) + "|"]  # fmt: skip
        for name in ("before", "after"):
            m = r[name]
            acc = " | ".join(f"{100 * a:.1f}" for a in m["accuracy_per_step"])
            conf = " | ".join(f"{c:.2f}" for c in m["mean_confidence_per_step"])
            lines.append(f"| {name}: accuracy % | {acc} | {m['threshold_auc']:.4f} | "
                         f"{m['threshold_auc_stop_at_step0_allowed']:.4f} |")  # fmt: skip
            lines.append(f"| {name}: mean confidence | {conf} | | |")
        lines.append("")
    lines.append("![threshold curves](recalibration.png)")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(results), 4))
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    for ax, (run, r) in zip(axes, results.items()):
        for name, style in (("before", "--"), ("after", "-")):
            for key, marker in (("threshold_curve", "o"), ("threshold_curve_stop_at_step0_allowed", "x")):
                c = r[name][key]
                order = np.argsort(c["mean_step"], kind="stable")
                label = f"{name}" + (", step-0 stops allowed" if key.endswith("allowed") else "")
                ax.plot(np.asarray(c["mean_step"])[order], 100 * np.asarray(c["accuracy"])[order], style,
                        marker=marker, markersize=3, label=label)  # fmt: skip
        ax.set_title(run)
        ax.set_xlabel("mean stopping step")
        ax.set_ylabel("accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="finished run directories")
    p.add_argument("--out", required=True, help="folder for recalibration.md/.json/.png")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {Path(run).name: measure(Path(run), args.device) for run in args.runs}
    (out / "recalibration.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out / "recalibration.png")
    (out / "recalibration.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
