"""The interface of every anytime model, and the base of every model family's configuration.

An *anytime model* produces a prediction at each of its E exits, in order: for a cascade an exit is a time
step, for a multi-exit network (SDN, MSDNet) an internal classifier. Training, evaluation, the metrics and the
plots use only what :class:`AnytimeModel` lists, so any model that has it works with all of them:

- ``model(x)`` returns the logits of every exit, ``(E, B, num_classes)``;
- ``model.first_informative_exit``: the first exit whose output can depend on the input (the threshold policy
  never stops before it, and the losses skip the exits before it);
- ``model.exit_costs(input_size)``: per exit, what producing it costs (:class:`ExitCosts`);
- ``model.config``: the :class:`ModelConfig` it was built from (what saving and loading need).

Optional: ``model.feedforward(x)`` -> ``(B, num_classes)``, the model's final prediction computed without the
anytime machinery (a cascade's ordinary ResNet). When present, the ``final`` loss trains it and evaluation
reports its accuracy; when absent, ``final`` trains the last exit and that accuracy is reported as null.

A model family is a :class:`ModelConfig` subclass (a frozen dataclass holding every architectural option, validated
in ``__post_init__``) whose ``build()`` returns the model. Registering the family (``cascadenet.register_family``)
lets checkpoints and run directories rebuild it by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

from torch import Tensor, nn

__all__ = ["AnytimeModel", "ExitCosts", "ModelConfig", "CONFIG_FORMAT", "positive_int", "choice"]

# Version of the stored model configuration (checkpoints, weights metadata, config.json). 1: the flat
# ``create_model`` arguments of the first release (no version key); 2: ``{"format", "family", **fields}``.
CONFIG_FORMAT = 2


class ExitCosts(NamedTuple):
    """What producing each exit costs, per example.

    Attributes:
        macs: cumulative multiply-accumulates that serial hardware spends to produce exits 0..e (work shared
            between exits is counted once; work that does not depend on the input is a constant, not counted).
        latency: latency in block units on parallel hardware, where every block runs at once (a cascade:
            one block per step).
    """

    macs: list[int]
    latency: list[float]


@runtime_checkable
class AnytimeModel(Protocol):
    """What train, evaluate, the metrics and the plots rely on (see the module docstring)."""

    config: ModelConfig
    first_informative_exit: int

    def __call__(self, x: Tensor) -> Tensor: ...

    def exit_costs(self, input_size: tuple[int, int, int]) -> ExitCosts: ...


def positive_int(option: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer >= 1 (a bool is not an integer here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option} must be a positive integer, got {value!r}")


def choice(option: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming the valid choices unless ``value`` is one of them."""
    if value not in choices:
        raise ValueError(f"unknown {option} {value!r}; valid choices: {', '.join(choices)}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Base of the model families' configurations: the options every classifier has.

    Subclasses are frozen dataclasses that set ``family`` (the name stored with saved models), add their own
    options with documentation, validate them in ``__post_init__`` (calling ``super().__post_init__()``) and
    implement ``build``.
    """

    family: ClassVar[str] = ""

    num_classes: int = 10
    """Classifier outputs (training sets it from the dataset)."""
    in_channels: int = 3
    """Input image channels (training sets it from the dataset)."""

    def __post_init__(self) -> None:
        positive_int("num_classes", self.num_classes)
        positive_int("in_channels", self.in_channels)

    def build(self) -> nn.Module:
        """The model this configuration describes, freshly initialised."""
        raise NotImplementedError(f"{type(self).__name__} does not implement build()")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that ``cascadenet.registry.config_from_dict`` turns back into this configuration."""
        return {"format": CONFIG_FORMAT, "family": self.family, **dataclasses.asdict(self)}
