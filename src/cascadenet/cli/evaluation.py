"""The verbs that measure or use a trained run: ``eval``, ``predict`` (early exit), ``recalibrate`` (batch-norm
statistics), ``calibrate`` (per-exit temperatures) and ``plot``."""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import tyro

from ..models.checkpoint import CheckpointError
from .options import BatchSize, Calibrated, DataRoot, Device, Progress, RunDir, RunDirs, Threads, progress_of

__all__ = ["CalibrateCommand", "EvalCommand", "PlotCommand", "PredictCommand", "RecalibrateCommand"]


@dataclass
class EvalCommand:
    """Evaluate a run: per-step accuracy, threshold and budgeted-batch curves, AUCs, MACs; writes eval.json. The
    run's eval*.json files are results of the run, recomputed here: an earlier one of the same split, scheme and
    weights is replaced."""

    run_dir: RunDir
    """Run directory written by `cascadenet train`."""
    split: Literal["test", "val", "train"] = "test"
    """Split to evaluate: test (eval.json), or the run's held-out val or its train part (eval-val.json,
    eval-train.json)."""
    scheme: Literal["parallel", "serial"] | None = None
    """Evaluate the same weights in another scheme (written to eval-<scheme>.json)."""
    num_steps: int | None = None
    """Run this many steps instead of the model's own (e.g. longer integration)."""
    save_logits: str | None = None
    """Also store the trajectory logits (T, N, C) and labels in this .npz file."""
    overwrite: bool = False
    """Allow --save-logits to replace an existing file."""
    reference_macs: float | None = None
    """Full serial cost (MACs) that the 25/50/75/100% accuracy budgets are fractions of (default: this model's)."""
    weights: str | None = None
    """Evaluate this weights file of the run instead of model.safetensors (e.g. model-recalibrated.safetensors;
    written to eval-recalibrated.json)."""
    calibrated: bool = False
    """Evaluate the temperature-scaled exits (`cascadenet calibrate`'s temperatures; written to
    eval-calibrated.json)."""
    poe: bool = False
    """Evaluate the product-of-experts outputs (monotone anytime predictions; written to eval-poe.json)."""
    other_data: bool = False
    """Accept a --data-root holding other data than the run was trained on (another image size, other classes or
    images); refused otherwise. eval.json's "data" records what was evaluated either way."""
    data_root: DataRoot = None
    batch_size: BatchSize = 500
    device: Device = "auto"
    threads: Threads = None
    progress: Progress = None

    def run(self) -> None:
        from ..evaluation.evaluate import evaluate, format_table

        result = evaluate(self.run_dir, split=self.split, scheme=self.scheme, num_steps=self.num_steps,
                          data_root=self.data_root, batch_size=self.batch_size, device=self.device,
                          save_logits=self.save_logits, overwrite=self.overwrite, progress=progress_of(self.progress),
                          reference_macs=self.reference_macs, weights=self.weights, calibrated=self.calibrated,
                          poe=self.poe, other_data=self.other_data)  # fmt: skip
        print(format_table(result))


@dataclass
class PredictCommand:
    """Predict with early exit: each example stops at the step its policy chooses and leaves the batch. Given
    image files, folders or glob patterns (PATH...), writes per image the class name, its probability, the exit
    and the MACs (CSV or JSON with -o, else a table); without them, predicts a split of the run's dataset and
    prints accuracy, mean step, mean MACs and wall time."""

    run_dir: RunDir
    """Run directory written by `cascadenet train` (or, with PATH..., a model.safetensors file)."""
    paths: Annotated[tuple[str, ...], tyro.conf.Positional, tyro.conf.arg(metavar="PATH")] = ()
    """Image files, folders (searched recursively) and glob patterns to predict (no labels needed)."""
    split: Literal["test", "val", "train"] = "test"
    """Split to predict when no PATH is given: test, the run's held-out val, or its train part."""
    threshold: float | None = None
    """Stop at the first step whose max softmax probability is >= this."""
    margin: float | None = None
    """Stop at the first step whose two largest softmax probabilities differ by >= this."""
    stable: int | None = None
    """Stop at the first step whose predicted class is the one of each of the K steps before it."""
    budget: float | None = None
    """At most this many MACs per example: stop at the last step within it."""
    deadline_ms: float | None = None
    """Answer each batch within this many milliseconds: a step starts only if it is expected to finish in time
    (from the step times measured so far); examples still running stop at the step they have."""
    output: Annotated[str | None, tyro.conf.arg(aliases=("-o",))] = None
    """Write each example's result: a .csv or .json file for PATH... (class, probability, exit, MACs), a .npz
    file for a split (prediction, step, MACs, label, probabilities, class names)."""
    overwrite: bool = False
    """Allow --output to replace an existing file."""
    calibrated: Calibrated = None
    poe: bool = False
    """The policy and the prediction read the product-of-experts outputs (monotone anytime predictions)."""
    other_data: bool = False
    """Accept a --data-root holding other data than the run was trained on (refused otherwise)."""
    data_root: DataRoot = None
    batch_size: BatchSize = 500
    device: Device = "auto"
    threads: Threads = None
    progress: Progress = None

    def run(self) -> None:
        from ..evaluation.early_exit import format_summary, policy_from_flags, predict_run

        policy = policy_from_flags(self.threshold, self.margin, self.stable)
        if self.deadline_ms is not None and not self.deadline_ms > 0:
            raise ValueError(f"--deadline-ms must be positive, got {self.deadline_ms}")
        deadline = None if self.deadline_ms is None else self.deadline_ms / 1000
        if self.paths:
            from ..deployment.files import format_records, predict_files

            summary = predict_files(self.run_dir, self.paths, policy=policy, budget=self.budget, deadline=deadline,
                                    batch_size=self.batch_size, device=self.device, output=self.output,
                                    overwrite=self.overwrite, progress=progress_of(self.progress))  # fmt: skip
            print(format_records(summary))
            return
        summary = predict_run(self.run_dir, split=self.split, policy=policy, budget=self.budget, deadline=deadline,
                              data_root=self.data_root, batch_size=self.batch_size, device=self.device,
                              output=self.output, overwrite=self.overwrite, progress=progress_of(self.progress),
                              calibrated=self.calibrated, poe=self.poe, other_data=self.other_data)  # fmt: skip
        print(format_summary(summary))


