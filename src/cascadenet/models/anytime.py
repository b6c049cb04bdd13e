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
import functools
import numbers
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple, Protocol, Union, runtime_checkable

from torch import Tensor, nn

__all__ = ["AnytimeModel", "ExitCosts", "ModelConfig", "CONFIG_FORMAT", "positive_int", "choice", "check_types"]

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


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _matches(value: Any, kind: Any) -> bool:
    origin = typing.get_origin(kind)
    if kind is Any:
        return True
    if kind is type(None):
        return value is None
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in typing.get_args(kind))
    if origin is Union or origin is types.UnionType:
        return any(_matches(value, a) for a in typing.get_args(kind))
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    return not isinstance(kind, type) or isinstance(value, kind)


def _kind_name(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(kind)))
    if origin is Union or origin is types.UnionType:
        return " or ".join(_kind_name(a) for a in typing.get_args(kind))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return names.get(kind, getattr(kind, "__name__", str(kind)))


def check_types(obj: Any, flags: bool = False) -> None:
    """Raise ``ValueError`` naming the first field of dataclass ``obj`` whose value does not have its annotated
    type (a JSON file can say ``"epochs": "2"`` or ``"augment": "false"``). Integers pass as floats, bools do not
    pass as numbers. With ``flags``, fields are named as command-line flags (``--image-size``)."""
    hints = _field_types(type(obj))
    for f in dataclasses.fields(obj):
        kind, value = hints.get(f.name, Any), getattr(obj, f.name)
        if not _matches(value, kind):
            name = "--" + f.name.replace("_", "-") if flags else f.name
            if typing.get_origin(kind) is Literal and isinstance(value, str):
                raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(typing.get_args(kind))}")
            raise ValueError(f"{name} must be {_kind_name(kind)}, got {value!r}")


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
        check_types(self)
        positive_int("num_classes", self.num_classes)
        positive_int("in_channels", self.in_channels)

    def build(self) -> nn.Module:
        """The model this configuration describes, freshly initialised."""
        raise NotImplementedError(f"{type(self).__name__} does not implement build()")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that ``cascadenet.models.registry.config_from_dict`` turns back into this configuration."""
        return {"format": CONFIG_FORMAT, "family": self.family, **dataclasses.asdict(self)}
