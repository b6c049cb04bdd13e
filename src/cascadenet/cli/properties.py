"""The verbs that study properties of trained runs, each writing a report folder: ``ood``, ``noise``, ``policy``
(stopping policies) and ``typicality``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..data.datasets import DatasetName
from .options import BatchSize, DataRoot, Device, Progress, RunDir, RunDirs, Threads, progress_of

__all__ = ["NoiseCommand", "OodCommand", "PolicyCommand", "TypicalityCommand"]


@dataclass
class NoiseCommand:
    """Robustness of a cascade to persistent and transient noise: Gaussian pixel noise fed through the streaming
    step (fresh every step, frozen, for the first K steps, or in a burst), the cascade against the same weights
    with the EWS kernel and the feed-forward ResNet (each frame, running average); writes noise.md, noise.json and
    two plots."""

    run_dir: RunDir
    """Run directory of a cascade, written by `cascadenet train`."""
    sigmas: tuple[float, ...] = (0.1, 0.2, 0.4)
    """Noise standard deviations on the [0, 1] pixel scale (added before normalisation, clipped to [0, 1])."""
    protocols: tuple[Literal["persistent", "frozen", "transient", "burst"], ...] = (
        "persistent", "frozen", "transient", "burst")  # fmt: skip
    """persistent: fresh noise every step; frozen: one draw held; transient: noise in the first K steps; burst:
    noise in steps T0..T1 of a clean sequence."""
    steps_noisy: int | None = None
    """K, the transient's noisy steps (default: half the settling time)."""
    burst: tuple[int, int] | None = None
    """T0 T1, the burst's first and last noisy steps (default: from the model's own number of steps, K steps)."""
    alphas: tuple[float, ...] = (0.9,)
    """EWS smoothing factors of the same weights run with the EWS kernel at test time (none: --alphas alone)."""
    ews_recalibrate_batches: int = 4
    """Training batches over which each EWS variant's batch-norm statistics are recomputed on its own clean
    trajectory (0: keep the trained ones, which describe the one-step-delay trajectory's states)."""
    num_steps: int | None = None
    """Steps of every trajectory (default: the model's own, lengthened until the transient and the burst clear;
    EWS near alpha 0.9 integrates over tens of steps)."""
    split: Literal["test", "val", "train"] = "test"
    """Split to evaluate."""
    max_examples: int | None = None
    """Evaluate a random subset of this many examples (seeded by --seed)."""
    seed: int = 0
    """Seed of the noise and of the subset."""
    out: str | None = None
    """Output folder (default: RUN_DIR/noise)."""
    overwrite: bool = False
    """Allow replacing the report files in --out."""
    data_root: DataRoot = None
    batch_size: BatchSize = 500
    device: Device = "auto"
    threads: Threads = None
    progress: Progress = None

    def run(self) -> None:
        from ..properties.noise import noise_run

        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        options.update(progress=progress_of(self.progress))
        del options["threads"]  # set for the whole command (cli.options.set_threads)
        result, paths = noise_run(options.pop("run_dir"), **options)
        print(f"final accuracy (%) at step {result['num_steps'] - 1}, {result['num_examples']} examples:")
        for p, entries in result["results"].items():
            for e in entries:
                finals = ", ".join(f"{m} {100 * v['final_accuracy']:.1f}" for m, v in e["methods"].items())
                print(f"  {p}, sigma {e['sigma']:g}: {finals}")
        print(f"wrote {', '.join(str(p) for p in paths)}")


@dataclass
class OodCommand:
    """Out-of-distribution detection from the output trace: AUROC and FPR at 95% TPR of trace scores (max softmax
    per step, settling step, prediction flips, entropy, a learned detector) against the max-softmax baseline, the
    run's test split vs held-out classes, another dataset or synthetic images; writes ood.md, ood.json, ood.png."""

    run_dir: RunDir
    """Run directory written by `cascadenet train`."""
    ood_dataset: DatasetName | None = None
    """Another dataset whose test split is out-of-distribution (converted to the model's channels and size)."""
    ood_data: str | None = None
    """The folder of --ood-dataset (default: its usual place, where it has one)."""
    holdout: bool = False
    """Test on the classes the run held out (--holdout-classes in training)."""
    synthetic_ood: bool = False
    """Test on synthetic images: uniform noise, inverted and upside-down test images. With none of --holdout,
    --ood-dataset and --synthetic-ood: the held-out classes (if any) and the synthetic images."""
    out: str | None = None
    """Folder of the report (default: RUN_DIR/ood)."""
    overwrite: bool = False
    """Allow replacing the report's files."""
    seed: int = 0
    """Seed of the noise images."""
    data_root: DataRoot = None
    batch_size: BatchSize = 500
    device: Device = "auto"
    threads: Threads = None
    progress: Progress = None

    def run(self) -> None:
        from ..properties.ood import ood_run

        out = Path(self.out) if self.out is not None else Path(self.run_dir) / "ood"
        result = ood_run(self.run_dir, ood_dataset=self.ood_dataset, ood_data=self.ood_data, holdout=self.holdout,
                         synthetic=self.synthetic_ood, out=out, overwrite=self.overwrite, data_root=self.data_root,
                         batch_size=self.batch_size, device=self.device, seed=self.seed,
                         progress=progress_of(self.progress))  # fmt: skip
        for data in result["ood_sets"].values():
            scores = data["scores"]
            best = max((n for n in scores if n != "msp"), key=lambda n: scores[n]["auroc"])
            print(f"{data['title']}: AUROC msp {scores['msp']['auroc']:.4f}, best {best} {scores[best]['auroc']:.4f}")
        print(f"report: {out / 'ood.md'}")