@dataclass
class RecalibrateCommand:
    """Recompute a finished run's batch-norm statistics at its final weights over training batches (precise batch
    norm); writes new weights beside the old ones (model.safetensors itself is never replaced)."""

    run_dir: RunDir
    """Run directory written by `cascadenet train`."""
    batches: int | None = None
    """Training batches (of the run's batch size, augmented as in training; default: the run's
    --recalibrate-batches, or 4)."""
    output: Annotated[str, tyro.conf.arg(aliases=("-o",))] = "model-recalibrated.safetensors"
    """File name of the new weights, in the run directory."""
    overwrite: bool = False
    """Allow --output to replace an earlier recalibration's file (never model.safetensors)."""
    data_root: DataRoot = None
    device: Device = "auto"
    threads: Threads = None

    def run(self) -> None:
        from ..training.recalibrate import recalibrate_run

        path, record = recalibrate_run(self.run_dir, batches=self.batches, output=self.output,
                                       overwrite=self.overwrite, data_root=self.data_root,
                                       device=self.device)  # fmt: skip
        nxt = f"cascadenet eval {shlex.quote(str(self.run_dir))} --weights {shlex.quote(path.name)}"
        print(f"wrote {path}: statistics over {record['batches']} batches ({record['examples']} examples) "
              f"(next: {nxt})")  # fmt: skip


@dataclass
class CalibrateCommand:
    """Fit one temperature per exit on a run's validation split (minimum negative log-likelihood) and store them
    with the run (temperatures.json), with every exit's validation ECE before and after; predict and policy then
    use them (--no-calibrated: not), eval with --calibrated."""

    run_dir: RunDir
    """Run directory written by `cascadenet train` (with a validation split)."""
    overwrite: bool = False
    """Allow replacing the run's temperatures.json."""
    data_root: DataRoot = None
    batch_size: BatchSize = 500
    device: Device = "auto"
    threads: Threads = None
    progress: Progress = None

    def run(self) -> None:
        from ..evaluation.calibration import TEMPERATURES, calibrate_run

        record = calibrate_run(self.run_dir, overwrite=self.overwrite, data_root=self.data_root,
                               batch_size=self.batch_size, device=self.device,
                               progress=progress_of(self.progress))  # fmt: skip
        print(f"{'exit':>4} {'temperature':>11} {'val ECE':>8} {'calibrated':>10}")
        for t, (temp, a, b) in enumerate(zip(record["temperatures"], record["val_ece_per_exit"],
                                             record["val_ece_per_exit_calibrated"])):  # fmt: skip
            print(f"{t:>4} {temp:>11.3f} {a:>8.4f} {b:>10.4f}")
        print(f"wrote {Path(self.run_dir) / TEMPERATURES} (next: cascadenet eval {self.run_dir} --calibrated)")


@dataclass
class PlotCommand:
    """Overlay per-step accuracy and the threshold speed-accuracy curves of several evaluated runs."""

    runs: RunDirs
    """Run directories (each evaluated with `cascadenet eval`)."""
    output: Annotated[str, tyro.conf.arg(aliases=("-o",))] = "speed_accuracy.png"
    """Figure file (.png, .pdf or .svg)."""
    overwrite: bool = False
    """Allow --output to replace an existing file."""
    eval_file: str = "eval.json"
    """Which evaluation of each run to plot (e.g. eval-serial.json)."""
    title: str | None = None
    """Figure title."""
    reliability: bool = False
    """Plot the reliability diagram of every exit of each run instead (one row per run; raw, and temperature-scaled
    when the run was calibrated before `cascadenet eval`)."""

    def run(self) -> None:
        from ..evaluation.plotting import plot_reliability, plot_runs

        results = []
        for run in self.runs:
            path = Path(run) / self.eval_file
            if not path.is_file():
                raise CheckpointError(f"{path}: no evaluation here; run `cascadenet eval {run}` first")
            try:
                result = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{path}: not a readable evaluation: {e}") from None
            name = Path(run).name
            if isinstance(result, dict) and result.get("finished_training") is False:  # said, in the figure too
                print(f"warning: {path} evaluated {run} before it finished training (its last checkpoint)",
                      file=sys.stderr)  # fmt: skip
                name += " (unfinished)"
            results.append((name, result))
        if self.reliability:
            print(plot_reliability(results, self.output, title=self.title, overwrite=self.overwrite))
            return
        print(plot_runs(results, self.output, title=self.title, overwrite=self.overwrite))
