"""The ``cascadenet`` command: a thin layer that parses options (tyro, from dataclasses) and calls the library.

    cascadenet train --dataset fashion-mnist --model resnet18 --width 16 --loss td --lam 0.5
    cascadenet train --resume runs/resnet18-td-fashion-mnist-s0
    cascadenet eval runs/resnet18-td-fashion-mnist-s0 [--scheme serial] [--save-logits logits.npz]
    cascadenet predict runs/resnet18-td-fashion-mnist-s0 --threshold 0.9 -o predictions.npz   # early exit
    cascadenet recalibrate runs/resnet18-td-fashion-mnist-s0 [--batches 4]    # batch-norm statistics at the weights
    cascadenet ood runs/resnet18-td-fashion-mnist-s0 [--holdout] [--ood-dataset cifar10 --ood-data DIR]
    cascadenet noise runs/resnet18-td-fashion-mnist-s0 --sigmas 0.1 0.2 0.4    # persistent and transient noise
    cascadenet plot runs/a runs/b -o speed_accuracy.png
    cascadenet policy runs/a runs/b --out stopping    # stopping policies fitted on val, compared on test
    cascadenet demo
    cascadenet reproduce --dataset fashion-mnist --seeds 3 --budget small
    cascadenet models
    cascadenet convert resnet18.pth -o resnet18-cascade.safetensors    # a torchvision ResNet, then --init it
    cascadenet typicality runs/td runs/ce [--scores cifar10-cscores-orig-order.npz]   # typical examples sooner?

User errors (bad options, missing or malformed data, unusable or busy run directories, unwritable folders, a
full disk) print one line and exit 2; a run interrupted by Ctrl-C exits 130 and one stopped by SIGTERM exits 143,
both after saving a checkpoint. The library reports progress through ``logging``; this module sends it to stderr.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
import typing
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from ..data.datasets import DataError, DatasetName
from ..models.anytime import ModelConfig
from ..models.checkpoint import CheckpointError
from ..models.registry import model_entry, model_name, registered_families
from ..runs.config import FROM_DATASET, TrainConfig
from ..runs.lock import RunLockedError
from ..training.interrupts import Terminated
from ..training.loop import TrainingError

__all__ = ["main"]

DESCRIPTION = "Train, evaluate and plot parallel cascaded ResNets for anytime prediction."


# ---- model flags ---------------------------------------------------------------------------------------------
# `--model` names any registered model (`cascadenet models`); the other model flags are the fields of every model
# family registered when this module is imported (its ModelConfig subclass: type, default and docstring become the
# flag), so a new family needs no code here. A field that several families have is one flag. Not flags: the
# options the dataset sets (FROM_DATASET) and `arch`, which the --model name carries (resnet18, sdn-resnet18).
NOT_FLAGS = (*FROM_DATASET, "arch")


@dataclass(frozen=True)
class _Flag:
    kind: Any  # the annotation tyro parses
    default: Any  # the first family's default (what tyro shows and fills in when the flag is not typed)
    doc: str
    families: dict[str, Any]  # family name -> its default


def _collect_flags() -> dict[str, _Flag]:
    flags: dict[str, _Flag] = {}
    for config_cls in registered_families():
        hints = typing.get_type_hints(config_cls)
        for f in dataclasses.fields(config_cls):
            if f.name in NOT_FLAGS or not f.init:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            kind, known = hints[f.name], flags.get(f.name)
            if known is None:
                doc = _docstring(config_cls, f.name)
                flags[f.name] = _Flag(kind, default, doc, {config_cls.family: default})
                continue
            known.families[config_cls.family] = default
            if kind != known.kind:  # the same name, another type: one flag that takes either
                flags[f.name] = dataclasses.replace(known, kind=_merge(known.kind, kind))
    return flags


def _merge(a: Any, b: Any) -> Any:
    if typing.get_origin(a) is Literal and typing.get_origin(b) is Literal:
        return Literal[tuple(dict.fromkeys(typing.get_args(a) + typing.get_args(b)))]  # type: ignore[valid-type]
    if bool in (a, b):
        return a  # a bool flag is a --x/--no-x pair; the family's own check refuses a value it cannot take
    return a | b


def _docstring(cls: type, name: str) -> str:
    try:  # tyro's reader of field docstrings (what it shows for ordinary dataclasses)
        from tyro._docstrings import get_field_docstring

        return get_field_docstring(cls, name, ()) or ""
    except Exception:  # a class without source, or another tyro
        return ""


FLAGS = _collect_flags()


def _flag_field(name: str, flag: _Flag) -> tuple[str, Any, Any]:
    families = list(flag.families)
    defaults = set(map(repr, flag.families.values()))
    if len(defaults) == 1:
        hint = f"({', '.join(families)}; default: {_shown(flag.default)})"
    else:
        hint = "(" + "; ".join(f"{fam} default: {_shown(d)}" for fam, d in flag.families.items()) + ")"
    arg = tyro.conf.arg(help=flag.doc, help_behavior_hint=hint)
    return name, Annotated[flag.kind, arg], field(default=flag.default)


def _shown(value: Any) -> str:
    return "None" if value is None else str(value)


def _model_flags_class() -> type:
    model_help = (
        "The model: a registered name (`cascadenet models`): cascaded ResNets resnet10/18/34/50, Shallow-Deep "
        "Networks sdn-resnet10/18/34/50, ...; its family decides which other model flags apply."
    )
    fields: list[Any] = [("model", Annotated[str, tyro.conf.arg(help=model_help)], field(default="resnet18"))]
    fields += [_flag_field(name, flag) for name, flag in FLAGS.items()]
    # which options came from a --config file (not typed: a family that lacks one drops it silently)
    fields.append(("file_options", tyro.conf.Suppress[tuple[str, ...]], field(default=())))
    return dataclasses.make_dataclass("ModelFlags", fields, frozen=True, kw_only=True, namespace={
        "__doc__": "The model options as command-line flags: --model names the model, the dataset sets the rest.",
        "of": classmethod(_flags_of), "config": _flags_config, "__module__": __name__,
    })  # fmt: skip


def _flags_of(cls: type, config: ModelConfig) -> Any:
    """The flags that reproduce ``config`` (``train --config FILE``: the file's options become the defaults)."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name in FLAGS}
    return cls(model=model_name(config), **values, file_options=tuple(values))


def _flags_config(self: Any, typed: Collection[str] = ()) -> ModelConfig:
    """The model configuration of the flags: the --model name's preset, the options of a --config file, the
    flags typed (``typed``: option names, as ``given_options`` finds them). A typed flag that the model's family
    lacks is refused, naming the flag and the family.

    Raises:
        ValueError: an unknown model, a flag of another family, a bad value (the message names the flag).
    """
    config_cls, preset = model_entry(self.model)
    own = [f.name for f in dataclasses.fields(config_cls) if f.name in FLAGS]
    lacking = [n for n in FLAGS if n in typed and n not in own]
    if lacking:
        names = ", ".join(_flag(n) for n in lacking)
        theirs = ", ".join(_flag(n) for n in own) or "none"
        raise ValueError(
            f"{names}: not an option of the {config_cls.family} family (--model {self.model}); its model options: "
            f"{theirs}"
        )
    from_file = {n: getattr(self, n) for n in own if n in self.file_options and n not in typed}
    options = {**from_file, **preset, **{n: getattr(self, n) for n in own if n in typed}}
    try:
        return config_cls(**options)
    except ValueError as e:  # the model's messages name its fields: name the flags instead
        pattern = r"(?<![-\w])(" + "|".join(own) + r")(=True)?(?![\w])"
        raise ValueError(re.sub(pattern, lambda m: _flag(m.group(1)), str(e))) from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


ModelFlags = _model_flags_class()


@dataclass
class TrainCommand(TrainConfig):
    """Train an anytime model (a cascaded ResNet, an SDN, ...); writes a run directory (config, checkpoints,
    metrics, final weights)."""

    model: Annotated[ModelFlags, tyro.conf.OmitArgPrefixes] = field(default_factory=ModelFlags)  # type: ignore[assignment,valid-type]
    """The model."""
    config: str | None = None
    """Start from the options in this config.json (written by a run); options given on the line override them."""
    resume: str | None = None
    """Continue the run in this directory from its last checkpoint, with its stored options."""

    def __post_init__(self) -> None:
        pass  # checked in train_config(), so that a bad value is one error line, not the parser's box

    def train_config(self, typed: Collection[str] = ()) -> TrainConfig:
        """The run's options; ``typed``: the options typed on the command line (``given_options``)."""
        names = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}
        return TrainConfig(model=self.model.config(typed), **{k: getattr(self, k) for k in names})