@dataclass
class PolicyCommand:
    """Compare stopping policies (confidence, margin, stable argmax, a learned GRU) on runs' output traces:
    parameters fitted on each run's validation split, speed-accuracy curves on its test split (the GRU is fitted on
    the CPU whatever --device)."""

    runs: RunDirs
    """Run directories written by `cascadenet train` (each with a validation split)."""
    out: str | None = None
    """Folder of stopping.md, stopping.json and stopping.png (default: RUN_DIR/stopping; needed for several runs)."""
    overwrite: bool = False
    """Allow replacing an existing report in --out."""
    seed: int = 0
    """Seed of the learned policy (its fit/held-out split of the validation examples and its initialisation)."""
    data_root: DataRoot = None
    batch_size: BatchSize = 500
    device: Device = "auto"
    threads: Threads = None
    progress: Progress = None

    def run(self) -> None:
        from ..properties.stopping import policy_report

        report = policy_report(self.runs, out=self.out, overwrite=self.overwrite, device=self.device,
                               batch_size=self.batch_size, seed=self.seed, data_root=self.data_root,
                               progress=progress_of(self.progress))  # fmt: skip
        print(f"report: {report}")


@dataclass
class TypicalityCommand:
    """Are typical examples classified sooner? Bins a split's examples by typicality (a score file, or the built-in
    hold-out consistency estimator) and reports, per bin and per run, accuracy at each step, the step from which
    each example stays correct, and the confidence policy's stopping step; writes typicality.md/.json/.png."""

    runs: RunDirs
    """Run directories on the same examples (same dataset, seed, val fraction), e.g. CascadedTD, CascadedCE, SDN."""
    scores: str | None = None
    """Typicality file: .npy, or .npz with 'scores' (and optionally 'labels', checked), one score per example of the
    dataset's training set (test set for --split test) in its original order, e.g. cifar10-cscores-orig-order.npz.
    Default: the built-in hold-out consistency estimator."""
    split: Literal["val", "test", "train"] = "val"
    """Examples analysed: the run's held-out validation split (default), the test split, or its training part."""
    bins: int = 5
    """Typicality quantile bins."""
    thresholds: tuple[float, ...] = (0.9,)
    """Thresholds of the confidence policy (stop at the first step whose max softmax is >= q)."""
    folds: int = 4
    """Estimator: folds per repeat (each small model trains on the other folds of the training set)."""
    repeats: int = 8
    """Estimator: random fold partitions (each training example is scored once per repeat; the score takes
    repeats + 1 values)."""
    estimator_epochs: int = 3
    """Estimator: training epochs of each small model."""
    estimator_model: Literal["mlp", "cnn"] = "mlp"
    """Estimator: the small model (an MLP on raw pixels, or a two-layer CNN)."""
    estimator_seed: int = 0
    """Estimator: seed of the folds, initialisations and batch orders."""
    out: str | None = None
    """Output folder (default: typicality/ in the first run directory; typicality-<split>/ for another split). The
    estimator's scores are cached there and reused while the data and estimator options are unchanged."""
    overwrite: bool = False
    """Allow replacing the report files of an earlier call."""
    data_root: DataRoot = None
    batch_size: BatchSize = 500
    device: Device = "auto"
    threads: Threads = None
    progress: Progress = None

    def run(self) -> None:
        from ..properties.typicality import EstimatorOptions, format_summary, typicality

        estimator = EstimatorOptions(folds=self.folds, repeats=self.repeats, epochs=self.estimator_epochs,
                                     model=self.estimator_model, seed=self.estimator_seed)  # fmt: skip
        result = typicality(self.runs, scores=self.scores, split=self.split, bins=self.bins,
                            thresholds=self.thresholds, estimator=estimator, out=self.out, overwrite=self.overwrite,
                            data_root=self.data_root, batch_size=self.batch_size, device=self.device,
                            progress=progress_of(self.progress))  # fmt: skip
        print(format_summary(result))
