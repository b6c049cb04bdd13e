"""Per-exit accuracy and cost of MSDNets of one proportion at several depths: writes depth.md and depth.json.

    python docs/results/msdnet-depth/depth.py OUT GROUP=RUN_DIR[,RUN_DIR...] ...

Each GROUP is one configuration (its seeds as run directories). Reads every run's eval.json (test split) and,
where present, eval-train.json (`cascadenet eval RUN --split train`); mean ± sample sd over the group's runs.
"""

import json
import statistics
import sys
from pathlib import Path

import torch

from cascadenet.models.msdnet import MSDNetConfig


def ms(values: list[float], scale: float = 100) -> str:
    mean = statistics.fmean(values) * scale
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {sd:.1f}" if len(values) > 1 else f"{mean:.1f}"


def load(run: Path, name: str) -> dict | None:
    path = run / name
    return json.loads(path.read_text()) if path.is_file() else None


def main(out: str, groups: list[str]) -> None:
    rows, lines = [], []
    for group in groups:
        label, dirs = group.split("=", 1)
        runs = [Path(d) for d in dirs.split(",")]
        test = [load(r, "eval.json") for r in runs]
        train = [t for t in (load(r, "eval-train.json") for r in runs) if t is not None]
        config = {k: v for k, v in test[0]["model"].items() if k not in ("format", "family")}
        with torch.device("meta"):
            params = sum(p.numel() for p in MSDNetConfig(**config).build().parameters())
        train_cfg = json.loads((runs[0] / "config.json").read_text())["train"]
        row = {
            "label": label,
            "runs": [str(r) for r in runs],
            "seeds": [json.loads((r / "config.json").read_text())["train"]["seed"] for r in runs],
            "epochs": train_cfg["epochs"],
            "max_batches": train_cfg["max_batches"],
            "lr": train_cfg["lr"],
            "model": config,
            "parameters": params,
            "macs_per_exit": test[0]["macs_per_step"],
            "latency_blocks": test[0]["parallel_latency_blocks"],
            "latency_layers": test[0]["latency_layers"],
            "test_accuracy_per_exit": [t["accuracy_per_step"] for t in test],
            "train_accuracy_per_exit": [t["accuracy_per_step"] for t in train],
        }
        rows.append(row)
        exits = len(row["macs_per_exit"])
        test_cells = [ms([t[i] for t in row["test_accuracy_per_exit"]]) for i in range(exits)]
        train_cells = [ms([t[i] for t in row["train_accuracy_per_exit"]]) for i in range(exits)] if train else []
        lines += [
            f"### {label}",
            "",
            f"{config['num_blocks']} blocks, step {config['step']}, first block {config['base']} layer(s); "
            f"{params / 1e6:.2f} M parameters; {row['epochs']} epochs of {row['max_batches']} batches, "
            f"lr {row['lr']:g}; "
            f"seeds {', '.join(map(str, row['seeds']))}.",
            "",
            "| exit | " + " | ".join(str(i + 1) for i in range(exits)) + " |",
            "|---|" + "---|" * exits,
            "| MMACs (cumulative) | " + " | ".join(f"{m / 1e6:.2f}" for m in row["macs_per_exit"]) + " |",
            "| latency (blocks / layers) | "
            + " | ".join(f"{b:g} / {n:g}" for b, n in zip(row["latency_blocks"], row["latency_layers"]))
            + " |",
            "| test accuracy % | " + " | ".join(test_cells) + " |",
        ]
        if train_cells:
            lines.append("| train accuracy % (no augmentation) | " + " | ".join(train_cells) + " |")
        lines.append("")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    head = [
        "# MSDNet: does depth add accuracy? (Fashion-MNIST, the small reproduction's recipe)",
        "",
        "Written by `python docs/results/msdnet-depth/depth.py` (command in docs/results/README.md). Test split, "
        "10,000 examples; mean ± sample sd over seeds where more than one. Every network has the reproduction's "
        "MSDNet proportions (16 stem channels, growth 6 with factors 1-2-4, bottleneck factors 1-2-4, 128-channel "
        "classifiers, pooled stem); only the number of blocks and the layers between exits differ.",
        "",
    ]
    (folder / "depth.md").write_text("\n".join(head + lines))
    (folder / "depth.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
