"""``cascadenet reproduce``: the paper's comparison with one command, every model on the same data, seeds, recipe
and axes.

What it trains (every run with the same epochs, schedule, optimizer and augmentation; ``BUDGETS``):

| model | what | loss |
|---|---|---|
| CascadedTD | cascaded ResNet, parallel scheme, one head | TD(lambda) |
| CascadedTD-MultiHead | the same, one head per step | TD(lambda) |
| SerialTD | serial scheme, one head | TD(lambda) |
| SerialTD-MultiHead | serial scheme, one head per step (the paper's "SDN architecture") | TD(lambda) |
| CascadedCE / SerialCE | one ordinary ResNet, run as a cascade / serially at test time | feed-forward CE |
| SDN | internal classifiers on the same ResNet backbone (Kaya et al. 2019) | weighted per-exit CE |
| SDN-IC-only | the same, backbone trained first (feed-forward CE), frozen, then the classifiers | CE over the ICs |
| SDN-stem-IC | SDN with one more classifier, on the stem's output (an exit one unit deep) | weighted per-exit CE |
| MSDNet | the CIFAR multi-scale dense network (Huang et al. 2018), width matched to the ResNet's cost | CE over exits |

Equal tuning: every trained model gets the same number of configurations, chosen on the validation split (the
TD models: lambda from ``Budget.sweep``; CE, SDN, SDN with a stem classifier, MSDNet: the learning rate from
``Budget.lrs``; SDN-IC-only: its classifiers' learning rate from ``Budget.ic_lrs``), each trained with
``Budget.tuning_seeds`` seeds; the configuration with the best validation MACs AUC (mean over those seeds; on a
tie, the first offered) is the one reported, its tuning runs being seeds 0.. of the report. ``models`` restricts
a reproduction to some rows (the runs they need and nothing else).

Everything lives under ``<out>/<dataset>-<budget>/``: ``runs/<run>-s<seed>/`` (ordinary run directories) and the
report ``<dataset>.md``, every number in ``<dataset>.json`` and the plots. A finished run is reused only if its
stored configuration is what this command would train (else it refuses, naming the option); an unfinished one is
resumed. So the command can be interrupted and run again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..evaluation.evaluate import eval_filename, evaluate
from ..models.anytime import ModelConfig
from ..models.cascade import CascadeConfig
from ..models.checkpoint import WEIGHTS
from ..runs.config import CONFIG, RESUMABLE, TrainConfig, changed_options
from ..utils.files import atomic_write
from .reproduce_report import (  # noqa: F401 (BUDGETED_AT, COST_FRACTIONS, latency_budgets: importable here, where they were)
    BUDGETED_AT,
    COST_FRACTIONS,
    format_report,
    headline_statistics,
    latency_budgets,
    shared_ranges,
    summarize_reproduction,
)

__all__ = ["BUDGETS", "LAMBDAS", "LRS", "IC_LRS", "Budget", "reproduce", "train_or_reuse", "plan_runs", "ENTRIES"]

log = logging.getLogger(__name__)

# The tuning grids: as many configurations for every family (Budget.sweep, lrs, ic_lrs).
LAMBDAS = (0.5, 0.9)
LRS = (0.1, 0.05)
IC_LRS = (1e-3, 5e-4)  # SDN-IC-only's classifiers (Adam), the reference's 1e-3 and half of it


@dataclass(frozen=True)
class Budget:
    """The recipe every model of a reproduction shares."""

    description: str
    arch: str
    width: int
    stem: str
    epochs: int
    batch_size: int = 128
    lr: float = 0.1
    schedule: str = "onecycle"
    warmup_epochs: float = 0.5
    weight_decay: float = 5e-4
    max_batches: int | None = None
    sweep: tuple[float, ...] = LAMBDAS
    lrs: tuple[float, ...] = LRS
    ic_lrs: tuple[float, ...] = IC_LRS
    tuning_seeds: int = 2


BUDGETS = {
    # On 2 CPU cores the whole small reproduction (Fashion-MNIST, 3 seeds, the sweep) takes the time recorded in
    # docs/results/; it trains each model for 3 x 150 batches of 128 (a little over one pass over the data).
    "small": Budget(
        description="ResNet-10 width 8 (3x3 stem + max-pool), 3 epochs of 150 batches of 128, onecycle",
        arch="resnet10",
        width=8,
        stem="cifar_pool",
        epochs=3,
        max_batches=150,
    ),
    # The paper's recipe (ResNet-18 at full width, 150 epochs, SGD + Nesterov, lr 0.1, weight decay 5e-4, batch
    # 128); our schedule is onecycle instead of step decays, and the augmentation is crop + flip (no occluding patch).
    "full": Budget(
        description="ResNet-18 width 64 (3x3 stem, no pool), 150 epochs, onecycle (the paper's recipe)",
        arch="resnet18",
        width=64,
        stem="cifar",
        epochs=150,
        warmup_epochs=1.0,
    ),
}


@dataclass(frozen=True)
class Entry:
    """One row of the report: a trained run evaluated in a scheme."""

    key: str
    label: str
    run: str
    scheme: str | None = None  # evaluate the run's weights in this scheme (None: the model's own)


ENTRIES = (
    Entry("cascaded-td", "CascadedTD", "cascaded-td"),
    Entry("cascaded-td-mh", "CascadedTD-MultiHead", "cascaded-td-mh"),
    Entry("serial-td", "SerialTD", "serial-td"),
    Entry("serial-td-mh", "SerialTD-MultiHead", "serial-td-mh"),
    Entry("cascaded-ce", "CascadedCE", "ce", "parallel"),
    Entry("serial-ce", "SerialCE", "ce", "serial"),
    Entry("sdn", "SDN", "sdn"),
    Entry("sdn-stem", "SDN-stem-IC", "sdn-stem"),
    Entry("sdn-ic-only", "SDN-IC-only", "sdn-ic-only"),
    Entry("msdnet", "MSDNet", "msdnet"),
)


def _lam_tag(lam: float) -> str:
    return f"{lam:g}"


def _cascade(budget: Budget, **options: Any) -> CascadeConfig:
    return CascadeConfig(arch=budget.arch, width=budget.width, stem=budget.stem, **options)


def _sdn(budget: Budget, stem_ic: bool = False, input_size: tuple[int, int, int] = (3, 32, 32)) -> ModelConfig:
    """SDN on the recipe's backbone; with ``stem_ic``, its default classifiers plus one on the stem's output
    (the placement resolved at the data's input size, stored explicitly)."""
    from ..models.sdn import SDNConfig

    cfg = SDNConfig(arch=budget.arch, width=budget.width, stem=budget.stem)
    if not stem_ic:
        return cfg
    c, h, _ = input_size
    placed = SDNConfig(arch=budget.arch, width=budget.width, stem=budget.stem, in_channels=c, input_size=h).build()
    return SDNConfig(arch=budget.arch, width=budget.width, stem=budget.stem, ic_after=(0, *placed.ic_after))


@functools.cache  # builds a few models: once per recipe and data shape, not once per seed
def _msdnet(budget: Budget, input_size: tuple[int, int, int], num_classes: int) -> ModelConfig:
    """MSDNet with the reference CIFAR configuration's proportions kept (16 stem channels, growth rate 6 with
    factors 1-2-4 per scale, bottleneck factors 1-2-4, classifiers of 128 channels: width 1) and its cost matched
    to CascadedTD's full serial cost by the depth alone: ``num_blocks`` exits ``step`` layers apart (the first
    block ``step`` layers too), the pair among 2-10 blocks and steps 1, 2, 4, 8 whose full cost is nearest in ratio
    (ties: more blocks). The stem is the recipe's (``cifar_pool``: max-pooled, 4x cheaper on small images). (An
    earlier version shrank every width instead, to growth 1 and a 4-channel stem: a degenerate network whose
    exits were all alike.)"""
    from ..models.msdnet import MSDNetConfig

    c = input_size[0]
    target = _cascade(budget, in_channels=c, num_classes=num_classes).build().exit_costs(input_size).macs[-1]
    stem = "cifar_pool" if budget.stem == "cifar_pool" else "cifar"

    def config(blocks: int, step: int) -> MSDNetConfig:
        return MSDNetConfig(num_blocks=blocks, step=step, base=step, stem=stem, in_channels=c, num_classes=num_classes)

    def cost(blocks: int, step: int) -> int:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            return config(blocks, step).build().exit_costs(input_size).macs[-1]

    costs = {}
    for step in (1, 2, 4, 8):
        for blocks in range(2, 11):  # the cost grows with the blocks: no need to look past the target
            costs[blocks, step] = cost(blocks, step)
            if costs[blocks, step] >= target:
                break
    best = min(costs, key=lambda bs: (abs(math.log(costs[bs] / target)), -bs[0]))
    return config(*best)


# the option each run key tunes, in training order (SDN-IC-only starts from the SDN backbone's weights)
TUNED = {
    "cascaded-td": "lam",
    "cascaded-td-mh": "lam",
    "serial-td": "lam",
    "serial-td-mh": "lam",
    "ce": "lr",
    "sdn": "lr",
    "sdn-stem": "lr",
    "sdn-ic-only": "lr",
    "msdnet": "lr",
}


def offered(budget: Budget, key: str) -> tuple[float, ...]:
    """The configurations a run key is offered: lambdas (TD), classifier learning rates (SDN-IC-only), or
    learning rates."""
    if TUNED[key] == "lam":
        return budget.sweep
    return budget.ic_lrs if key == "sdn-ic-only" else budget.lrs


def plan_run(
    budget: Budget, base: dict[str, Any], key: str, value: float, seed: int, input_size: tuple[int, int, int],
    num_classes: int, runs_dir: Path,
) -> TrainConfig:  # fmt: skip
    """One training run: run key ``key`` with its tuned option (``TUNED[key]``) at ``value``, seed ``seed``."""

    def run(name: str, model: ModelConfig, **options: Any) -> TrainConfig:
        return TrainConfig(model=model, seed=seed, name=f"{name}-s{seed}", out=str(runs_dir), **{**base, **options})

    tag = f"{key}-{TUNED[key]}{_lam_tag(value)}" if key in TUNED else key
    if key == "sdn-backbone":
        return run(key, _sdn(budget), loss="final")
    if TUNED[key] == "lam":
        model = _cascade(budget, scheme="serial" if key.startswith("serial") else "parallel",
                         multi_head=key.endswith("-mh"))  # fmt: skip
        return run(tag, model, loss="td", lam=value)
    if key == "ce":
        return run(tag, _cascade(budget), loss="final", lr=value)
    if key in ("sdn", "sdn-stem"):
        return run(tag, _sdn(budget, key == "sdn-stem", input_size), loss="sdn", lr=value)
    if key == "sdn-ic-only":
        # the reference's IC-only recipe: Adam on the classifiers of a frozen, trained backbone
        backbone = plan_run(budget, base, "sdn-backbone", budget.lr, seed, input_size, num_classes, runs_dir)
        return run(tag, _sdn(budget), loss="ic-only", optimizer="adamw", lr=value,
                   init=str(runs_dir / backbone.run_name() / WEIGHTS))  # fmt: skip
    if key == "msdnet":
        return run(tag, _msdnet(budget, input_size, num_classes), loss="ce", lr=value)
    raise ValueError(f"unknown run key {key!r}")


def plan_runs(
    budget: Budget,
    base: dict[str, Any],
    seed: int,
    chosen: dict[str, float],
    input_size: tuple[int, int, int],
    num_classes: int,
    runs_dir: Path,
) -> dict[str, TrainConfig]:
    """The training runs of one seed at the chosen configurations, by run key (``ENTRIES[i].run``), in an order
    that respects dependencies (SDN-IC-only starts from the SDN backbone run's weights)."""
    out = {}
    for key, value in chosen.items():
        if key == "sdn-ic-only":
            out["sdn-backbone"] = plan_run(budget, base, "sdn-backbone", budget.lr, seed, input_size, num_classes,
                                           runs_dir)  # fmt: skip
        out[key] = plan_run(budget, base, key, value, seed, input_size, num_classes, runs_dir)
    return out


def _differences(stored: TrainConfig, wanted: TrainConfig) -> dict[str, Any]:
    ignore = set(RESUMABLE) | {"progress", "out"}
    diff = {k: v for k, v in changed_options(stored, wanted).items() if k not in ignore}
    # a reproduction's backbone, named inside the folder that moved (an older run stored it absolute)
    if "init" in diff and _same_place(stored, wanted):
        del diff["init"]
    if type(stored.model) is not type(wanted.model):
        diff["model"] = wanted.model.family
    return diff


def _same_place(stored: TrainConfig, wanted: TrainConfig) -> bool:
    """Both runs' --init name the same file relative to their --out folder."""
    if not (isinstance(stored.init, str) and isinstance(wanted.init, str)):
        return False
    return os.path.relpath(stored.init, stored.out) == os.path.relpath(wanted.init, wanted.out)


def train_or_reuse(cfg: TrainConfig) -> str:
    """Train ``cfg`` into ``cfg.out / cfg.run_name()``, resume it if it was interrupted, or reuse it if it is
    finished with the same configuration. Returns "trained", "resumed" or "reused".

    Raises:
        ValueError: the run directory holds a run with other options (naming the first that differs); nothing is
            changed.
    """
    from ..training.loop import train

    run_dir = Path(cfg.out) / cfg.run_name()
    if (run_dir / CONFIG).is_file():
        stored = TrainConfig.from_file(run_dir / CONFIG)
        diff = _differences(stored, cfg)
        if diff:
            name, value = next(iter(diff.items()))
            was = stored.options().get(name, type(stored.model).__name__)
            flag = "--" + name.replace("_", "-")
            more = f" (and {len(diff) - 1} other options)" if len(diff) > 1 else ""
            raise ValueError(
                f"{run_dir} holds a run trained with {flag} {was}, but this would train {flag} {value}{more}; use "
                "another --out or move that run away (nothing was changed)"
            )
        if (run_dir / WEIGHTS).is_file():
            return "reused"
        resumable = {k: v for k, v in changed_options(stored, cfg).items() if k in RESUMABLE}
        train(resume=run_dir, overrides=resumable)
        return "resumed"
    train(cfg)
    return "trained"


def _logits_file(run_dir: Path, scheme: str | None, model_scheme: str | None) -> Path:
    """Where the reproduction keeps a run's test logits (the statistics over examples read them)."""
    return run_dir / eval_filename(scheme, model_scheme, None).replace("eval", "logits").replace(".json", ".npz")


def _correct(run_dir: Path, scheme: str | None, model_scheme: str | None) -> np.ndarray:
    """Per exit and test example, whether the exit's argmax is the label, ``(E, N)``."""
    with np.load(_logits_file(run_dir, scheme, model_scheme)) as f:
        return f["logits"].argmax(axis=-1) == f["labels"][None, :]


def _eval_cached(run_dir: Path, scheme: str | None, model_scheme: str | None, device: str) -> dict[str, Any]:
    """The run's evaluation on the test split (and its logits), reusing an evaluation file written after the
    final weights."""
    path = run_dir / eval_filename(scheme, model_scheme, None)
    logits = _logits_file(run_dir, scheme, model_scheme)
    fresh = logits.is_file() and path.is_file()
    if fresh and path.stat().st_mtime >= (run_dir / WEIGHTS).stat().st_mtime:
        try:
            cached = json.loads(path.read_text())
            keys = ("macs_auc", "budgeted_batch", "latency_layers", "absolute_macs_auc")
            if isinstance(cached, dict) and all(k in cached for k in keys):
                return cached
        except ValueError:
            pass  # unreadable, or written by a version without these numbers: evaluate again
    return evaluate(run_dir, scheme=scheme if scheme != model_scheme else None, device=device, save_logits=logits,
                    overwrite=True)  # fmt: skip


def _metrics_rows(run_dir: Path, needed: tuple[str, ...]) -> list[dict[str, Any]]:
    """A finished run's ``metrics.jsonl``, every row holding ``needed``; a damaged file is one line naming it."""
    path = run_dir / "metrics.jsonl"
    fix = f"restore it, or move {run_dir} away to train that run again"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"{path}: missing from a finished run ({fix})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: damaged (not UTF-8 text; {fix})") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}: line {number} is not JSON (the file is damaged; {fix})") from None
        missing = [k for k in needed if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f"{path}: line {number} has no {missing[0]!r} (the file is damaged; {fix})")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no epoch recorded (the file is damaged; {fix})")
    return rows


