"""The model flags, made from the registered model families (``ModelFlags``), and ``given_options``: which
training options a command line types, whatever their value (what ``--resume`` compares and ``--config``
leaves to the file).

`--model` names any registered model (`cascadenet models`); the other model flags are the fields of every model
family registered when this module is imported (its ModelConfig subclass: type, default and docstring become the
flag), so a new family needs no code here. A field that several families have is one flag. Not flags: the
options the dataset sets (FROM_DATASET) and `arch`, which the --model name carries (resnet18, sdn-resnet18).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import tyro

from ..models.anytime import ModelConfig
from ..models.registry import model_entry, model_name, registered_families
from ..runs.config import FROM_DATASET, TrainConfig

__all__ = ["FLAGS", "ModelFlags", "field_doc", "flag_of", "given_options"]

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
                doc = field_doc(config_cls, f.name)
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


def field_doc(cls: type, name: str) -> str:
    """The docstring below a dataclass field (what tyro shows as its help), or "" where it cannot be read."""
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
        names = ", ".join(flag_of(n) for n in lacking)
        theirs = ", ".join(flag_of(n) for n in own) or "none"
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
        raise ValueError(re.sub(pattern, lambda m: flag_of(m.group(1)), str(e))) from None


def flag_of(name: str) -> str:
    """An option's flag: ``ic_after`` -> ``--ic-after``."""
    return "--" + name.replace("_", "-")


ModelFlags = _model_flags_class()


def _option_flags() -> dict[str, str]:
    """Every flag of ``cascadenet train`` that sets a training option -> the option's name in
    ``TrainConfig.options`` (``--model`` -> ``model``, ``--no-augment`` -> ``augment``)."""
    flags = {"--config": "config"}
    for name in [*TrainConfig().options(), *FLAGS]:
        flags[flag_of(name)] = name
        flags["--no-" + flag_of(name)[2:]] = name
    return flags


def given_options(argv: Sequence[str]) -> set[str]:
    """The training options that the command line sets (whatever their value: ``--epochs 30`` is given even
    though 30 is the default), found by their flags as ``cli.train.prescan_config`` finds ``--config``."""
    flags, given = _option_flags(), set()
    for arg in argv:
        if arg == "--":
            break
        if arg.startswith("--"):
            flag = arg.partition("=")[0].replace("_", "-")
            if flag in flags:
                given.add(flags[flag])
    return given
