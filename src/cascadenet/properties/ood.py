"""Out-of-distribution detection from an anytime model's output trace (``cascadenet ood``).

A cascade produces a prediction at every step, so an input leaves a *trace*: how confident each exit is, how
often the prediction changes, when it settles. This module scores inputs by that trace and measures how well
each score tells in-distribution inputs (the run's test split) from out-of-distribution ones.

The scores, the metrics that judge them (AUROC, FPR at 95% TPR) and their conventions (in-distribution is the
positive class; every score is higher for it; the exits before ``model.first_informative_exit`` are left out)
are in ``cascadenet.properties.ood_scores``, their names importable from here too. The report also gives the MSP
and entropy AUROC at every exit and the mean entropy per exit (the entropy profile).

The learned detector never sees the out-of-distribution source it is tested on: it is fitted on the run's
validation split (in) against synthetic sets made from that split (out), leaving out the tested kind
(:func:`fit_sources`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data.datasets import DATASETS, DataError, ImageSet, load_dataset, resize_crop, split_classes
from ..evaluation.logits import dataset_logits
from ..models.checkpoint import CheckpointError
from ..runs.config import CONFIG, TrainConfig
from ..runs.load import load_run
from ..utils.files import atomic_write_all, new_folder
from .ood_scores import (
    BASELINE,
    SCORES,
    LogisticDetector,
    auroc,
    fpr_at_tpr,
    last_exit_features,
    roc_curve,
    settle_steps,
    step_profiles,
    trace_features,
    trace_scores,
)

__all__ = [
    "OUTPUTS",
    "SCORES",
    "SYNTHETIC",
    "LogisticDetector",
    "auroc",
    "convert_images",
    "fit_sources",
    "format_report",
    "fpr_at_tpr",
    "last_exit_features",
    "ood_run",
    "roc_curve",
    "settle_steps",
    "step_profiles",
    "synthetic_ood",
    "trace_features",
    "trace_scores",
]

# Synthetic out-of-distribution sets, always available (made from in-distribution images, or from nothing).
SYNTHETIC: dict[str, str] = {
    "noise": "uniform noise: every pixel of every channel drawn uniformly from 0..255",
    "inverted": "in-distribution images with every pixel inverted (255 - x)",
    "vflip": "in-distribution images flipped upside down (training flips only left-right)",
}
OUTPUTS = ("ood.md", "ood.json", "ood.png")
LUMINANCE = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's RGB -> L


def fit_sources(tested: str) -> list[str]:
    """The synthetic kinds the detector tested on ``tested`` is fitted on: every kind of :data:`SYNTHETIC` but
    the tested one (all of them for held-out classes or another dataset)."""
    return [k for k in SYNTHETIC if k != tested]


# ----------------------------------------------------------------------------------------------------------------
# Out-of-distribution images


def convert_images(images: Tensor, channels: int, size: tuple[int, int]) -> Tensor:
    """uint8 images ``(N, C, H, W)`` as a model of ``channels`` input channels and ``size`` (H, W) sees them:
    RGB to grey by luminance (ITU-R BT.601), grey to RGB by repeating the channel; then scaled (antialiased
    bilinear) to cover ``size`` and centre-cropped to it.

    Raises:
        ValueError: a channel count other than 1 or 3 that differs from ``channels``.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    have = images.shape[1]
    if have != channels:
        if have == 3 and channels == 1:
            weights = torch.tensor(LUMINANCE, dtype=torch.float32).view(1, 3, 1, 1)
            images = (images.float() * weights).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
        elif have == 1 and channels == 3:
            images = images.repeat(1, 3, 1, 1)
        else:
            raise ValueError(f"cannot convert {have}-channel images for a model of {channels} input channels")
    return resize_crop(images, size).contiguous()


def synthetic_ood(kind: str, images: Tensor, seed: int = 0) -> Tensor:
    """A synthetic out-of-distribution set (:data:`SYNTHETIC`) the shape of ``images`` (uint8 ``(N, C, H, W)``):
    noise drawn from ``seed``, or the images inverted or flipped upside down."""
    if kind == "noise":
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, 256, tuple(images.shape), generator=g, dtype=torch.uint8)
    if kind == "inverted":
        return 255 - images.cpu()
    if kind == "vflip":
        return images.cpu().flip(2)
    raise ValueError(f"unknown synthetic OOD kind {kind!r}; valid choices: {', '.join(SYNTHETIC)}")


