"""A run's options: ``TrainConfig`` (which nests the model's configuration), its ``config.json``, and the resume
policy (which options a resumed run may change).

Training writes ``config.json``; evaluation, the demo and the command line read it. Keeping it here lets all of
them depend on it without depending on the training loop.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..data.datasets import DatasetName
from ..models.anytime import ModelConfig, check_types
from ..models.cascade import CascadeConfig
from ..models.registry import config_from_dict, model_entry, model_name
from ..models.sdn import SDNConfig
from ..utils.files import first_sentence

__all__ = [
    "CONFIG",
    "LOSSES",
    "RESUMABLE",
    "FROM_DATASET",
    "IC_LOSSES",
    "check_loss_fits",
    "ConfigError",
    "TrainConfig",
    "check_resume_overrides",
    "changed_options",
    "stored_paths",
]

CONFIG = "config.json"

# Options a resumed run may change: where and how fast it runs, not what it computes.
RESUMABLE = ("device", "threads", "progress", "data_root", "checkpoint_every", "eval_batch_size", "workers", "log")
# Model options that training takes from the dataset, not from the user (those the model's family has; an SDN's
# internal classifiers are sized for the images' side).
FROM_DATASET = ("num_classes", "in_channels", "input_size")
# Losses that train a Shallow-Deep Network's internal classifiers, and so need one.
# The training objectives (cascadenet.training.optim.compute_loss has one branch each).
Loss = Literal["td", "ce", "final", "sdn", "ic-only"]
LOSSES: tuple[str, ...] = typing.get_args(Loss)
IC_LOSSES = ("sdn", "ic-only")


class ConfigError(ValueError):
    """A configuration file that cannot be read or does not describe a run (the message names the file)."""

    def __str__(self) -> str:  # one line, whatever the messages of other libraries it quotes hold
        return " ".join(line.strip() for line in super().__str__().splitlines())


@dataclass
class TrainConfig:
    """Train an anytime model (by default a cascaded ResNet). Every option is a field (usable from Python)."""

    model: ModelConfig = field(default_factory=CascadeConfig)
    """The model: a CascadeConfig (or another registered family's configuration); num_classes and in_channels
    are set from the dataset."""

    # --- data ---
    dataset: DatasetName | Literal["python"] = "fashion-mnist"
    """Dataset; all but synthetic are read from --data-root in their standard on-disk layout (python: data given
    to cascadenet.fit, which it records)."""
    data_root: str | None = None
    """Dataset folder (default for fashion-mnist: where Debian's dataset-fashion-mnist installs it)."""
    image_size: int | None = None
    """Resize images to this size (image folders of mixed sizes)."""
    grayscale: bool | None = None
    """Image folders (read into memory or streamed): one channel (true), RGB (false), or one channel when every
    image is grayscale (default)."""
    val_fraction: float = 0.1
    """Share of the training set held out for validation (seeded)."""
    augment: bool = True
    """Random crop with padding and horizontal flip (where the dataset allows it)."""
    synthetic_size: int | None = None
    """Samples of the synthetic dataset (tests)."""
    holdout_classes: tuple[int, ...] | None = None
    """Train on the other classes only (e.g. 7 8 9): these classes' examples are dropped before the validation
    split and the rest renumbered 0..K-1 in order; evaluation uses the kept classes of the test split, and
    `cascadenet ood` the held-out ones as out-of-distribution data."""
    stream: Literal["auto", "on", "off"] = "auto"
    """Image folders: decode on the fly in DataLoader workers with the ImageNet transforms (on), hold the decoded
    images in memory (off), or stream when they would take more than --stream-above-gb or half the available
    memory (auto; the choice is stored with the run)."""
    stream_above_gb: float = 8.0
    """The size of decoded training images above which --stream auto streams."""
    workers: int | None = None
    """DataLoader worker processes of a streamed image folder (default: CPU cores - 1, at most 8)."""
    normalize: str | None = None
    """Input normalisation: dataset (the training split's per-channel mean and std), imagenet, or numbers MEAN,STD
    (one pair for every channel, or C means then C stds); default: the statistics stored with the --init weights
    (ImageNet's for converted torchvision weights), else the dataset's."""
    init: str | None = None
    """Start from the weights in this file (a model.safetensors: a finished run's, or `cascadenet convert`'s);
    the model is the file's (leave the model options out). A changed number of classes gets a new classifier."""

    # --- objective ---
    loss: Loss = "td"
    """td: TD(lambda) over the trajectory; ce: cross-entropy at every step; final: ordinary feed-forward
    cross-entropy (the CascadedCE / SerialCE baselines, delays inserted only at test time; an SDN's plain ResNet);
    sdn: SDN's joint loss, IC weights ramping over the epochs; ic-only: the ICs alone on a frozen backbone (SDN
    models; start it with --init from a run trained with --loss final)."""
    lam: float = 0.5
    """Lambda of the TD loss, in [0, 1] (1 = cross-entropy at every step)."""
    label_smoothing: float = 0.0
    """Label smoothing of the targets."""

    # --- optimisation ---
    epochs: int = 30
    """Passes over the training set."""
    batch_size: int = 128
    """Examples per optimizer step, per process (under torchrun, N processes step on N x this)."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """SGD with Nesterov momentum, or AdamW."""
    lr: float = 0.1
    """Peak learning rate."""
    momentum: float = 0.9
    """SGD momentum (Nesterov)."""
    weight_decay: float = 5e-4
    """Weight decay of conv and linear weights (not of batch-norm parameters or biases)."""
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    """onecycle: linear warm-up then linear decay to 0; cosine: warm-up then cosine decay to 0."""
    warmup_epochs: float | None = None
    """Length of the linear warm-up, in epochs (may be fractional); default: one epoch, or a fifth of a run
    shorter than 5 epochs (so that `--epochs 1` works)."""
    max_batches: int | None = None
    """Stop each epoch after this many batches (quick tests)."""
    recalibrate_batches: int = 4
    """At the end of training, recompute every batch-norm statistic at the final weights over this many training
    batches (drawn as in training, seeded from --seed), before the last validation and the final weights; 0: keep
    the running averages. See docs/semantics.md (precise batch norm)."""

    # --- run ---
    seed: int = 0
    """Seed of the initialisation, the validation split and the batch order."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (cuda when available)."""
    threads: int | None = None
    """CPU threads for PyTorch (default: PyTorch's choice)."""
    amp: bool | None = None
    """bf16 autocast; default: on for CUDA, off for CPU."""
    channels_last: bool | None = None
    """channels_last memory format; default: on for CUDA."""
    out: str = "runs"
    """Parent folder of run directories."""
    name: str | None = None
    """Run directory name (default: model-loss-dataset-seed)."""
    checkpoint_every: int = 0
    """Also checkpoint every N optimizer steps (0: at epoch ends only)."""
    eval_batch_size: int = 500
    """Batch size of validation."""
    progress: bool | None = None
    """Progress bars (default: only when stderr is a terminal)."""
    log: str | None = None
    """Experiment tracking, comma-separated: csv (train_log.csv per step: loss, lr; val_log.csv per epoch: accuracy
    per exit, anytime AUC), tensorboard (RUN/tensorboard; needs the tensorboard package)."""
    keep_best: bool = False
    """Also keep the weights of the epoch with the best validation anytime AUC (model-best.safetensors)."""
    early_stop: int | None = None
    """Stop when the validation anytime AUC has not improved for this many epochs (keeps the best weights too)."""

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelConfig):
            raise ValueError(f"model must be a model configuration (e.g. CascadeConfig), got {self.model!r}")
        if isinstance(self.holdout_classes, list):  # a JSON round trip turns the tuple into a list
            self.holdout_classes = tuple(self.holdout_classes)
        check_types(self, flags=True)  # a config file can hold "epochs": "2" or "augment": "false"
        self._check_holdout()
        self._check_values()
        self._check_normalize()
        self._check_loss()

    def _check_values(self) -> None:
        """Every number finite and in its range, and the options that exclude each other."""
        finite = [n for n in ("lr", "lam", "label_smoothing", "momentum", "weight_decay", "warmup_epochs",
                              "val_fraction", "stream_above_gb")
                  if getattr(self, n) is not None and not math.isfinite(getattr(self, n))]  # fmt: skip
        if finite:
            raise ValueError(f"--{finite[0].replace('_', '-')} must be a finite number, got {getattr(self, finite[0])}")
        decays = self.schedule != "constant"
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {self.eval_batch_size}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (0.0 <= self.lam <= 1.0, f"--lam must be in [0, 1], got {self.lam}"),
            (0.0 < self.val_fraction < 1.0, f"--val-fraction must be in (0, 1), got {self.val_fraction}"),
            (0.0 <= self.label_smoothing < 1.0, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (0.0 <= self.momentum < 1.0, f"--momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.warmup() >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}"),
            (
                not decays or self.warmup() < self.epochs,
                f"--warmup-epochs {self.warmup()} is not shorter than --epochs {self.epochs}: the {self.schedule}"
                " learning rate would never decay (use a shorter --warmup-epochs, more --epochs, or --schedule "
                "constant)",
            ),
            (self.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, got {self.checkpoint_every}"),
            (self.loss in LOSSES, f"unknown loss {self.loss!r}; valid choices: {', '.join(LOSSES)}"),
            (self.max_batches is None or self.max_batches >= 1, f"--max-batches must be >= 1, got {self.max_batches}"),
            (self.recalibrate_batches >= 0, f"--recalibrate-batches must be >= 0, got {self.recalibrate_batches}"),
            (self.threads is None or self.threads >= 1, f"--threads must be >= 1, got {self.threads}"),
            (self.workers is None or self.workers >= 0, f"--workers must be >= 0, got {self.workers}"),
            (self.stream_above_gb > 0, f"--stream-above-gb must be > 0, got {self.stream_above_gb}"),
            (
                self.stream != "on" or self.dataset == "imagefolder",
                f"--stream on: only image folders stream (--dataset imagefolder); {self.dataset} is read into memory",
            ),
            (self.seed >= 0, f"--seed must be >= 0, got {self.seed}"),
            (
                self.name is None or _plain_name(self.name),
                f"--name must be a folder name inside --out (no '/', not '.' or '..'), got {self.name!r}",
            ),
            (self.early_stop is None or self.early_stop >= 1, f"--early-stop must be >= 1, got {self.early_stop}"),
            (
                not self.log or all(n.strip() in ("csv", "tensorboard", "") for n in self.log.split(",")),
                f"unknown --log {self.log!r}; valid choices: csv, tensorboard (comma-separated)",
            ),
            (self.image_size is None or self.image_size >= 1, f"--image-size must be >= 1, got {self.image_size}"),
            (
                self.synthetic_size is None or self.synthetic_size >= 2,
                f"--synthetic-size must be >= 2 (a training and a validation example), got {self.synthetic_size}",
            ),
            (
                not (getattr(self.model, "stem_delay", False) and getattr(self.model, "num_steps", None) == 1),
                "--num-steps 1 leaves no step that sees the input (with the stem delayed, step 0 cannot): use "
                "--num-steps 2 or more, or --no-stem-delay",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def _check_normalize(self) -> None:
        spec = self.normalize
        if spec is None or spec in ("dataset", "imagenet"):
            return
        try:
            numbers = [float(v) for v in spec.split(",")]
        except ValueError:
            numbers = []
        if len(numbers) < 2 or len(numbers) % 2 or not all(math.isfinite(v) for v in numbers):
            raise ValueError(f"--normalize takes dataset, imagenet or MEAN,STD numbers, got {spec!r}")
        if not all(v > 0 for v in numbers[len(numbers) // 2 :]):
            raise ValueError(f"--normalize {spec}: the standard deviations must be > 0")

    def _check_loss(self) -> None:
        """The loss fits the model (unless --init's file decides the model); ic-only starts from trained weights."""
        # --loss final trains the feed-forward network: the last step's classifier and scale/shift only; per-step
        # copies would keep their initial values, and the cascade uses them at test time
        untrained = {"multi_head": "classifiers", "temporal_affine": "batch-norm scales and shifts"}
        flags = [n for n in untrained if getattr(self.model, n, False)]
        if self.loss == "final" and flags:
            names = " and ".join(f"--{n.replace('_', '-')}" for n in flags)
            what = " and ".join(untrained[n] for n in flags)
            raise ValueError(
                f"--loss final trains only the feed-forward network: with {names} the other steps' {what} would "
                f"stay untrained yet be used at test time (drop {names}, or use --loss td or ce)"
            )
        if self.init is None:  # else the model is the --init file's: checked when training reads it
            check_loss_fits(self.loss, self.model)
            if self.loss == "ic-only":
                raise ValueError(
                    "--loss ic-only trains the internal classifiers on a frozen backbone: without --init the backbone "
                    "would stay at its random initialisation (start it with --init RUN/model.safetensors from a run "
                    "trained with --loss final, or use --loss sdn)"
                )

    def _check_holdout(self) -> None:
        """--holdout-classes: distinct class indices >= 0, stored sorted (the range is the dataset's to check)."""
        held = self.holdout_classes
        if held is None:
            return
        if not held:
            raise ValueError("--holdout-classes needs at least one class index (leave it out to keep every class)")
        bad = [c for c in held if isinstance(c, bool) or not isinstance(c, int) or c < 0]
        if bad:
            raise ValueError(f"--holdout-classes takes class indices >= 0, got {bad[0]!r}")
        if len(set(held)) != len(held):
            raise ValueError(f"--holdout-classes lists a class twice: {' '.join(map(str, held))}")
        if self.stream == "on":
            raise ValueError("--holdout-classes works on datasets read into memory, not with --stream on")
        self.holdout_classes = tuple(sorted(held))

    def warmup(self) -> float:
        """The warm-up in epochs: ``warmup_epochs``, or by default one epoch, or a fifth of a run shorter than 5
        epochs (a one-epoch smoke run then warms up over its first fifth instead of being refused)."""
        return self.warmup_epochs if self.warmup_epochs is not None else min(1.0, self.epochs / 5)

    def options(self) -> dict[str, Any]:
        """Every option under its command-line name, the model's inlined (``arch`` is ``model``, as the flag
        ``--model``), without those the dataset sets: what tells two runs apart."""
        name = model_name(self.model)
        implied = model_entry(name)[1]  # arch is in the name (resnet18, sdn-resnet18): not repeated
        flat = {"model": name}
        for f in dataclasses.fields(self.model):
            if f.name not in FROM_DATASET and not (f.name == "arch" and "arch" in implied):
                flat[f.name] = getattr(self.model, f.name)
        flat.update((f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "model")
        return flat

    def run_name(self) -> str:
        return self.name or f"{model_name(self.model)}-{self.loss}-{self.dataset}-s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; ``from_dict`` reads it back."""
        return {**dataclasses.asdict(self), "model": self.model.to_dict()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        """Read ``to_dict``'s output, or the flat form of the first release (``"model": "resnet18"`` and the
        model's options among the training options). Unknown keys are an error, missing keys take defaults,
        every value is checked against its option's type.

        Raises:
            ValueError: not a dict, unknown keys, a value of the wrong type or out of range.
        """
        if not isinstance(raw, dict):
            raise ValueError(f"a configuration is a JSON object of options, got {type(raw).__name__}")
        raw = dict(raw)
        model = raw.pop("model", None)
        if model is None:
            model = CascadeConfig()
        elif isinstance(model, str):  # format 1: the model's options were fields of TrainConfig
            names = {f.name for f in dataclasses.fields(CascadeConfig)} - {"arch"}
            model = CascadeConfig(arch=model, **{k: raw.pop(k) for k in list(raw) if k in names})
        elif isinstance(model, dict):
            model = config_from_dict(model)
        else:
            raise ValueError(f"model must be a model name or a model configuration object, got {model!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            names = (k if k.isprintable() else repr(k) for k in unknown)
            raise ValueError(f"unknown configuration keys: {', '.join(names)}")
        return cls(model=model, **raw)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TrainConfig:
        """Read a config.json written by a run (this version or the first release). A run's file without
        ``recalibrate_batches`` predates the option: it reads as 0 (the run did not recalibrate).

        Raises:
            ConfigError: unreadable, not JSON, or not a valid configuration (the message names the file).
        """
        try:
            raw = json.loads(Path(path).read_bytes())
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the configuration: {e.strerror or e}") from None
        except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested beyond reason
            raise ConfigError(f"{path}: cannot read the configuration: not JSON ({first_sentence(e)})") from None
        if isinstance(raw, dict) and isinstance(raw.get("train"), dict):
            relative = raw.get("relative_paths")
            raw = raw["train"]
            if isinstance(relative, list) and "init" in relative and isinstance(raw.get("init"), str):
                # stored relative to the run directory (it points into the folder of the run): movable with it
                raw = {**raw, "init": os.path.normpath(Path(path).parent / raw["init"])}
            # a run written before --recalibrate-batches kept its running averages: resumed or replayed, it
            # computes what it did
            raw.setdefault("recalibrate_batches", 0)
        try:
            return cls.from_dict(raw)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{path}: {e}") from None


def _plain_name(name: str) -> bool:
    """A run directory's name: one path component, so that the run lands inside --out."""
    return bool(name) and name not in (".", "..") and "/" not in name and os.sep not in name and "\0" not in name


def check_loss_fits(loss: str, model: ModelConfig) -> None:
    """Raise ``ValueError`` unless ``loss`` can train ``model``: the SDN losses need a Shallow-Deep Network, and
    ``ic-only`` one with internal classifiers."""
    if loss in IC_LOSSES and not isinstance(model, SDNConfig):
        raise ValueError(
            f"--loss {loss} trains the internal classifiers of a Shallow-Deep Network; model {model_name(model)} "
            f"(family {model.family}) has none (choose an SDN, e.g. --model sdn-resnet18)"
        )
    if loss == "ic-only" and model.ic_after == ():
        raise ValueError("--loss ic-only trains internal classifiers, and this SDN has none (its ic_after is empty)")


def check_resume_overrides(overrides: dict[str, Any], stored: TrainConfig | None = None) -> dict[str, Any]:
    """The resume policy: a resumed run keeps its stored options except the ``RESUMABLE`` ones.

    Args:
        overrides: the options given (by command-line name, as ``TrainConfig.options``), whatever their value.
        stored: the run's stored configuration; given, an option equal to its stored value is no change.

    Returns:
        The overrides to apply to the stored configuration (the ``RESUMABLE`` ones).

    Raises:
        ValueError: naming the options that may not change (as command-line flags) and those that may.
    """
    current = stored.options() if stored is not None else {}
    refused = [k for k, v in overrides.items()
               if k not in RESUMABLE and (k not in current or current[k] != _as_stored(k, v))]  # fmt: skip
    if refused:
        given = ", ".join(f"--{n.replace('_', '-')}" for n in refused)
        allowed = ", ".join("--" + n.replace("_", "-") for n in RESUMABLE)
        raise ValueError(
            f"--resume continues a run with its stored options; {given} cannot change them (allowed with --resume: "
            f"{allowed})"
        )
    return {k: v for k, v in overrides.items() if k in RESUMABLE}


def _same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def stored_paths(cfg: TrainConfig, run_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """``cfg.to_dict()`` for a run's config.json, with ``init`` relative to ``run_dir`` where it points into the
    folder that holds the run (a reproduction's own backbone run): the folder can then move or be copied. Returns
    the dict and the names of the options stored relative (``relative_paths`` in config.json)."""
    stored = cfg.to_dict()
    if isinstance(cfg.init, str):
        target, home = os.path.realpath(cfg.init), os.path.realpath(run_dir.parent)
        if os.path.commonpath([target, home]) == home:
            stored["init"] = os.path.relpath(target, os.path.realpath(run_dir))
            return stored, ["init"]
    return stored, []


def _as_stored(name: str, value: Any) -> Any:
    """An option's value as the configuration stores it: held-out classes sorted (``3 1`` is the run ``1 3``)."""
    if name == "holdout_classes" and isinstance(value, list | tuple) and all(isinstance(c, int) for c in value):
        return tuple(sorted(value))
    return value


def changed_options(stored: TrainConfig, wanted: TrainConfig) -> dict[str, Any]:
    """The options (by command-line name) whose value in ``wanted`` differs from ``stored``."""
    a, b = stored.options(), wanted.options()
    if b.get("stream") == "auto":  # a stored run holds what auto chose for it
        b.pop("stream")
    if isinstance(a.get("init"), str) and isinstance(b.get("init"), str) and _same_file(a["init"], b["init"]):
        b["init"] = a["init"]  # one file, named from two places
    return {k: v for k, v in b.items() if a.get(k) != v}
