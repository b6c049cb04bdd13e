"""Model registry: build cascaded ResNets by name, with every option checked up front."""

from __future__ import annotations

import fnmatch
from typing import Any

from .blocks import STEMS, BasicBlock, Bottleneck
from .cascade import DELAYS, SCHEMES, CascadedResNet

__all__ = ["create_model", "list_models", "register_model", "model_config"]

_MODELS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, ...]]] = {}


def register_model(name: str, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, ...]) -> None:
    """Add an architecture: residual block type and blocks per stage."""
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = (block, tuple(layers))


register_model("resnet10", BasicBlock, (1, 1, 1, 1))
register_model("resnet18", BasicBlock, (2, 2, 2, 2))
register_model("resnet34", BasicBlock, (3, 4, 6, 3))
register_model("resnet50", Bottleneck, (3, 4, 6, 3))


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, optionally filtered by a glob pattern such as ``"resnet1*"``."""
    names = sorted(_MODELS)
    return names if pattern is None else [n for n in names if fnmatch.fnmatch(n, pattern)]


def _choice(option: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {option} {value!r}; valid choices: {', '.join(choices)}")


def _positive_int(option: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option} must be a positive integer, got {value!r}")


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    width: int = 64,
    stem: str = "cifar",
    scheme: str = "parallel",
    delay: str = "osd",
    alpha: float = 0.0,
    stem_delay: bool = True,
    temporal_bn: bool = True,
    temporal_affine: bool = False,
    multi_head: bool = False,
    num_steps: int | None = None,
) -> CascadedResNet:
    """Build a cascaded ResNet.

    Args:
        name: one of ``list_models()``.
        num_classes: classifier outputs.
        in_channels: input image channels.
        width: channels of the first stage (64 = the standard network); stages use 1x, 2x, 4x, 8x.
        stem: ``"cifar"`` (3x3 stride 1), ``"cifar_pool"`` (plus a 3x3/2 max-pool) or ``"imagenet"``
            (7x7 stride 2 plus max-pool).
        scheme: default execution scheme, ``"parallel"`` or ``"serial"`` (any weights run in either).
        delay: delay kernel of the residual branches, ``"osd"`` (one-step delay) or ``"ews"`` (exponential
            smoothing with factor ``alpha``).
        alpha: smoothing factor of EWS, in [0, 1); 0 is the plain ResNet. Must be 0 for OSD.
        stem_delay: delay the stem output by one step, as the published code does.
        temporal_bn: one set of batch-norm running statistics per step.
        temporal_affine: one batch-norm scale/shift per step as well (requires ``temporal_bn``).
        multi_head: one classifier per step instead of one shared classifier.
        num_steps: steps of a trajectory; default the settling time (blocks + 2 with the stem delayed).

    Raises:
        ValueError: unknown name, bad option value or impossible combination (the message lists valid choices).
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(list_models())}")
    _positive_int("num_classes", num_classes)
    _positive_int("in_channels", in_channels)
    _positive_int("width", width)
    _choice("stem", stem, STEMS)
    _choice("scheme", scheme, SCHEMES)
    _choice("delay", delay, DELAYS)
    if num_steps is not None:
        _positive_int("num_steps", num_steps)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be a number in [0, 1), got {alpha!r}")
    if delay == "osd" and alpha != 0.0:
        raise ValueError("alpha is the EWS smoothing factor; with delay='osd' it must be 0 (or use delay='ews')")
    if temporal_affine and not temporal_bn:
        raise ValueError(
            "temporal_affine=True needs temporal_bn=True (per-step scale/shift go with per-step statistics)"
        )
    config = {"name": name, "num_classes": num_classes, "in_channels": in_channels, "width": width, "stem": stem,
              "scheme": scheme, "delay": delay, "alpha": float(alpha), "stem_delay": stem_delay,
              "temporal_bn": temporal_bn, "temporal_affine": temporal_affine, "multi_head": multi_head}  # fmt: skip
    block, layers = _MODELS[name]
    model = CascadedResNet(
        block=block, layers=layers, num_steps=num_steps, **{k: v for k, v in config.items() if k != "name"}
    )
    # the arguments that rebuild this model, stored with every checkpoint and weights file
    model.config = {**config, "num_steps": model.num_steps}
    return model


def model_config(model: CascadedResNet) -> dict[str, Any]:
    """The ``create_model`` arguments of a model built by ``create_model``."""
    return dict(model.config)