# ----------------------------------------------------------------------------------------------------------------
# A run's report


@dataclasses.dataclass
class _OODSet:
    key: str
    title: str
    description: str
    images: Tensor  # uint8 (N, C, H, W), as the model sees them
    fit_on: list[str]  # the synthetic kinds its detector is fitted on


def ood_run(
    run_dir: str | os.PathLike,
    *,
    ood_dataset: str | None = None,
    ood_data: str | os.PathLike | None = None,
    holdout: bool = False,
    synthetic: bool = False,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    data_root: str | None = None,
    batch_size: int = 500,
    device: str = "auto",
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Measure how well trace scores detect out-of-distribution inputs of a trained run; writes ``ood.md``,
    ``ood.json`` and ``ood.png`` in ``out`` (default ``RUN_DIR/ood``) and returns the JSON's content.

    In-distribution: the run's test split (its kept classes, for a run trained with ``--holdout-classes``).
    Out-of-distribution sets: the held-out classes of the test split (``holdout``), the test split of another
    dataset (``ood_dataset`` read from ``ood_data``, converted to the model's channels and size), the synthetic
    sets of :data:`SYNTHETIC` (``synthetic``); none of the three asked: the held-out classes (when the run has
    them) and the synthetic sets.

    Args:
        run_dir: a run directory written by ``cascadenet train``.
        ood_dataset: a dataset name (``cascadenet.data.datasets.DATASETS``) whose test split is out-of-distribution.
        ood_data: its folder (default: the dataset's usual place, where it has one).
        holdout: test on the held-out classes (the run must have been trained with ``--holdout-classes``).
        synthetic: test on the synthetic sets.
        out: the report's folder (created if missing); its files are never replaced unless ``overwrite``.
        data_root: the run's dataset folder, if it moved since training.
        batch_size: examples per forward pass.
        device: cpu, cuda, cuda:N or auto.
        seed: seed of the noise images (the tested and the fitted noise are different draws).
        progress: progress bars.

    Raises:
        ValueError: a bad option (the message names it); FileExistsError: a report file exists;
        cascadenet.models.checkpoint.CheckpointError, cascadenet.data.datasets.DataError: an unusable run or dataset.
    """
    run_dir = Path(run_dir)
    cfg, holdout, synthetic = _check_options(run_dir, ood_dataset, ood_data, holdout, synthetic, batch_size, seed)
    out_dir = Path(out) if out is not None else run_dir / "ood"
    _check_outputs(out_dir, overwrite)

    loaded = load_run(run_dir, split="test", data_root=data_root, device=device)
    first = loaded.model.first_informative_exit

    def logits_of(images: Tensor, desc: str) -> Tensor:
        return _logits(loaded, images, desc, batch_size, progress)

    sets = _ood_sets(cfg, loaded.data, holdout, synthetic, ood_dataset, ood_data, data_root, seed)
    in_logits = logits_of(loaded.data.images, "in-distribution (test)")
    fit = _detector_features(run_dir, data_root, device, logits_of, first, seed)
    results, curves = _compare_sets(sets, in_logits, fit, logits_of, first)
    result = _record(run_dir, cfg, loaded.data, in_logits, first, fit is not None, synthetic, seed, results)
    _write_report(out_dir, result, curves, overwrite)
    return result


def _check_options(
    run_dir: Path, ood_dataset: str | None, ood_data: Any, holdout: bool, synthetic: bool, batch_size: int, seed: int
) -> tuple[TrainConfig, bool, bool]:
    """Check ``ood_run``'s options against each other and the run; returns the run's configuration and which of
    the held-out classes and the synthetic sets to test (both where they can be, when no set was asked)."""
    if ood_data is not None and ood_dataset is None:
        raise ValueError("--ood-data names the folder of --ood-dataset: pass --ood-dataset NAME too")
    if ood_dataset is not None and ood_dataset not in DATASETS:
        raise ValueError(f"unknown --ood-dataset {ood_dataset!r}; valid choices: {', '.join(DATASETS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be an integer >= 0, got {seed!r}")
    if not (run_dir / CONFIG).is_file():
        raise CheckpointError(f"{run_dir}: no {CONFIG} here: not a run directory")
    cfg = TrainConfig.from_file(run_dir / CONFIG)
    if holdout and not cfg.holdout_classes:
        raise ValueError(f"--holdout: {run_dir} was trained on every class (train with --holdout-classes to hold "
                         "some out)")  # fmt: skip
    if not (holdout or synthetic or ood_dataset):
        holdout, synthetic = bool(cfg.holdout_classes), True
    return cfg, holdout, synthetic


def _logits(loaded: Any, images: Tensor, desc: str, batch_size: int, progress: bool) -> Tensor:
    """The exit logits ``(E, N, C)`` of uint8 images through a loaded run's model, normalised as its test split."""
    test, dev = loaded.data, loaded.data.images.device
    ds = ImageSet(images.to(dev), torch.zeros(len(images), dtype=torch.int64, device=dev), test.classes,
                  test.name, hflip=False)  # fmt: skip
    return dataset_logits(loaded.model, ds, loaded.mean, loaded.std, batch_size=batch_size, amp=loaded.amp,
                          progress=progress, desc=desc)  # fmt: skip


def _detector_features(
    run_dir: Path, data_root: str | None, device: str, logits_of: Callable[[Tensor, str], Tensor], first: int, seed: int
) -> dict[str, np.ndarray] | None:
    """The learned detector's training features: the run's validation split (``in``) and each synthetic kind made
    from it (never the test split); None when the run held out no validation split."""
    val_images = _validation_images(run_dir, data_root, device)
    if val_images is None:
        return None
    fit = {"in": trace_features(logits_of(val_images, "validation (detector)"), first)}
    for kind in SYNTHETIC:
        images = synthetic_ood(kind, val_images, seed=2 * seed + 1)
        fit[kind] = trace_features(logits_of(images, f"{kind} of validation (detector)"), first)
    return fit


def _compare_sets(
    sets: list[_OODSet],
    in_logits: Tensor,
    fit: dict[str, np.ndarray] | None,
    logits_of: Callable[[Tensor, str], Tensor],
    first: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every OOD set scored against the in-distribution trace (with its own learned detector, when there is a
    validation split to fit it on): the result of each set and its ROC curves."""
    in_scores = trace_scores(in_logits, first)
    in_prof = step_profiles(in_logits, first)
    in_features = trace_features(in_logits, first)
    results, curves = {}, {}
    for s in sets:
        logits = logits_of(s.images, s.key)
        scores = trace_scores(logits, first)
        detector = None
        if fit is not None:
            out_fit = np.concatenate([fit[k] for k in s.fit_on])
            detector = LogisticDetector.fit(fit["in"], out_fit)
            features = trace_features(logits, first)
            scores["learned"] = detector.score(features)
            in_scores["learned"] = detector.score(in_features)
            # the ablation: the same detector, the same sets, the last exit's features only
            last = LogisticDetector.fit(last_exit_features(fit["in"]), last_exit_features(out_fit))
            scores["learned_last"] = last.score(last_exit_features(features))
            in_scores["learned_last"] = last.score(last_exit_features(in_features))
        prof = step_profiles(logits, first)
        results[s.key] = _compare(s, in_scores, scores, in_prof, prof, detector)
        curves[s.key] = {name: roc_curve(in_scores[name], scores[name]) for name in SCORES if name in scores}
        in_scores.pop("learned", None)  # each set's detector is its own
        in_scores.pop("learned_last", None)
    return results, curves


def _record(
    run_dir: Path, cfg: TrainConfig, test: ImageSet, in_logits: Tensor, first: int, detector: bool, synthetic: bool,
    seed: int, results: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """``ood_run``'s JSON-ready result: the in-distribution data, the conventions, the scores, the detector, and
    the in-distribution profile beside each OOD set's result."""
    in_prof = step_profiles(in_logits, first)
    return {
        "run": run_dir.name,
        "in_distribution": {
            "dataset": cfg.dataset,
            "split": "test",
            "examples": len(test),
            "classes": test.classes,
            "holdout_classes": list(cfg.holdout_classes or []),
        },  # fmt: skip
        "exits": int(in_logits.shape[0]),
        "first_exit": first,
        "conventions": {
            "positive": "in-distribution; every score is higher for in-distribution inputs",
            "auroc": "Mann-Whitney: P(in > out) + P(in = out) / 2",
            "fpr95": "share of OOD accepted by the highest threshold (score >= t) accepting >= 95% of in-distribution",
            "exits": f"exits {first}..{in_logits.shape[0] - 1} (those that see the input)",
        },
        "scores": SCORES,
        "detector": (
            "logistic regression (L2 1e-3, classes weighted equally, Newton from zero) on per-exit max softmax and "
            "entropy, flips and settling step; fitted on the run's validation split (in) against the synthetic "
            f"kinds made from it other than the tested one (noise seed {2 * seed + 1})"
            if detector
            else None
        ),
        "synthetic": {k: SYNTHETIC[k] for k in SYNTHETIC} if synthetic else {},
        "in_profile": {
            "mean_msp": in_prof["msp"].mean(1).tolist(),
            "mean_entropy": in_prof["entropy"].mean(1).tolist(),
        },
        "ood_sets": results,
    }


def _check_outputs(out_dir: Path, overwrite: bool) -> None:
    """Before any work: the report's folder is usable and holds none of its files (unless ``overwrite``)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file, not a folder")
    if not overwrite:
        for name in OUTPUTS:
            if (out_dir / name).exists():
                raise FileExistsError(f"{out_dir / name} exists; pass --overwrite to replace it (nothing was written)")


def _validation_images(run_dir: Path, data_root: str | None, device: str) -> Tensor | None:
    """The run's own validation split (kept classes only), or None when it held none out."""
    try:
        return load_run(run_dir, split="val", data_root=data_root, device=device).data.images
    except CheckpointError:
        raise
    except ValueError as e:
        if "held out no validation split" in str(e):
            return None
        raise


def _ood_sets(cfg: TrainConfig, test: ImageSet, holdout: bool, synthetic: bool, ood_dataset: str | None,
              ood_data: Any, data_root: str | None, seed: int) -> list[_OODSet]:  # fmt: skip
    shape = tuple(test.images.shape[1:])
    sets = []
    if holdout:
        full = load_dataset(cfg.dataset, data_root or cfg.data_root, "test", image_size=cfg.image_size,
                            synthetic_size=cfg.synthetic_size, seed=cfg.seed)  # fmt: skip
        held = split_classes(full, cfg.holdout_classes)[1]
        if len(held) == 0:
            raise ValueError(f"--holdout: the test split has no example of the held-out classes {cfg.holdout_classes}")
        names = ", ".join(f"{c} {full.classes[c]}" for c in cfg.holdout_classes)
        sets.append(_OODSet("heldout", f"held-out classes ({names})",
                            f"the test split's examples of the classes the run never trained on ({names})",
                            held.images.cpu(), fit_sources("heldout")))  # fmt: skip
    if ood_dataset is not None:
        side = shape[1] if shape[1] == shape[2] else None  # image folders of mixed sizes need one
        try:
            other = load_dataset(ood_dataset, ood_data, "test",
                                 image_size=side if ood_dataset == "imagefolder" else None, seed=seed)  # fmt: skip
        except DataError as e:  # the reader names the run's flag; the out-of-distribution data has its own
            raise DataError(str(e).replace("--data-root", "--ood-data")) from None
        c, h, w = other.images.shape[1:]
        images = convert_images(other.images, shape[0], (shape[1], shape[2]))
        where = f" from {other.source}" if other.source else ""
        sets.append(_OODSet(f"dataset:{ood_dataset}", f"{ood_dataset} (test split)",
                            f"{len(images)} test images of {ood_dataset}{where}, {c}x{h}x{w} converted to "
                            f"{'x'.join(map(str, shape))}", images, fit_sources(ood_dataset)))  # fmt: skip
    if synthetic:
        for kind, description in SYNTHETIC.items():
            images = synthetic_ood(kind, test.images, seed=2 * seed)
            sets.append(_OODSet(kind, kind, f"{description} (from the test split)", images, fit_sources(kind)))
    return sets


def _compare(s: _OODSet, in_scores: dict, scores: dict, in_prof: dict, prof: dict, detector: Any) -> dict[str, Any]:
    """AUROC and FPR95 of every score, against the MSP baseline, and the per-exit curves."""
    table = {}
    base_auroc = auroc(in_scores[BASELINE], scores[BASELINE])
    base_fpr = fpr_at_tpr(in_scores[BASELINE], scores[BASELINE])
    for name in SCORES:
        if name not in scores:
            continue
        a, f = auroc(in_scores[name], scores[name]), fpr_at_tpr(in_scores[name], scores[name])
        table[name] = {"auroc": a, "fpr95": f, "auroc_minus_msp": a - base_auroc, "fpr95_minus_msp": f - base_fpr}
    steps = range(in_prof["msp"].shape[0])
    return {
        "title": s.title,
        "description": s.description,
        "examples": len(s.images),
        "detector_fit_on": (["validation split (in)"] + [f"{k} of the validation split" for k in s.fit_on])
        if detector is not None
        else None,
        "scores": table,
        "per_exit": {
            "msp_auroc": [auroc(in_prof["msp"][t], prof["msp"][t]) for t in steps],
            "entropy_auroc": [auroc(-in_prof["entropy"][t], -prof["entropy"][t]) for t in steps],
            "mean_msp": prof["msp"].mean(1).tolist(),
            "mean_entropy": prof["entropy"].mean(1).tolist(),
        },
        "settle_mean": float(settle_steps(prof["pred"]).mean()),
        "flips_mean": float((prof["pred"][1:] != prof["pred"][:-1]).sum(0).mean()),
    }


def format_report(result: dict[str, Any]) -> str:
    """The markdown report of :func:`ood_run`'s result."""
    first, exits = result["first_exit"], result["exits"]
    ind = result["in_distribution"]
    classes = ind["holdout_classes"]
    held = f", {'class' if len(classes) == 1 else 'classes'} {', '.join(map(str, classes))} held out" if classes else ""
    lines = [
        f"# Out-of-distribution detection: {result['run']}",
        "",
        f"In-distribution: the {ind['split']} split of {ind['dataset']} ({ind['examples']} examples, "
        f"{len(ind['classes'])} classes{held}). Exits {first}..{exits - 1} (those that see the input).",
        "",
        "In-distribution is the positive class and every score is higher for it. AUROC: P(in > out) + "
        "P(in = out)/2 (Mann-Whitney). FPR95: the share of OOD inputs accepted by the highest threshold that "
        'accepts at least 95% of in-distribution inputs (ODIN). "vs MSP": the difference from the last exit\'s '
        "max softmax (the baseline); higher AUROC and lower FPR95 are better.",
        "",
        "Scores: " + "; ".join(f"`{k}`: {v}" for k, v in result["scores"].items()) + ".",
        "",
        f"Learned detector: {result['detector'] or 'none (the run held out no validation split to fit it on)'}.",
    ]
    for data in result["ood_sets"].values():
        lines += ["", f"## {data['title']}", "", f"{data['examples']} images: {data['description']}."]
        if data["detector_fit_on"]:
            lines.append(f"Detector fitted on: {', '.join(data['detector_fit_on'])}.")
        lines += ["", "| score | AUROC | vs MSP | FPR95 | vs MSP |", "|---|---|---|---|---|"]
        for name, row in data["scores"].items():
            if name == BASELINE:
                lines.append(f"| {name} (baseline) | {row['auroc']:.4f} | | {row['fpr95']:.4f} | |")
            else:
                lines.append(f"| {name} | {row['auroc']:.4f} | {row['auroc_minus_msp']:+.4f} | {row['fpr95']:.4f} "
                             f"| {row['fpr95_minus_msp']:+.4f} |")  # fmt: skip
        rows = data["scores"]
        if "learned" in rows and "learned_last" in rows:
            gain = rows["learned"]["auroc"] - rows["learned_last"]["auroc"]
            lines += ["", "The trace beyond the last exit (learned minus learned_last, the same detector fitted on the "
                      f"same sets): AUROC {gain:+.4f}, FPR95 "
                      f"{rows['learned']['fpr95'] - rows['learned_last']['fpr95']:+.4f}."]  # fmt: skip
        per = data["per_exit"]
        lines += [
            "",
            "| exit | " + " | ".join(str(first + t) for t in range(len(per["msp_auroc"]))) + " |",
            "|---|" + "---|" * len(per["msp_auroc"]),
            "| MSP AUROC | " + " | ".join(f"{v:.3f}" for v in per["msp_auroc"]) + " |",
            "| entropy AUROC | " + " | ".join(f"{v:.3f}" for v in per["entropy_auroc"]) + " |",
            "| mean entropy, in | " + " | ".join(f"{v:.3f}" for v in result["in_profile"]["mean_entropy"]) + " |",
            "| mean entropy, OOD | " + " | ".join(f"{v:.3f}" for v in per["mean_entropy"]) + " |",
            "",
            f"Mean settling exit (relative to exit {first}) {data['settle_mean']:.2f}, mean flips "
            f"{data['flips_mean']:.2f}.",
        ]
    return "\n".join(lines) + "\n"


def _figure(result: dict[str, Any], curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]) -> Any:
    """ROC curves of every score, one panel per OOD set, and a panel of the mean entropy per exit."""
    from matplotlib.figure import Figure  # imported here: importing cascadenet stays fast; no pyplot needed

    n = len(curves) + 1
    cols = min(n, 3)
    rows = -(-n // cols)
    width, height = 4.5 * cols, 4.2 * rows
    fig = Figure(figsize=(width, height))
    # fixed margins (inches): a layout engine would draw the whole figure twice, most of a small report's time
    fig.subplots_adjust(left=0.6 / width, right=1 - 0.15 / width, bottom=0.5 / height, top=1 - 0.75 / height,
                        wspace=0.3, hspace=0.45)  # fmt: skip
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (key, by_score) in zip(axes, curves.items()):
        for name, (fpr, tpr) in by_score.items():
            a = result["ood_sets"][key]["scores"][name]["auroc"]
            ax.plot(fpr, tpr, lw=2.0 if name == BASELINE else 1.2, label=f"{name} ({a:.3f})",
                    ls="-" if name in (BASELINE, "learned") else "--")  # fmt: skip
        ax.plot([0, 1], [0, 1], color="grey", lw=0.6)
        ax.set(title=result["ood_sets"][key]["title"], xlabel="FPR (OOD accepted)", ylabel="TPR (in accepted)")
        ax.legend(fontsize=7, loc="lower right")
    ax = axes[len(curves)]
    first = result["first_exit"]
    exits = np.arange(first, result["exits"])
    ax.plot(exits, result["in_profile"]["mean_entropy"], color="black", lw=2, label="in-distribution")
    for data in result["ood_sets"].values():
        ax.plot(exits, data["per_exit"]["mean_entropy"], label=data["title"])
    ax.set(title="entropy profile", xlabel="exit", ylabel="mean softmax entropy (nats)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7)
    for extra in axes[n:]:
        extra.set_visible(False)
    fig.suptitle(f"OOD detection from the trace: {result['run']}")
    return fig


def _write_report(out_dir: Path, result: dict[str, Any], curves: dict, overwrite: bool) -> None:
    buffer = io.BytesIO()
    _figure(result, curves).savefig(buffer, format="png", dpi=120)
    files = {out_dir / "ood.json": (json.dumps(result, indent=2) + "\n").encode(),
             out_dir / "ood.md": format_report(result).encode(), out_dir / "ood.png": buffer.getvalue()}  # fmt: skip
    with new_folder(out_dir):  # a failed write leaves neither a new empty folder nor half a report
        atomic_write_all(files, overwrite=overwrite)