def _last_row(run_dir: Path) -> dict[str, Any]:
    row = _metrics_rows(run_dir, ("val_anytime_auc", "val_accuracy_per_step"))[-1]
    per_step = row["val_accuracy_per_step"]
    if not isinstance(per_step, list) or not per_step or not isinstance(row["val_anytime_auc"], int | float):
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: the last row's validation numbers are damaged (restore it, "
                         f"or move {run_dir} away to train that run again)")  # fmt: skip
    return row


def _train_seconds(run_dir: Path) -> float:
    rows = _metrics_rows(run_dir, ("seconds",))
    if not all(isinstance(r["seconds"], int | float) for r in rows):
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: a row's 'seconds' is not a number (the file is damaged)")
    return sum(r["seconds"] for r in rows)


def reproduce(
    dataset: str = "fashion-mnist",
    *,
    data_root: str | None = None,
    seeds: int = 3,
    budget: str = "small",
    out: str | Path = "runs/reproduce",
    threads: int | None = 2,
    device: str = "auto",
    progress: bool = True,
    synthetic_size: int | None = None,
    recipe: Budget | None = None,
    models: tuple[str, ...] | None = None,
) -> Path:
    """Train (or reuse, or resume) every model of the comparison with an equal tuning budget (each
    configuration offered with ``tuning_seeds`` seeds, the best on validation chosen) and ``seeds`` seeds of the
    chosen one, evaluate them on the test split, and write the report. Returns the report's path.

    Args:
        recipe: a custom :class:`Budget` instead of ``BUDGETS[budget]`` (tests use tiny ones).
        synthetic_size: examples of the synthetic dataset (tests).
        models: the report rows to reproduce (``ENTRIES`` keys); default: all of them.
    """
    if budget not in BUDGETS and recipe is None:
        raise ValueError(f"unknown budget {budget!r}; valid choices: {', '.join(BUDGETS)}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"--seeds must be a positive integer, got {seeds!r}")
    spec = recipe or BUDGETS[budget]
    entries = _entries(models)
    grids = {len(spec.sweep), len(spec.lrs), len(spec.ic_lrs)}
    if len(grids) != 1 or 0 in grids:
        raise ValueError(
            "every family gets the same number of configurations: the recipe's sweep, lrs and ic_lrs must be "
            f"equally long and non-empty, got {len(spec.sweep)}, {len(spec.lrs)} and {len(spec.ic_lrs)}"
        )
    if threads:
        torch.set_num_threads(threads)
    from ..data.datasets import load_dataset

    # read before anything is made: missing data leaves no empty folders behind
    probe = load_dataset(dataset, data_root, "test", synthetic_size=synthetic_size, seed=0)
    root = Path(out) / f"{dataset}-{budget}"
    runs_dir = root / "runs"
    made = [p for p in (runs_dir, *runs_dir.parents) if not p.exists()]  # removed again if left empty
    runs_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _reproduce_in(root, runs_dir, probe, spec, dataset, data_root, seeds, budget, threads, device,
                             progress, synthetic_size, entries, models)  # fmt: skip
    except BaseException:
        for folder in made:  # deepest first: a refused or failed reproduction leaves no empty folders
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _reproduce_in(
    root: Path, runs_dir: Path, probe: Any, spec: Budget, dataset: str, data_root: str | None, seeds: int,
    budget: str, threads: int | None, device: str, progress: bool, synthetic_size: int | None, entries: Any,
    models: tuple[str, ...] | None,
) -> Path:  # fmt: skip
    data_shape = (tuple(probe.images.shape[1:]), len(probe.classes))
    base = _shared_options(spec, dataset, data_root, synthetic_size, threads, device)
    started = time.perf_counter()
    keys = [k for k in TUNED if any(e.run == k for e in entries)]
    total = len(keys) * (len(spec.sweep) * spec.tuning_seeds + max(0, seeds - spec.tuning_seeds))
    bar = tqdm(total=total, desc="reproduce", unit="run", disable=not progress)
    how: dict[str, str] = {}

    def ensure(cfg: TrainConfig) -> Path:
        name = cfg.run_name()
        if name not in how:
            bar.set_postfix_str(name)
            how[name] = train_or_reuse(cfg)
            log.info("%s: %s", name, how[name])
        bar.update(1)
        return runs_dir / name

    tuning = _tune(spec, base, keys, data_shape, runs_dir, ensure)
    chosen = {key: t["chosen"] for key, t in tuning.items()}
    per_seed, run_dirs, correct = _seed_results(spec, base, seeds, chosen, entries, data_shape, root, ensure, device)
    bar.close()
    elapsed = time.perf_counter() - started
    record = _record(dataset, budget, spec, seeds, tuning, entries, per_seed, run_dirs, how, elapsed, runs_dir)
    record["models_asked"] = list(models) if models is not None else None
    record["statistics"] = headline_statistics(per_seed, correct)
    # the command's own outputs, rewritten whole on every call (atomically: a kill leaves the previous ones)
    atomic_write(root / f"{dataset}.json", (json.dumps(record, indent=1) + "\n").encode())
    figures = _plots(root, dataset, per_seed, entries)
    report = root / f"{dataset}.md"
    atomic_write(report, format_report(record, figures).encode())
    return report


def _entries(models: tuple[str, ...] | None) -> tuple[Entry, ...]:
    """The report rows asked for (all by default); CascadedTD always, as costs are read relative to it."""
    if models is None:
        return ENTRIES
    known = [e.key for e in ENTRIES]
    unknown = [m for m in models if m not in known]
    if unknown or not models:
        raise ValueError(f"unknown --models {', '.join(unknown) or '(none)'}; valid choices: {', '.join(known)}")
    wanted = {"cascaded-td", *models}
    return tuple(e for e in ENTRIES if e.key in wanted)


def _shared_options(
    spec: Budget, dataset: str, data_root: str | None, synthetic_size: int | None, threads: int | None, device: str
) -> dict[str, Any]:
    """The training options every run of the reproduction shares: the data, the recipe, where it runs."""
    return dict(dataset=dataset, data_root=data_root, synthetic_size=synthetic_size, epochs=spec.epochs,
                batch_size=spec.batch_size, lr=spec.lr, schedule=spec.schedule, warmup_epochs=spec.warmup_epochs,
                weight_decay=spec.weight_decay, max_batches=spec.max_batches, threads=threads, device=device,
                progress=False)  # fmt: skip


def _val_macs_auc(run_dir: Path, input_size: tuple[int, int, int]) -> tuple[float, float]:
    """A finished run's last validation: its MACs AUC (own full cost; the configurations compared share the
    model, so the axis) and its final exit's accuracy."""
    from ..evaluation import metrics

    row = _last_row(run_dir)
    model = TrainConfig.from_file(run_dir / CONFIG).model
    costs = model.build().exit_costs(input_size)
    acc = row["val_accuracy_per_step"]
    return metrics.cost_auc(acc, costs.macs, model.num_classes), acc[-1]


def _tune(
    spec: Budget, base: dict[str, Any], keys: list[str], data_shape: tuple[tuple[int, int, int], int],
    runs_dir: Path, ensure: Callable[[TrainConfig], Path],
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Every configuration each run key is offered, trained with ``tuning_seeds`` seeds and read on validation;
    per key: the option, what was offered, a row per run, the mean validation MACs AUC per value, the choice."""
    input_size, num_classes = data_shape
    out = {}
    for key in keys:
        rows = []
        for value in offered(spec, key):
            for seed in range(spec.tuning_seeds):
                if key == "sdn-ic-only":
                    ensure(plan_run(spec, base, "sdn-backbone", spec.lr, seed, input_size, num_classes, runs_dir))
                run_dir = ensure(plan_run(spec, base, key, value, seed, input_size, num_classes, runs_dir))
                auc, final = _val_macs_auc(run_dir, input_size)
                rows.append({"value": value, "seed": seed, "val_macs_auc": auc, "val_final_accuracy": final})
        means = {v: float(np.mean([r["val_macs_auc"] for r in rows if r["value"] == v])) for v in offered(spec, key)}
        best = max(means, key=lambda v: (means[v], -offered(spec, key).index(v)))
        out[key] = {"option": TUNED[key], "offered": list(offered(spec, key)), "seeds": spec.tuning_seeds,
                    "rows": rows, "mean_val_macs_auc": list(means.values()), "chosen": best}  # fmt: skip
    return out


def _seed_results(
    spec: Budget, base: dict[str, Any], seeds: int, chosen: dict[str, float], entries: tuple[Entry, ...],
    data_shape: tuple[tuple[int, int, int], int], root: Path, ensure: Callable[[TrainConfig], Path], device: str,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[str]], dict[str, list[np.ndarray]]]:  # fmt: skip
    """Every seed's runs trained (or resumed, or reused) and each report entry evaluated on the test split: per
    entry, the evaluation of each seed, its run directory (relative to ``root``) and its per-exit correctness."""
    runs_dir = root / "runs"
    input_size, num_classes = data_shape
    per_seed: dict[str, list[dict[str, Any]]] = {e.key: [] for e in entries}
    run_dirs: dict[str, list[str]] = {e.key: [] for e in entries}
    correct: dict[str, list[np.ndarray]] = {e.key: [] for e in entries}
    for seed in range(seeds):
        plan = plan_runs(spec, base, seed, chosen, input_size, num_classes, runs_dir)
        dirs = {key: ensure(cfg) for key, cfg in plan.items()}
        for entry in entries:
            run_dir = dirs[entry.run]
            model_scheme = getattr(plan[entry.run].model, "scheme", None)
            result = _eval_cached(run_dir, entry.scheme, model_scheme, device)
            result["train_seconds"] = _train_seconds(run_dir)
            correct[entry.key].append(_correct(run_dir, entry.scheme, model_scheme))
            per_seed[entry.key].append(result)
            run_dirs[entry.key].append(str(run_dir.relative_to(root)))
    return per_seed, run_dirs, correct


def _record(
    dataset: str, budget: str, spec: Budget, seeds: int, tuning: dict[str, dict[str, Any]],
    entries: tuple[Entry, ...], per_seed: dict[str, list[dict[str, Any]]], run_dirs: dict[str, list[str]],
    how: dict[str, str], elapsed: float, runs_dir: Path,
) -> dict[str, Any]:  # fmt: skip
    """The reproduction's JSON record: the recipe, the tuning (offered, rows, chosen), each model's summary over
    seeds and every seed's evaluation, the paired statistics, how each run came to be, the time taken and the
    machine."""
    summary = summarize_reproduction(per_seed)
    return {
        "dataset": dataset,
        "budget": budget,
        "recipe": dataclasses.asdict(spec),
        "seeds": list(range(seeds)),
        "tuning": tuning,
        "ranges": shared_ranges(per_seed),
        "models": {e.key: {"label": e.label, "runs": run_dirs[e.key], **summary[e.key]} for e in entries},
        "per_seed": per_seed,
        "how": how,
        "seconds": elapsed,
        # training time of every run (epochs and validation, from metrics.jsonl), whichever invocation trained it
        "train_seconds_total": sum(_train_seconds(runs_dir / name) for name in how),
        "machine": {
            "cpu": _cpu_name(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "platform": platform.platform(),
        },  # fmt: skip
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _plots(
    root: Path, dataset: str, per_seed: dict[str, list[dict[str, Any]]], entries: tuple[Entry, ...]
) -> dict[str, str]:
    from ..evaluation.plotting import plot_mean_curves

    labels = {e.key: e.label for e in entries}
    groups = {labels[k]: v for k, v in per_seed.items()}
    figures = {}
    for axis in ("latency", "layers", "macs"):
        if axis == "layers" and any(r.get("latency_layers") is None for v in per_seed.values() for r in v):
            continue
        path = root / f"{dataset}-{axis}.png"
        plot_mean_curves(groups, path, axis=axis, title=f"{dataset}, test split, mean over seeds")
        figures[axis] = path.name
    path = root / f"{dataset}-budgeted.png"
    title = f"{dataset}: exits and budgeted batch (dashed) on absolute MACs"
    plot_mean_curves(groups, path, axis="macs", budgeted=True, title=title)
    figures["budgeted"] = path.name
    return figures
