"""Model registry: named models (a configuration class plus preset options) and the families that saved
configurations are rebuilt from."""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from typing import Any

from torch import nn

from .anytime import CONFIG_FORMAT, ModelConfig
from .blocks import BasicBlock, Bottleneck
from .cascade import ARCHITECTURES, CascadeConfig

__all__ = [
    "create_model",
    "list_models",
    "register_model",
    "register_architecture",
    "register_family",
    "config_from_dict",
    "model_entry",
    "model_name",
    "registered_families",
]

_FAMILIES: dict[str, type[ModelConfig]] = {}
_MODELS: dict[str, tuple[type[ModelConfig], dict[str, Any]]] = {}


def register_family(config_cls: type[ModelConfig]) -> None:
    """Make a model family known by its ``family`` name, so that saved configurations of it can be rebuilt."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, ModelConfig)) or not config_cls.family:
        raise ValueError(f"{config_cls!r} is not a ModelConfig subclass with a family name")
    known = _FAMILIES.setdefault(config_cls.family, config_cls)
    if known is not config_cls:
        raise ValueError(f"model family {config_cls.family!r} is already registered by {known.__name__}")


def registered_families() -> list[type[ModelConfig]]:
    """The configuration classes of the registered model families, in registration order."""
    return list(_FAMILIES.values())


def register_model(name: str, config_cls: type[ModelConfig], **preset: Any) -> None:
    """Add a named model: ``create_model(name, **overrides)`` builds ``config_cls(**preset, **overrides)``."""
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    register_family(config_cls)
    _MODELS[name] = (config_cls, preset)


def register_architecture(name: str, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, ...]) -> None:
    """Add a cascaded ResNet architecture (residual block type and blocks per stage) under ``name``."""
    if name in _MODELS or name in ARCHITECTURES:
        raise ValueError(f"model {name!r} is already registered")
    ARCHITECTURES[name] = (block, tuple(layers))
    register_model(name, CascadeConfig, arch=name)


for _arch in list(ARCHITECTURES):
    register_model(_arch, CascadeConfig, arch=_arch)


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, optionally filtered by a glob pattern such as ``"resnet1*"``."""
    names = sorted(_MODELS)
    return names if pattern is None else [n for n in names if fnmatch.fnmatch(n, pattern)]


def model_entry(name: str) -> tuple[type[ModelConfig], dict[str, Any]]:
    """The configuration class and preset options of a registered model name; a family name (what
    ``model_name`` gives a configuration that no preset matches) stands for its class with no preset.

    Raises:
        ValueError: an unknown name (the message lists the registered models).
    """
    if name in _MODELS:
        config_cls, preset = _MODELS[name]
        return config_cls, dict(preset)
    if name in _FAMILIES:
        return _FAMILIES[name], {}
    raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(list_models())}")


def model_name(config: ModelConfig) -> str:
    """The registered name a configuration is an instance of: among the models of its class whose preset options
    it has, the one with the most preset options (the first registered on a tie), e.g. ``"resnet18"`` or
    ``"sdn-resnet18"``; the family name when no preset fits."""
    best, most = config.family, -1
    for name, (config_cls, preset) in _MODELS.items():
        fits = type(config) is config_cls and all(getattr(config, k, None) == v for k, v in preset.items())
        if fits and len(preset) > most:
            best, most = name, len(preset)
    return best


def create_model(name: str, *, pretrained: str | os.PathLike | None = None, **overrides: Any) -> nn.Module:
    """Build a registered model, e.g. ``create_model("resnet18", num_classes=10, width=16)``.

    ``pretrained``: start from the weights in this file (a cascadenet ``.safetensors`` model file, or a
    torchvision-layout ResNet ``.pth``), which decides the architecture; ``model.normalization`` is then the input
    normalisation the weights were trained with (``cascadenet.models.pretrained.load_pretrained``).

    The options are the fields of the model's configuration class (for cascaded ResNets,
    :class:`cascadenet.CascadeConfig`: ``num_classes``, ``in_channels``, ``width``, ``stem``, ``scheme``,
    ``delay``, ``alpha``, ``stem_delay``, ``temporal_bn``, ``temporal_affine``, ``multi_head``, ``num_steps``).

    Raises:
        ValueError: unknown name, bad option value or impossible combination (the message lists valid choices).
        TypeError: an option the model does not have.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(list_models())}")
    if pretrained is not None:
        from .pretrained import load_pretrained

        return load_pretrained(name, pretrained, **overrides)
    config_cls, preset = _MODELS[name]
    return config_cls(**{**preset, **overrides}).build()


def config_from_dict(raw: dict[str, Any]) -> ModelConfig:
    """Rebuild a model configuration stored by ``ModelConfig.to_dict`` (format 2), or the flat ``create_model``
    arguments that the first release stored (format 1, cascaded ResNets only).

    Raises:
        ValueError: not a configuration, a newer format, an unknown family, or options the family lacks.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"a model configuration is a dict, got {type(raw).__name__}")
    fields = dict(raw)
    version = fields.pop("format", 1)
    if version == 1:
        if "name" not in fields:
            raise ValueError("a stored model configuration of format 1 needs the model's 'name'")
        fields["arch"] = fields.pop("name")
        family = CascadeConfig.family
    elif version == CONFIG_FORMAT:
        family = fields.pop("family", None)
    else:
        raise ValueError(f"model configuration format {version!r} is not known to this version of cascadenet")
    if family not in _FAMILIES:
        known = ", ".join(sorted(_FAMILIES))
        raise ValueError(f"unknown model family {family!r} (known: {known}; a custom family must be registered)")
    config_cls = _FAMILIES[family]
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(fields) - names, key=str)
    if unknown:
        names = (k if isinstance(k, str) and k.isprintable() else repr(k) for k in unknown)
        raise ValueError(f"options unknown to the {family} family: {', '.join(names)}")
    return config_cls(**fields)
