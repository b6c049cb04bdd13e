"""The verbs of the ``cascadenet`` command, each a dataclass of its flags (defined in the module of its group), and
what tyro parses: their union."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Union

import tyro

from .deployment import ExportCommand, ServeCommand
from .evaluation import EvalCommand, PlotCommand, PredictCommand, RecalibrateCommand
from .experiments import DemoCommand, ReproduceCommand
from .models import ConvertCommand, ModelsCommand
from .properties import NoiseCommand, OodCommand, PolicyCommand, TypicalityCommand
from .train import TrainCommand, prescan_config

__all__ = ["VERBS", "command_spec"]

# name -> command, in the order `cascadenet --help` lists them
VERBS: dict[str, type] = {
    "train": TrainCommand,
    "eval": EvalCommand,
    "predict": PredictCommand,
    "recalibrate": RecalibrateCommand,
    "ood": OodCommand,
    "noise": NoiseCommand,
    "plot": PlotCommand,
    "policy": PolicyCommand,
    "demo": DemoCommand,
    "reproduce": ReproduceCommand,
    "models": ModelsCommand,
    "convert": ConvertCommand,
    "typicality": TypicalityCommand,
    "export": ExportCommand,
    "serve": ServeCommand,
}


def command_spec(argv: Sequence[str]) -> Any:
    """The union of the verbs, for tyro; ``train --config FILE`` makes the file's options train's defaults."""
    train = prescan_config(argv[1:]) if argv[:1] == ["train"] else TrainCommand()
    subcommand = tyro.conf.subcommand
    variants = [Annotated[cls, subcommand(name, default=train) if cls is TrainCommand else subcommand(name)]
                for name, cls in VERBS.items()]  # fmt: skip
    return Union[tuple(variants)]  # noqa: UP007 (a union built at run time)
