"""Anytime evaluation of a trained run: per-step accuracy, the threshold policy's speed-accuracy curve,
areas under accuracy on three axes, accuracy at cost budgets, the budgeted-batch curve, and the cost of every
step in multiply-accumulates and parallel latency.

Definitions (also in the README); "step" means exit (a cascade's exit t is its step t):
- accuracy at step t: fraction of the split's examples whose argmax at step t is the label; mean confidence at
  step t: the mean over examples of the max softmax probability;
- three areas under accuracy, each in [0, 1]:
  - anytime AUC (the first release's, kept for continuity): trapezoid of accuracy against normalised time
    t / (T - 1); every step counts as equally expensive, so it only compares models with the same exits;
  - MACs AUC: area under anytime accuracy against cumulative serial MACs divided by the last exit's MACs;
  - latency AUC: the same against parallel latency divided by the last exit's latency;
  the last two use the anytime semantics "at budget b you hold the answer of the last exit completed within b
  (cost <= b); before the first exit, chance (1 / num_classes)", a step function, so a model whose first exit
  costs 15% of the network is at chance over the first 15% of the axis, and a cascade's step 0 (0 MACs) counts
  from budget 0;
- accuracy at budget: the same step function at 25/50/75/100% of a reference full serial cost (by default the
  model's own last exit; ``reference_macs`` sets another model's, to compare at equal absolute cost);
- threshold policy: for a threshold q, each example stops at the first step whose max softmax >= q (else at
  the last step), never before the first step that can see the input (step 1 with the stem delayed); the
  curve is accuracy against mean stopping step over a grid of q in [0, 1], and its area is taken against mean
  stopping step / (T - 1), starting from (0, accuracy at step 0) and extended flat to 1;
- budgeted batch (MSDNet's protocol): for q = p / 20, p = 1..39, target exit fractions proportional to q^k;
  per-exit confidence thresholds fitted on the run's own validation split (the one training held out, never
  the split reported), applied to the evaluated split: accuracy against mean MACs (and mean latency) per
  example; null when the run held out no validation split, and for ``--split val`` itself;
- steps to 50% / 95% of final: the first step whose accuracy reaches that fraction of the final step's
  accuracy; steps to 50% / 95% accuracy: the first step reaching that absolute accuracy (with its MACs and
  latency), null if none does;
- MACs: serial hardware, cumulative multiply-accumulates per example to produce steps 0..t (each distinct
  state computed once); parallel hardware, two latency models computed from the model's structure
  (``cascadenet.models.latency``): ``parallel_latency_blocks``, the paper's block units (the stem and each block one
  unit; a stem-delayed cascade's step t at t), and ``latency_layers``, the critical path in layers (every conv
  one unit, skip projections counted, parallel paths the max, the exit's linear read-out not counted; ResNet-10's
  cascade steps 1..5 at 4, 6, 7, 8, 9), null for a family whose structure is unknown;
- absolute MACs AUC (``absolute_macs_auc``): the area against absolute MACs over [0, reference] (the
  ``reference_macs`` given, else the model's own full cost), chance before the first exit and the last answer
  held after the last; with one reference for every model compared, the areas share one axis. The MACs and
  latency AUCs above are each normalised by the model's own full cost: they describe one model, and are not
  comparable across models whose costs differ;
- ``ic_after``: an SDN's internal classifiers as placed (its rule resolved at the input size), else null;
- ``fallback``: what an example that no threshold stops answers in the threshold policy and the budgeted batch:
  ``last`` (the last exit's answer; SDN's reference code answers with the most confident exit, which
  ``metrics`` offers as ``fallback="most-confident"``).

Only the anytime-model interface (``cascadenet.models.anytime``) is used, so any model family evaluates the same way and
writes the same eval.json ("step" there means exit). What a family lacks is null: ``feedforward_accuracy`` and
``macs_feedforward`` without a ``feedforward`` method, ``scheme`` for a model that has no execution schemes.
"""

from __future__ import annotations

import inspect
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.loader import iterate_batches
from ..models.checkpoint import WEIGHTS, CheckpointError
from ..models.latency import critical_path
from ..runs.load import check_run_dir, load_run
from ..utils.files import atomic_write, check_npz_output, check_writable
from . import metrics
from .calibration import BINS, ece_per_exit, read_temperatures, reliability
from .logits import check_logits_memory, dataset_logits
from .outputs import Outputs, outputs_for

__all__ = ["evaluate", "eval_filename", "format_table", "SPLITS"]


SPLITS = ("test", "val", "train")