def _option_flags() -> dict[str, str]:
    """Every flag of ``cascadenet train`` that sets a training option -> the option's name in
    ``TrainConfig.options`` (``--model`` -> ``model``, ``--no-augment`` -> ``augment``)."""
    flags = {"--config": "config"}
    for name in [*TrainConfig().options(), *FLAGS]:
        flags["--" + name.replace("_", "-")] = name
        flags["--no-" + name.replace("_", "-")] = name
    return flags


def given_options(argv: Sequence[str]) -> set[str]:
    """The training options that the command line sets (whatever their value: ``--epochs 30`` is given even
    though 30 is the default), found by their flags as ``_prescan_config`` finds ``--config``."""
    flags, given = _option_flags(), set()
    for arg in argv:
        if arg == "--":
            break
        if arg.startswith("--"):
            flag = arg.partition("=")[0].replace("_", "-")
            if flag in flags:
                given.add(flags[flag])
    return given


@dataclass
class EvalCommand:
    """Evaluate a run: per-step accuracy, threshold and budgeted-batch curves, AUCs, MACs; writes eval.json."""

    run_dir: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR")]
    """Run directory written by `cascadenet train`."""
    split: Literal["test", "val", "train"] = "test"
    """Split to evaluate: test (eval.json), or the run's held-out val or its train part (eval-val.json,
    eval-train.json)."""
    scheme: Literal["parallel", "serial"] | None = None
    """Evaluate the same weights in another scheme (written to eval-<scheme>.json)."""
    num_steps: int | None = None
    """Run this many steps instead of the model's own (e.g. longer integration)."""
    data_root: str | None = None
    """Dataset folder, if it moved since training."""
    batch_size: int = 500
    """Evaluation batch size."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    save_logits: str | None = None
    """Also store the trajectory logits (T, N, C) and labels in this .npz file."""
    overwrite: bool = False
    """Allow --save-logits to replace an existing file."""
    progress: bool | None = None
    """Progress bar (default: when stderr is a terminal)."""
    reference_macs: float | None = None
    """Full serial cost (MACs) that the 25/50/75/100% accuracy budgets are fractions of (default: this model's)."""
    weights: str | None = None
    """Evaluate this weights file of the run instead of model.safetensors (e.g. model-recalibrated.safetensors;
    written to eval-recalibrated.json)."""


@dataclass
class PredictCommand:
    """Predict a split with early exit: each example stops at the step its policy chooses and leaves the batch;
    prints accuracy, mean step, mean MACs and wall time, and optionally writes each example's result."""

    run_dir: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR")]
    """Run directory written by `cascadenet train`."""
    split: Literal["test", "train"] = "test"
    """Split to predict."""
    threshold: float | None = None
    """Stop at the first step whose max softmax probability is >= this."""
    margin: float | None = None
    """Stop at the first step whose two largest softmax probabilities differ by >= this."""
    stable: int | None = None
    """Stop at the first step whose predicted class is the one of each of the K steps before it."""
    budget: float | None = None
    """At most this many MACs per example: stop at the last step within it."""
    output: Annotated[str | None, tyro.conf.arg(aliases=("-o",))] = None
    """Write each example's prediction, step, MACs and label to this .npz file."""
    overwrite: bool = False
    """Allow --output to replace an existing file."""
    data_root: str | None = None
    """Dataset folder, if it moved since training."""
    batch_size: int = 500
    """Examples per batch."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    progress: bool | None = None
    """Progress bar (default: when stderr is a terminal)."""


@dataclass
class RecalibrateCommand:
    """Recompute a finished run's batch-norm statistics at its final weights over training batches (precise batch
    norm); writes new weights beside the old ones, never over a file."""

    run_dir: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR")]
    """Run directory written by `cascadenet train`."""
    batches: int | None = None
    """Training batches (of the run's batch size, augmented as in training; default: the run's
    --recalibrate-batches, or 4)."""
    output: str = "model-recalibrated.safetensors"
    """File name of the new weights, in the run directory."""
    data_root: str | None = None
    """Dataset folder, if it moved since training."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""


