"""``cascadenet train``: the training options (``TrainConfig``'s fields, the model flags) and ``--config`` /
``--resume``."""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Annotated

import tyro

from ..data.datasets import DatasetName
from ..runs.config import TrainConfig
from .model_flags import FLAGS, ModelFlags, given_options
from .options import DataRoot, Device, Progress, Threads, tristate

__all__ = ["TrainCommand", "prescan_config", "run_train"]


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
    # TrainConfig's options that every verb shares (cli.options) or that are flag pairs: redeclared here for
    # their flag form and help; their place in the help and their defaults stay TrainConfig's.
    dataset: DatasetName = "fashion-mnist"
    """Dataset; all but synthetic are read from --data-root in their standard on-disk layout."""
    data_root: DataRoot = None
    device: Device = "auto"
    threads: Threads = None
    amp: tristate("bf16 autocast.", "(default: on for CUDA, off for CPU)") = None  # type: ignore[valid-type]
    channels_last: tristate("channels_last memory format.", "(default: on for CUDA)") = None  # type: ignore[valid-type]
    progress: Progress = None
    grayscale: tristate("Image folders read into memory: one channel.", "(default: when every image is grayscale)") = (
        None  # type: ignore[valid-type]
    )

    def __post_init__(self) -> None:
        pass  # checked in train_config(), so that a bad value is one error line, not the parser's box

    def train_config(self, typed: Collection[str] = ()) -> TrainConfig:
        """The run's options; ``typed``: the options typed on the command line (``given_options``)."""
        names = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}
        return TrainConfig(model=self.model.config(typed), **{k: getattr(self, k) for k in names})


def prescan_config(argv: Sequence[str]) -> TrainCommand:
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


def run_train(cmd: TrainCommand, argv: Sequence[str]) -> None:
    """Train a new run, or resume one; ``argv``: the line after ``train`` (the options typed)."""
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
    from . import rank

    if rank() == 0:  # under torchrun, one line for all the processes
        print(f"run finished: {run_dir}  (next: cascadenet eval {shlex.quote(str(run_dir))})")