def eval_filename(
    scheme: str | None,
    model_scheme: str | None,
    num_steps: int | None,
    split: str = "test",
    weights: str | None = None,
    outputs: str | None = None,
) -> str:
    """``eval.json`` for the test split with the model's own weights, scheme and length; otherwise one part per
    difference, joined by ``-``: ``eval-serial.json``, ``eval-T20.json``, ``eval-train.json``,
    ``eval-serial-train.json`` (the split last). Weights other than ``model.safetensors`` add their name first:
    ``model-recalibrated.safetensors`` -> ``eval-recalibrated.json``, ``other.safetensors`` -> ``eval-other.json``.
    Transformed outputs (``Outputs.name``) come next: ``eval-calibrated.json``, ``eval-poe.json``."""
    parts = []
    if weights and weights != WEIGHTS:
        stem = Path(weights).name.removesuffix(".safetensors")
        parts.append(stem.removeprefix("model-") or stem)
    if outputs:
        parts.append(outputs)
    if scheme and scheme != model_scheme:
        parts.append(scheme)
    if num_steps:
        parts.append(f"T{num_steps}")
    if split != "test":
        parts.append(split)
    return "eval.json" if not parts else f"eval-{'-'.join(parts)}.json"


def evaluate(
    run_dir: str | os.PathLike,
    *,
    split: str = "test",
    scheme: str | None = None,
    num_steps: int | None = None,
    data_root: str | None = None,
    batch_size: int = 500,
    device: str = "auto",
    save_logits: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = False,
    reference_macs: float | None = None,
    weights: str | None = None,
    other_data: bool = False,
    data: Any = None,
    calibrated: bool = False,
    poe: bool = False,
) -> dict[str, Any]:
    """Evaluate a run on one split; writes ``eval.json`` (the test split; other splits, schemes and lengths get
    their own name, see ``eval_filename``) in the run directory and returns its content.

    Args:
        run_dir: a run directory written by ``cascadenet train``.
        split: ``test`` (default), ``val`` (the part of the training set the run held out, split as training
            split it) or ``train`` (the part it trained on).
        scheme: evaluate the same weights in another scheme (``parallel``/``serial``).
        num_steps: run this many steps instead of the model's own.
        data_root: override the dataset location stored in the run.
        save_logits: also store the trajectory logits ``(T, N, C)`` and labels in this ``.npz`` file.
        overwrite: allow ``save_logits`` to replace an existing file.
        reference_macs: the full serial cost that ``accuracy_at_budget``'s 25/50/75/100% budgets are fractions
            of (e.g. another model's last-exit MACs); default: this model's own.
        weights: a weights file in the run directory to evaluate instead of ``model.safetensors`` (e.g.
            ``cascadenet recalibrate``'s ``model-recalibrated.safetensors``); the file name says so
            (``eval-recalibrated.json``).
        other_data: accept a ``data_root`` holding other data than the run's (another image size, other
            classes or images); eval.json's ``data`` records what was evaluated either way.

    A run that has not finished training is evaluated at its last checkpoint: ``finished_training`` is false
    and the table says so. A run that a live process trains is refused.
        data: the split's examples given from Python (a run trained by ``cascadenet.fit`` on data that is not on
            disk): an ``ImageSet`` or a map-style dataset of ``(image, label)``; no budgeted-batch curve then.
        calibrated: evaluate the exits' temperature-scaled outputs (``cascadenet calibrate``'s temperatures);
            ``eval-calibrated.json``.
        poe: evaluate the product-of-experts outputs (``cascadenet.evaluation.outputs``); ``eval-poe.json``.

    Whatever the outputs evaluated, ``ece_per_exit`` is the expected calibration error of every exit's raw
    outputs (15 equal-mass bins), ``ece_per_exit_calibrated`` that after the run's temperature scaling (null before
    ``cascadenet calibrate``), ``ece_per_exit_evaluated`` that of the outputs the curves use; ``reliability`` holds
    the reliability diagrams of the raw and the scaled exits.
    """
    run_dir = Path(run_dir)
    if split not in SPLITS:
        raise ValueError(f"unknown --split {split!r}; valid choices: {', '.join(SPLITS)}")
    if reference_macs is not None and (isinstance(reference_macs, bool) or not isinstance(reference_macs, (int, float))
                                       or not reference_macs > 0 or reference_macs == float("inf")):  # fmt: skip
        raise ValueError(f"--reference-macs must be a number > 0, got {reference_macs!r}")
    try:
        return _evaluate(run_dir, split, scheme, num_steps, data_root, batch_size, device, save_logits, overwrite,
                         progress, reference_macs, weights, other_data, data, calibrated, poe)  # fmt: skip
    except OSError as e:  # an unreadable run directory or data, a full disk: one line naming the file
        if isinstance(e, FileExistsError) and not e.strerror:
            raise
        raise CheckpointError(f"{e.filename or run_dir}: {e.strerror or e}") from None