@dataclass
class NoiseCommand:
    """Robustness of a cascade to persistent and transient noise: Gaussian pixel noise fed through the streaming
    step (fresh every step, frozen, for the first K steps, or in a burst), the cascade against the same weights
    with the EWS kernel and the feed-forward ResNet (each frame, running average); writes noise.md, noise.json and
    two plots."""

    run_dir: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR")]
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
    data_root: str | None = None
    """Dataset folder, if it moved since training."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    batch_size: int = 500
    """Examples per batch."""
    progress: bool | None = None
    """Progress bar (default: when stderr is a terminal)."""


@dataclass
class OodCommand:
    """Out-of-distribution detection from the output trace: AUROC and FPR at 95% TPR of trace scores (max softmax
    per step, settling step, prediction flips, entropy, a learned detector) against the max-softmax baseline, the
    run's test split vs held-out classes, another dataset or synthetic images; writes ood.md, ood.json, ood.png."""

    run_dir: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR")]
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
    data_root: str | None = None
    """The run's dataset folder, if it moved since training."""
    batch_size: int = 500
    """Examples per forward pass."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    progress: bool | None = None
    """Progress bars (default: when stderr is a terminal)."""


@dataclass
class PlotCommand:
    """Overlay per-step accuracy and the threshold speed-accuracy curves of several evaluated runs."""

    runs: Annotated[tuple[str, ...], tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR")]
    """Run directories (each evaluated with `cascadenet eval`)."""
    output: Annotated[str, tyro.conf.arg(aliases=("-o",))] = "speed_accuracy.png"
    """Figure file (.png, .pdf or .svg)."""
    eval_file: str = "eval.json"
    """Which evaluation of each run to plot (e.g. eval-serial.json)."""
    title: str | None = None
    """Figure title."""


@dataclass
class PolicyCommand:
    """Compare stopping policies (confidence, margin, stable argmax, a learned GRU) on runs' output traces:
    parameters fitted on each run's validation split, speed-accuracy curves on its test split."""

    runs: Annotated[tuple[str, ...], tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR")]
    """Run directories written by `cascadenet train` (each with a validation split)."""
    out: str | None = None
    """Folder of stopping.md, stopping.json and stopping.png (default: RUN_DIR/stopping; needed for several runs)."""
    overwrite: bool = False
    """Allow replacing an existing report in --out."""
    data_root: str | None = None
    """Dataset folder, if it moved since training."""
    batch_size: int = 500
    """Evaluation batch size."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto (the GRU is always fitted on the CPU)."""
    seed: int = 0
    """Seed of the learned policy (its fit/held-out split of the validation examples and its initialisation)."""
    progress: bool | None = None
    """Progress bar (default: when stderr is a terminal)."""


@dataclass
class DemoCommand:
    """The main job: train CascadedTD and CascadedCE on Fashion-MNIST, evaluate both, write a report."""

    out: str = "runs/demo"
    """Folder of the two runs and report.md (finished runs are reused, unfinished ones resumed)."""
    data_root: str | None = None
    """Fashion-MNIST folder (default: where Debian's dataset-fashion-mnist installs it)."""
    threads: int | None = 2
    """CPU threads."""
    device: str = "auto"
    """cpu, cuda or auto."""
    epochs: int | None = None
    """Override the epochs of both runs (a quicker, weaker demo)."""


@dataclass
class ReproduceCommand:
    """The paper's comparison in one command: CascadedTD(-MultiHead), SerialTD(-MultiHead), CascadedCE, SerialCE,
    SDN, SDN-IC-only and MSDNet, same data, seeds and recipe, lambda chosen on validation; writes
    <out>/<dataset>-<budget>/<dataset>.md (table and plots) and <dataset>.json. Finished runs are reused (if their
    options match), interrupted ones resumed."""

    dataset: DatasetName = "fashion-mnist"
    """Dataset (read from --data-root in its standard layout)."""
    data_root: str | None = None
    """Dataset folder (default for fashion-mnist: Debian's dataset-fashion-mnist)."""
    seeds: int = 3
    """Seeds per model (0..N-1)."""
    budget: Literal["small", "full"] = "small"
    """small: ResNet-10 width 8, 3 short epochs (2 CPU cores); full: the paper's recipe (ResNet-18, 150 epochs)."""
    out: str = "runs/reproduce"
    """Parent folder of the runs and the report."""
    threads: int | None = 2
    """CPU threads."""
    device: str = "auto"
    """cpu, cuda or auto."""
    progress: bool | None = None
    """Overall progress bar (default: when stderr is a terminal)."""


@dataclass
class ConvertCommand:
    """Convert a torchvision-layout ResNet state dict (a local file; nothing is downloaded) into a cascaded
    ResNet of the same depth: same weights, batch-norm statistics copied to every step. Fine-tune it with
    `cascadenet train --init OUTPUT`."""

    source: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RESNET.pth")]
    """A state dict of torchvision's ResNet (resnet18/34/50 layout): .pth, .pt or .safetensors."""
    output: Annotated[str, tyro.conf.arg(aliases=("-o",))]
    """The cascaded model to write (.safetensors)."""
    overwrite: bool = False
    """Allow replacing an existing output file."""
    num_steps: int | None = None
    """Steps of a trajectory (default: the settling time, blocks + 2 with the stem delayed)."""
    scheme: Literal["parallel", "serial"] = "parallel"
    """Default execution scheme of the cascade."""
    stem_delay: bool = True
    """Delay the stem output by one step."""
    temporal_bn: bool = True
    """Batch-norm running statistics per step (each starts as the pretrained network's)."""
    temporal_affine: bool = False
    """Batch-norm scale and shift per step too."""
    multi_head: bool = False
    """One classifier per step (each starts as the pretrained classifier)."""


@dataclass
class TypicalityCommand:
    """Are typical examples classified sooner? Bins a split's examples by typicality (a score file, or the built-in
    hold-out consistency estimator) and reports, per bin and per run, accuracy at each step, the step from which
    each example stays correct, and the confidence policy's stopping step; writes typicality.md/.json/.png."""

    runs: Annotated[tuple[str, ...], tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR")]
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
    repeats: int = 2
    """Estimator: random fold partitions (each training example is scored once per repeat)."""
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
    data_root: str | None = None
    """Dataset folder, if it moved since training."""
    batch_size: int = 500
    """Evaluation batch size."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto (the runs and the estimator)."""
    progress: bool | None = None
    """Progress bars (default: when stderr is a terminal)."""


@dataclass
class ModelsCommand:
    """List the registered models (the names --model takes)."""

    pattern: tyro.conf.Positional[str | None] = None
    """Glob pattern, e.g. 'resnet1*'."""


def _prescan_config(argv: list[str]) -> TrainCommand:
    """``train --config FILE``: the file's options become the defaults that the other flags override."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.partition("=")[2]
        else:
            continue
        stored = TrainConfig.from_file(path)
        names = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}
        return TrainCommand(model=ModelFlags.of(stored.model), **{k: getattr(stored, k) for k in names}, config=path)
    return TrainCommand()


def _parse(argv: list[str]):
    default_train = _prescan_config(argv[1:]) if argv[:1] == ["train"] else TrainCommand()
    sub = tyro.conf.subcommand
    spec = (
        Annotated[TrainCommand, sub("train", default=default_train)]
        | Annotated[EvalCommand, sub("eval")]
        | Annotated[PredictCommand, sub("predict")]
        | Annotated[RecalibrateCommand, sub("recalibrate")]
        | Annotated[OodCommand, sub("ood")]
        | Annotated[NoiseCommand, sub("noise")]
        | Annotated[PlotCommand, sub("plot")]
        | Annotated[PolicyCommand, sub("policy")]
        | Annotated[DemoCommand, sub("demo")]
        | Annotated[ReproduceCommand, sub("reproduce")]
        | Annotated[ModelsCommand, sub("models")]
        | Annotated[ConvertCommand, sub("convert")]
        | Annotated[TypicalityCommand, sub("typicality")]
    )
    return tyro.cli(spec, args=argv, prog="cascadenet", description=DESCRIPTION,
                    config=(tyro.conf.OmitSubcommandPrefixes,))  # fmt: skip


def _run_train(cmd: TrainCommand, argv: Sequence[str]) -> None:
    from ..training.loop import train

    if cmd.resume is None:
        run_dir = train(cmd.train_config(given_options(argv)))
    else:
        # the options typed on the line, whatever their value; train() compares them with the stored ones
        # (read from the parsed flags, not from a TrainConfig: the defaults around them need not be a valid run)
        model = {"model": cmd.model.model, **{n: getattr(cmd.model, n) for n in FLAGS}}
        train_fields = {f.name: getattr(cmd, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "model"}
        options = {**model, **train_fields, "config": cmd.config}
        overrides = {name: options[name] for name in given_options(argv)}
        run_dir = train(resume=cmd.resume, overrides=overrides)
    if _rank() == 0:
        print(f"run finished: {run_dir}  (next: cascadenet eval {run_dir})")


def _run_eval(cmd: EvalCommand) -> None:
    from ..evaluation.evaluate import evaluate, format_table

    progress = sys.stderr.isatty() if cmd.progress is None else cmd.progress
    result = evaluate(cmd.run_dir, split=cmd.split, scheme=cmd.scheme, num_steps=cmd.num_steps,
                      data_root=cmd.data_root, batch_size=cmd.batch_size, device=cmd.device,
                      save_logits=cmd.save_logits, overwrite=cmd.overwrite, progress=progress,
                      reference_macs=cmd.reference_macs, weights=cmd.weights)  # fmt: skip
    print(format_table(result))


def _run_predict(cmd: PredictCommand) -> None:
    from ..evaluation.early_exit import format_summary, policy_from_flags, predict_run

    policy = policy_from_flags(cmd.threshold, cmd.margin, cmd.stable)
    progress = sys.stderr.isatty() if cmd.progress is None else cmd.progress
    summary = predict_run(cmd.run_dir, split=cmd.split, policy=policy, budget=cmd.budget, data_root=cmd.data_root,
                          batch_size=cmd.batch_size, device=cmd.device, output=cmd.output, overwrite=cmd.overwrite,
                          progress=progress)  # fmt: skip
    print(format_summary(summary))


def _run_recalibrate(cmd: RecalibrateCommand) -> None:
    from ..training.recalibrate import recalibrate_run

    path, record = recalibrate_run(cmd.run_dir, batches=cmd.batches, output=cmd.output, data_root=cmd.data_root,
                                   device=cmd.device)  # fmt: skip
    print(f"wrote {path}: statistics over {record['batches']} batches ({record['examples']} examples) "
          f"(next: cascadenet eval {cmd.run_dir} --weights {path.name})")  # fmt: skip


def _run_noise(cmd: NoiseCommand) -> None:
    from ..properties.noise import noise_run

    progress = sys.stderr.isatty() if cmd.progress is None else cmd.progress
    options = {f.name: getattr(cmd, f.name) for f in dataclasses.fields(cmd) if f.name != "progress"}
    result, paths = noise_run(options.pop("run_dir"), **options, progress=progress)
    print(f"final accuracy (%) at step {result['num_steps'] - 1}, {result['num_examples']} examples:")
    for p, entries in result["results"].items():
        for e in entries:
            finals = ", ".join(f"{m} {100 * v['final_accuracy']:.1f}" for m, v in e["methods"].items())
            print(f"  {p}, sigma {e['sigma']:g}: {finals}")
    print(f"wrote {', '.join(str(p) for p in paths)}")


def _run_ood(cmd: OodCommand) -> None:
    from ..properties.ood import ood_run

    progress = sys.stderr.isatty() if cmd.progress is None else cmd.progress
    out = Path(cmd.out) if cmd.out is not None else Path(cmd.run_dir) / "ood"
    result = ood_run(cmd.run_dir, ood_dataset=cmd.ood_dataset, ood_data=cmd.ood_data, holdout=cmd.holdout,
                     synthetic=cmd.synthetic_ood, out=out, overwrite=cmd.overwrite, data_root=cmd.data_root,
                     batch_size=cmd.batch_size, device=cmd.device, seed=cmd.seed, progress=progress)  # fmt: skip
    for data in result["ood_sets"].values():
        scores = data["scores"]
        best = max((n for n in scores if n != "msp"), key=lambda n: scores[n]["auroc"])
        print(f"{data['title']}: AUROC msp {scores['msp']['auroc']:.4f}, best {best} {scores[best]['auroc']:.4f}")
    print(f"report: {out / 'ood.md'}")


def _run_plot(cmd: PlotCommand) -> None:
    from ..evaluation.plotting import plot_runs

    results = []
    for run in cmd.runs:
        path = Path(run) / cmd.eval_file
        if not path.is_file():
            raise CheckpointError(f"{path}: no evaluation here; run `cascadenet eval {run}` first")
        try:
            results.append((Path(run).name, json.loads(path.read_text())))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not a readable evaluation: {e}") from None
    print(plot_runs(results, cmd.output, title=cmd.title))


def _run_policy(cmd: PolicyCommand) -> None:
    from ..properties.stopping import policy_report

    progress = sys.stderr.isatty() if cmd.progress is None else cmd.progress
    report = policy_report(cmd.runs, out=cmd.out, overwrite=cmd.overwrite, device=cmd.device,
                           batch_size=cmd.batch_size, seed=cmd.seed, data_root=cmd.data_root,
                           progress=progress)  # fmt: skip
    print(f"report: {report}")


def _run_demo(cmd: DemoCommand) -> None:
    from ..experiments.demo import run_demo

    report = run_demo(cmd.out, data_root=cmd.data_root, threads=cmd.threads, device=cmd.device, epochs=cmd.epochs)
    print(f"report: {report}")


def _run_reproduce(cmd: ReproduceCommand) -> None:
    from ..experiments.reproduce import reproduce

    progress = sys.stderr.isatty() if cmd.progress is None else cmd.progress
    report = reproduce(cmd.dataset, data_root=cmd.data_root, seeds=cmd.seeds, budget=cmd.budget, out=cmd.out,
                       threads=cmd.threads, device=cmd.device, progress=progress)  # fmt: skip
    print(f"report: {report}")


def _run_convert(cmd: ConvertCommand) -> None:
    from ..models.pretrained import convert_file

    options = {f.name: getattr(cmd, f.name) for f in dataclasses.fields(cmd)}
    source, output, overwrite = options.pop("source"), options.pop("output"), options.pop("overwrite")
    model = convert_file(source, output, overwrite=overwrite, **options)
    c = model.config
    print(f"wrote {output}: cascaded {c.arch}, width {c.width}, {c.num_classes} classes, {model.num_steps} steps "
          f"(next: cascadenet train --init {output} ...)")  # fmt: skip


def _run_typicality(cmd: TypicalityCommand) -> None:
    from ..properties.typicality import EstimatorOptions, format_summary, typicality

    estimator = EstimatorOptions(folds=cmd.folds, repeats=cmd.repeats, epochs=cmd.estimator_epochs,
                                 model=cmd.estimator_model, seed=cmd.estimator_seed)  # fmt: skip
    progress = sys.stderr.isatty() if cmd.progress is None else cmd.progress
    result = typicality(cmd.runs, scores=cmd.scores, split=cmd.split, bins=cmd.bins, thresholds=cmd.thresholds,
                        estimator=estimator, out=cmd.out, overwrite=cmd.overwrite, data_root=cmd.data_root,
                        batch_size=cmd.batch_size, device=cmd.device, progress=progress)  # fmt: skip
    print(format_summary(result))


def _run_models(cmd: ModelsCommand) -> None:
    from ..models.registry import list_models

    print("\n".join(list_models(cmd.pattern)))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cascadenet`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _configure_logging()
    try:
        cmd = _parse(argv)
        if isinstance(cmd, TrainCommand):
            _run_train(cmd, argv[1:])
        else:
            runner = {EvalCommand: _run_eval, PredictCommand: _run_predict, PlotCommand: _run_plot,
                      DemoCommand: _run_demo, ReproduceCommand: _run_reproduce, ModelsCommand: _run_models,
                      ConvertCommand: _run_convert, RecalibrateCommand: _run_recalibrate,
                      TypicalityCommand: _run_typicality,
                      NoiseCommand: _run_noise,
                      PolicyCommand: _run_policy,
                      OodCommand: _run_ood}[type(cmd)]  # fmt: skip
            runner(cmd)
    except (ValueError, DataError, CheckpointError, TrainingError, RunLockedError, OSError) as e:
        if _rank() == 0:
            print(f"cascadenet: error: {_one_line(e)}", file=sys.stderr)
        elif not getattr(e, "reported_by_rank0", False):  # under torchrun: an error of this process alone
            print(f"cascadenet: error: process {_rank()}: {_one_line(e)}", file=sys.stderr)
        return 2
    except Terminated:
        return 143  # 128 + SIGTERM, as a shell reports a process that SIGTERM ended
    except KeyboardInterrupt:
        return 130
    return 0


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _one_line(e: BaseException) -> str:
    """An error as one line; an OSError as 'path: reason' (a full disk, a read-only folder, a file in the way)."""
    if isinstance(e, OSError) and e.strerror:
        text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    else:
        text = str(e) or type(e).__name__
    return " ".join(line.strip() for line in text.strip().splitlines())


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at each message (not the one of the first call: callers such as test
    runners replace it)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging() -> None:
    """The library's INFO messages (epoch summaries, resume and interrupt notices) as plain lines on stderr."""
    logger = logging.getLogger("cascadenet")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


if __name__ == "__main__":
    sys.exit(main())
