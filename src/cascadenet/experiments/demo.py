"""The main job (`make demo`): CascadedTD against CascadedCE on Fashion-MNIST, on 2 CPU cores in minutes.

Both runs use the same small cascaded ResNet-10 (width 16, 3x3 stem with max-pool: 14x14 feature maps in the
first stage). CascadedTD is trained on its trajectory with TD(lambda); CascadedCE is the same network trained
as an ordinary ResNet with feed-forward cross-entropy and run as a cascade only at test time. The report
compares their per-step test accuracy and anytime AUC and overlays their speed-accuracy curves.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from pathlib import Path

import torch

from ..evaluation.evaluate import evaluate
from ..evaluation.plotting import plot_runs
from ..models.cascade import CascadeConfig
from ..runs.config import TrainConfig, changed_options
from ..utils.files import atomic_write, new_folder
from .reproduce import train_or_reuse

__all__ = ["DEMO_RUNS", "run_demo"]

log = logging.getLogger(__name__)

_COMMON = dict(model=CascadeConfig(arch="resnet10", width=16, stem="cifar_pool"), dataset="fashion-mnist",
               batch_size=128, lr=0.1, schedule="onecycle", warmup_epochs=0.5, seed=0)  # fmt: skip
DEMO_RUNS = {
    "cascaded-td": TrainConfig(**_COMMON, loss="td", lam=0.5, epochs=6),
    "cascaded-ce": TrainConfig(**_COMMON, loss="final", epochs=6),
}


def run_demo(
    out: str | Path = "runs/demo",
    *,
    data_root: str | None = None,
    threads: int | None = 2,
    device: str = "auto",
    epochs: int | None = None,
    progress: bool | None = None,
) -> Path:
    """Train (or reuse) both demo runs, evaluate them on the test split, plot, and write ``report.md``.
    ``progress``: progress bars (None: training's default, when stderr is a terminal)."""
    out = Path(out)
    # every run's options checked before anything is written (--epochs 0 is refused, not the default)
    configs = {name: dataclasses.replace(base, out=str(out), name=name, data_root=data_root, threads=threads,
                                         device=device, epochs=base.epochs if epochs is None else epochs,
                                         progress=progress)
               for name, base in DEMO_RUNS.items()}  # fmt: skip
    if threads:
        torch.set_num_threads(threads)
    results, timings = [], {}
    for name, cfg in configs.items():
        t0 = time.perf_counter()
        how = train_or_reuse(cfg)  # refuses a run directory holding a run with other options
        timings[name] = (how, time.perf_counter() - t0)
        log.info("%s: %s in %.0fs", name, how, timings[name][1])
        results.append((name, evaluate(out / name, device=device, progress=progress is True)))
    with new_folder(out):  # training made it; a refused demo leaves no folder
        figure = plot_runs(results, out / "speed_accuracy.png", title="Fashion-MNIST test set, ResNet-10 cascade")
        report = out / "report.md"
        atomic_write(report, _report(results, timings, configs, figure.name).encode())
    return report


def _options(cfg: TrainConfig) -> str:
    """The command-line options that differ from the defaults: what reproduces the run."""
    flags = []
    for name, value in changed_options(TrainConfig(), cfg).items():
        if name != "progress":
            flag = "--" + name.replace("_", "-")
            flags.append(flag if value is True else f"--no-{flag[2:]}" if value is False else f"{flag} {value}")
    return " ".join(flags)


def _report(
    results: list[tuple[str, dict]], timings: dict[str, tuple[str, float]], configs: dict[str, TrainConfig], figure: str
) -> str:
    T = max(len(r["accuracy_per_step"]) for _, r in results)
    head = "| run | " + " | ".join(f"t={t}" for t in range(T)) + " | feed-forward | anytime AUC | threshold AUC |"
    rule = "|---" * (T + 4) + "|"
    rows = []
    for name, r in results:
        steps = " | ".join(f"{100 * a:.1f}" for a in r["accuracy_per_step"])
        rows.append(f"| {name} | {steps} | {100 * r['feedforward_accuracy']:.1f} | {r['anytime_auc']:.4f} | "
                    f"{r['threshold_auc']:.4f} |")  # fmt: skip
    td, ce = dict(results)["cascaded-td"], dict(results)["cascaded-ce"]
    lines = [
        "# cascadenet demo: CascadedTD vs CascadedCE on Fashion-MNIST",
        "",
        f"Test split, {td['num_examples']} examples; per-step accuracy in %. Step 0 cannot see the input (the stem is",
        "delayed by one step); the cascade settles to the feed-forward network at the last step.",
        "",
        head,
        rule,
        *rows,
        "",
        f"- CascadedTD final-step accuracy: **{100 * td['final_accuracy']:.2f}%** (target >= 90%)",
        f"- anytime AUC: CascadedTD **{td['anytime_auc']:.4f}** vs CascadedCE **{ce['anytime_auc']:.4f}**",
        f"- first step reaching 95% of final accuracy: CascadedTD {td['steps_to_95pct_final']}, "
        f"CascadedCE {ce['steps_to_95pct_final']}",
        f"- serial-hardware cost of the full trajectory: {td['macs_per_step'][-1] / 1e6:.1f} MMACs "
        f"(one feed-forward pass: {td['macs_feedforward'] / 1e6:.1f} MMACs)",
        "",
        f"![speed-accuracy]({figure})",
        "",
        "## How this was made",
        "",
        f"`make demo` on {platform.machine()} with torch {torch.__version__}, {torch.get_num_threads()} threads. "
        "Each run is equivalent to:",
        "",
        *[
            f"- {name} ({how} in {sec:.0f} s): `cascadenet train {_options(configs[name])}`"
            for name, (how, sec) in timings.items()
        ],  # fmt: skip
        "",
    ]
    return "\n".join(lines)