def _evaluate(
    run_dir: Path,
    split: str,
    scheme: str | None,
    num_steps: int | None,
    data_root: str | None,
    batch_size: int,
    device: str,
    save_logits: str | os.PathLike | None,
    overwrite: bool,
    progress: bool,
    reference_macs: float | None,
    weights: str | None,
    other_data: bool,
    data: Any = None,
    calibrated: bool = False,
    poe: bool = False,
) -> dict[str, Any]:
    save_logits = _check_options(run_dir, batch_size, num_steps, save_logits, overwrite, weights)
    loaded = load_run(run_dir, split=split, data_root=data_root, device=device, with_val=True, weights=weights,
                      unfinished=True, other_data=other_data, data=data)  # fmt: skip
    model, ds, mean, std, amp = loaded.model, loaded.data, loaded.mean, loaded.std, loaded.amp
    run_options = _run_options(model, scheme, num_steps)
    input_size = tuple(ds.images.shape[1:])
    check_logits_memory(model, len(ds), **run_options)  # before the costs, which walk every step too
    costs = model.exit_costs(input_size, **run_options)
    logits = dataset_logits(model, ds, mean, std, batch_size=batch_size, amp=amp, progress=progress,
                            desc="evaluate", **run_options)  # fmt: skip
    labels = ds.labels.cpu()
    outputs = outputs_for(run_dir, model, logits.shape[0], calibrated=calibrated, poe=poe)
    calibration = _calibration(run_dir, logits, labels, outputs)
    raw_logits, logits = logits, outputs.transform(logits)
    budgeted = None
    # thresholds fitted on the held-out split, applied to another one: on the validation split itself the curve
    # would be measured on the examples it was fitted on (optimistic), so there it is null
    if loaded.val is not None and split != "val":
        budgeted = _budgeted_batch(loaded, logits, labels, costs, batch_size, progress, run_options, outputs)
    ff_accuracy, ff_macs = _feedforward(model, ds, mean, std, labels, batch_size, input_size)
    summary = metrics.summarize(logits, labels, first_step=model.first_informative_exit)
    model_scheme = getattr(model, "scheme", None)
    cost_metrics = metrics.cost_summary(summary["accuracy_per_step"], costs.macs, costs.latency,
                                        model.config.num_classes, reference_macs=reference_macs)  # fmt: skip
    layers = critical_path(model, input_size, "layers", **run_options)
    full = reference_macs if reference_macs is not None else costs.macs[-1]
    absolute = metrics.absolute_cost_auc(summary["accuracy_per_step"], costs.macs, model.config.num_classes,
                                         full) if full > 0 else None  # fmt: skip
    ic_after = getattr(model, "ic_after", None)
    result = {
        "run": run_dir.name,
        "split": split,
        "scheme": scheme or model_scheme,
        "finished_training": loaded.finished,
        **({} if loaded.finished or weights is not None else {"checkpoint_epoch": _checkpoint_epoch(run_dir)}),
        "data": loaded.data_record,
        **({"weights": weights} if weights is not None else {}),
        "outputs": outputs.name or "raw",
        **summary,
        **calibration,
        "feedforward_accuracy": ff_accuracy,
        "macs_per_step": costs.macs,
        "parallel_latency_blocks": costs.latency,
        "latency_layers": layers,
        "macs_feedforward": ff_macs,
        "ic_after": list(ic_after) if ic_after is not None else None,
        "model": model.config.to_dict(),
        **cost_metrics,
        "absolute_macs_auc": absolute,
        # what an example that no threshold stops answers (threshold policy, budgeted batch): metrics.FALLBACKS
        "fallback": "last",
        "budgeted_batch": budgeted,
    }
    if save_logits is not None:  # atomically, and never over a file that appeared meanwhile unless --overwrite
        buffer = io.BytesIO()
        np.savez_compressed(buffer, logits=raw_logits.numpy(), labels=labels.numpy())  # the model's own logits
        atomic_write(save_logits, buffer.getvalue(), overwrite=overwrite)
    atomic_write(run_dir / eval_filename(scheme, model_scheme, num_steps, split, weights, outputs.name),
                 (json.dumps(result, indent=2) + "\n").encode())  # fmt: skip
    return result


def _checkpoint_epoch(run_dir: Path) -> int | None:
    """The epochs an unfinished run's checkpoint completed (from its metrics), for the table and eval.json."""
    try:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return int(rows[-1]["epoch"]) if rows else 0
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _run_options(model: Any, scheme: str | None, num_steps: int | None) -> dict[str, Any]:
    """The options of a model's run (cascades: scheme, num_steps), given only when set (other families lack
    them), refused for a family that lacks one."""
    run_options = {k: v for k, v in (("scheme", scheme), ("num_steps", num_steps)) if v is not None}
    # refuse an option the model's family lacks up front, rather than catching a TypeError that could come from
    # anywhere inside the model
    lacking = [k for k in run_options if k not in inspect.signature(model.exit_costs).parameters]
    if lacking:
        raise ValueError(f"this {model.config.family} model takes no {' or '.join(lacking)} option")
    return run_options


def _check_options(
    run_dir: Path, batch_size: int, num_steps: int | None, save_logits: str | os.PathLike | None, overwrite: bool,
    weights: str | None,
) -> Path | None:  # fmt: skip
    """Check the options against each other and the run directory before any work; returns the logits file
    (None: not asked for)."""
    check_run_dir(run_dir)
    check_writable(run_dir, "the evaluation (eval*.json)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
        raise ValueError(f"--num-steps must be a positive integer, got {num_steps!r}")
    if save_logits is not None:  # checked before the evaluation, not after it
        save_logits = check_npz_output(save_logits, "--save-logits", overwrite)
    if weights is not None:
        if not weights.endswith(".safetensors") or Path(weights).name != weights:
            raise ValueError(f"--weights {weights!r}: the name of a .safetensors file in the run directory")
        if not (run_dir / weights).is_file():
            raise CheckpointError(f"{run_dir / weights}: no such weights file in the run directory")
    return save_logits


def _budgeted_batch(
    loaded: Any, logits: torch.Tensor, labels: torch.Tensor, costs: Any, batch_size: int, progress: bool,
    run_options: dict[str, Any], outputs: Outputs,
) -> dict[str, Any]:  # fmt: skip
    """The budgeted-batch curve: per-exit thresholds fitted on the run's validation split, applied to the
    evaluated split's ``logits``; accuracy against mean MACs and mean latency. ``outputs`` transform the validation
    logits as the evaluated ones were."""
    model, dev = loaded.model, loaded.data.images.device
    val_logits = dataset_logits(model, loaded.val.to(dev), loaded.mean, loaded.std, batch_size=batch_size,
                                amp=loaded.amp, progress=progress, desc="validation (budgeted batch)",
                                **run_options)  # fmt: skip
    val_logits = outputs.transform(val_logits)
    curve = metrics.budgeted_curve(val_logits, logits, labels, costs.macs, first_exit=model.first_informative_exit)
    return {
        "fit_split": "val",
        "q": curve["q"],
        "accuracy": curve["accuracy"],
        "mean_macs": curve["mean_cost"],
        "mean_latency": [float(np.dot(f, costs.latency)) for f in curve["exit_fractions"]],
    }


def _calibration(run_dir: Path, logits: torch.Tensor, labels: torch.Tensor, outputs: Outputs) -> dict[str, Any]:
    """The expected calibration error of every exit: raw, after the run's temperatures (when it has them for this
    many exits), and of the evaluated ``outputs``."""
    try:
        temps = read_temperatures(run_dir, logits.shape[0])
    except CheckpointError:
        if outputs.temperatures is not None:
            raise
        temps = None  # e.g. --num-steps: the stored temperatures are for another number of exits
    raw = ece_per_exit(logits, labels)
    scaled = diagrams = None
    if temps is not None:
        scaled_logits = logits.double() / torch.tensor(temps, dtype=torch.float64)[:, None, None]
        scaled = ece_per_exit(scaled_logits, labels)
        diagrams = [reliability(z, labels) for z in scaled_logits]
    evaluated = raw if outputs.name is None else ece_per_exit(outputs.transform(logits), labels)
    return {"calibration_bins": BINS, "ece_per_exit": raw, "ece_per_exit_calibrated": scaled,
            "ece_per_exit_evaluated": evaluated, "temperatures": temps,
            "reliability": {"raw": [reliability(z, labels) for z in logits], "calibrated": diagrams}}  # fmt: skip


def _feedforward(
    model: Any, ds: Any, mean: torch.Tensor, std: torch.Tensor, labels: torch.Tensor, batch_size: int,
    input_size: tuple[int, ...],
) -> tuple[float | None, int | None]:  # fmt: skip
    """The accuracy of the model's ``feedforward`` prediction and its MACs (None where the family lacks them)."""
    feedforward = getattr(model, "feedforward", None)
    if feedforward is None:
        return None, None
    batches = iterate_batches(ds, batch_size, shuffle=False, augment=False, mean=mean, std=std)
    with torch.no_grad():
        ff = [feedforward(x).argmax(-1).cpu() for x, _ in batches]
    accuracy = float((torch.cat(ff) == labels).float().mean())
    count = getattr(model, "feedforward_macs", None)
    return accuracy, count(input_size) if count is not None else None


def format_table(result: dict[str, Any]) -> str:
    """A short text table of an evaluation: accuracy, confidence and cost per step, then the summary numbers.
    Keys added after the first release are shown when present, so an older eval.json still formats."""
    acc = result["accuracy_per_step"]
    macs = result["macs_per_step"]
    conf = result.get("mean_confidence_per_step") or [None] * len(acc)
    latency = result.get("parallel_latency_blocks") or [None] * len(acc)
    # a cascade's scheme, or the family of a model that has none (SDN, MSDNet)
    kind = result["scheme"] or (result.get("model") or {}).get("family", "anytime model")
    lines = [f"{result['run']} ({kind}, {result['split']} split, {result['num_examples']} examples)"]
    if result.get("finished_training") is False:
        epoch = result.get("checkpoint_epoch")
        done = "epoch unknown" if epoch is None else f"{epoch} epoch(s) done"
        lines.append(
            f"NOT FINISHED TRAINING: these are the weights of its last checkpoint ({done}), not the final ones"
        )
    data = result.get("data") or {}
    if data.get("other_data"):
        lines.append(f"OTHER DATA than the run's ({data.get('differs')}): {data.get('root')} (--other-data)")
    lines += [f"{'step':>4} {'accuracy':>9} {'confidence':>10} {'cum. MMACs':>11} {'latency':>8}"]  # fmt: skip
    for t, (a, c, m, lat) in enumerate(zip(acc, conf, macs, latency)):
        c_text = f"{c:>10.3f}" if c is not None else f"{'-':>10}"
        lat_text = f"{lat:>8g}" if lat is not None else f"{'-':>8}"
        lines.append(f"{t:>4} {100 * a:>8.2f}% {c_text} {m / 1e6:>11.2f} {lat_text}")
    s50, s95 = result["steps_to_50pct_final"], result["steps_to_95pct_final"]
    if result.get("feedforward_accuracy") is not None:
        lines.append(
            f"feed-forward accuracy {100 * result['feedforward_accuracy']:.2f}% "
            f"({result['macs_feedforward'] / 1e6:.2f} MMACs)"
        )
    lines += [
        f"anytime AUC {result['anytime_auc']:.4f}   threshold-policy AUC {result['threshold_auc']:.4f}",
        f"first step reaching 50% / 95% of final accuracy: {s50} / {s95}",
    ]
    if "macs_auc" in result:
        lines.append(f"AUC on normalised MACs {result['macs_auc']:.4f}   on normalised latency "
                     f"{result['latency_auc']:.4f}   (chance {100 * result['chance_accuracy']:.2f}%)")  # fmt: skip
        reach = [result[f"steps_to_{p}pct_accuracy"] for p in (50, 95)]
        lines.append("first step reaching 50% / 95% accuracy: " + " / ".join("never" if r is None else str(r)
                                                                          for r in reach))  # fmt: skip
        budget = result["accuracy_at_budget"]
        fractions = "/".join(f"{100 * f:g}" for f in budget["fractions"])
        points = " / ".join(f"{100 * a:.2f}%" for a in budget["accuracy"])
        lines.append(f"accuracy at {fractions}% of {budget['reference_macs'] / 1e6:.2f} MMACs: {points}")
    budgeted = result.get("budgeted_batch")
    if budgeted:
        cheap = min(range(len(budgeted["q"])), key=lambda i: budgeted["mean_macs"][i])
        dear = max(range(len(budgeted["q"])), key=lambda i: budgeted["mean_macs"][i])
        lines.append(
            f"budgeted batch ({len(budgeted['q'])} points, thresholds fitted on {budgeted['fit_split']}): from "
            f"{100 * budgeted['accuracy'][cheap]:.2f}% at {budgeted['mean_macs'][cheap] / 1e6:.2f} MMACs to "
            f"{100 * budgeted['accuracy'][dear]:.2f}% at {budgeted['mean_macs'][dear] / 1e6:.2f} MMACs"
        )
    return "\n".join(lines)
