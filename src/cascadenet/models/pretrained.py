"""Starting from pretrained ResNets: a torchvision-layout state dict as a cascaded ResNet.

torchvision names the parts of a ResNet ``conv1``, ``bn1`` (the stem), ``layer{1..4}.{i}.conv{j}`` /
``bn{j}`` (residual branches: j = 1, 2 for basic blocks, 1, 2, 3 for bottlenecks), ``layer{s}.{i}.downsample.0``
/ ``.1`` (projection shortcut: 1x1 conv, batch norm) and ``fc`` (classifier). A cascaded ResNet of the same depth
holds the same convolutions and classifier; its batch norms keep one set of running statistics (and, with
``temporal_affine``, of scale and shift) per step, and each is given the pretrained layer's values. Every
step then uses the pretrained network's normalisation, so the cascade settles on the pretrained network: the
last step of the trajectory (at the settling time) and ``feedforward`` equal its output.

The weights are read from a local file only (``torch.load(weights_only=True)``): nothing is downloaded, and
torchvision is not needed. ``cascadenet convert RESNET.pth -o MODEL.safetensors`` is the command-line form;
``cascadenet train --init MODEL.safetensors`` fine-tunes from the result (``read_init`` and ``load_init`` are
that option's two halves: which model the file holds, and loading its weights, the classifier replaced when the
class count differs).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from ..utils.files import check_writable, first_sentence
from .anytime import ModelConfig
from .blocks import BasicBlock, Bottleneck
from .cascade import ARCHITECTURES, CascadeConfig, CascadedResNet
from .checkpoint import CheckpointError, read_metadata, save_weights
from .registry import config_from_dict

__all__ = [
    "convert_state_dict",
    "convert_file",
    "load_torchvision_state_dict",
    "read_init",
    "load_init",
    "config_difference",
    "load_pretrained",
    "IMAGENET_NORMALIZATION",
]

log = logging.getLogger(__name__)

# Options that the weights decide (architecture, width, stem, classes, input channels); the rest are free.
DECIDED = ("arch", "width", "stem", "num_classes", "in_channels")

# The input normalisation torchvision's ImageNet weights were trained with, stored with converted weights (train
# --init uses it unless --normalize says otherwise).
IMAGENET_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}

_BLOCK_KEY = re.compile(r"^layer(\d+)\.(\d+)\.")


def load_torchvision_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a torchvision-layout ResNet state dict from a local ``.pth``/``.pt`` file (weights-only), or a
    ``.safetensors`` file. A checkpoint that wraps it (``{"state_dict": ...}``, ``{"model": ...}``) and the
    ``module.`` prefix of weights saved from DistributedDataParallel are accepted.

    Raises:
        CheckpointError: unreadable, not weights-only, or not a dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():  # not a pickle at all, or a broken one
            raise CheckpointError(f"{path}: not a readable weights file (truncated or corrupt?)") from None
        raise CheckpointError(
            f"{path}: holds objects other than tensors and plain data (a pickled model, not a state dict?); it was "
            "not loaded and nothing in it was run: save model.state_dict() instead"
        ) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    except Exception as e:  # torch and safetensors raise several types for truncated or foreign files
        raise CheckpointError(
            f"{path}: not a readable weights file (truncated or corrupt?): {first_sentence(e)}"
        ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict (a mapping of names to tensors)")
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _infer_architecture(state: Mapping[str, Tensor], source: str) -> tuple[str, type, tuple[int, ...]]:
    """The registered architecture whose block type and blocks per stage match the state dict's keys."""
    blocks: dict[int, set[int]] = {}
    for key in state:
        m = _BLOCK_KEY.match(key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if "conv1.weight" not in state or not blocks:
        raise CheckpointError(
            f"{source}: not a torchvision-layout ResNet (expected conv1, bn1, layer1.0.conv1, ..., fc; found "
            f"{', '.join(list(state)[:4]) or 'no keys'}{', ...' if len(state) > 4 else ''})"
        )
    stages = sorted(blocks)
    if stages != list(range(1, len(stages) + 1)) or any(blocks[s] != set(range(len(blocks[s]))) for s in stages):
        raise CheckpointError(f"{source}: the layer{{s}}.{{i}} keys are not numbered consecutively from layer1.0")
    layers = tuple(len(blocks[s]) for s in stages)
    block = Bottleneck if "layer1.0.conv3.weight" in state else BasicBlock
    for name, (known_block, known_layers) in ARCHITECTURES.items():
        if known_block is block and tuple(known_layers) == layers:
            return name, block, layers
    kind = "bottleneck" if block is Bottleneck else "basic"
    known = ", ".join(f"{n} {'-'.join(map(str, ls))}" for n, (_, ls) in ARCHITECTURES.items())
    raise CheckpointError(
        f"{source}: a ResNet of {kind} blocks {'-'.join(map(str, layers))} per stage matches no known architecture "
        f"({known}; cascadenet.register_architecture adds one; any torchvision ResNet, ResNeXt or Wide-ResNet "
        "module becomes a cascade from Python with cascadenet.cascade(network))"
    )


def _mapping(model: CascadedResNet, layers: tuple[int, ...]) -> dict[str, str]:
    """torchvision parameter prefix -> the cascade's module prefix, for every conv, batch norm and the classifier."""
    names = {"conv1": "stem.units.0.conv", "bn1": "stem.units.0.bn"}
    k = 0
    for s, n in enumerate(layers, start=1):
        for i in range(n):
            block = model.blocks[k]
            for j in range(len(block.residual.units)):
                names[f"layer{s}.{i}.conv{j + 1}"] = f"blocks.{k}.residual.units.{j}.conv"
                names[f"layer{s}.{i}.bn{j + 1}"] = f"blocks.{k}.residual.units.{j}.bn"
            if block.shortcut is not None:
                names[f"layer{s}.{i}.downsample.0"] = f"blocks.{k}.shortcut.units.0.conv"
                names[f"layer{s}.{i}.downsample.1"] = f"blocks.{k}.shortcut.units.0.bn"
            k += 1
    return names


def convert_state_dict(
    state: Mapping[str, Tensor], *, source: str = "the state dict", **options: Any
) -> CascadedResNet:
    """A cascaded ResNet holding the weights of a torchvision-layout ResNet state dict.

    The architecture (block type, blocks per stage), width, classes and input channels are read from the
    weights; the stem is torchvision's (7x7/2 conv and max-pool: ``stem="imagenet"``). Convolution and linear
    weights are copied; each batch norm's running statistics and scale/shift go to every step's slot (and
    the classifier to every head with ``multi_head``).

    Args:
        state: the state dict (``torchvision.models.resnet18().state_dict()`` or a file's content).
        source: how messages name it.
        **options: other options of :class:`~cascadenet.CascadeConfig` (``num_steps``, ``scheme``,
            ``stem_delay``, ``temporal_bn``, ``temporal_affine``, ``multi_head``...). ``delay="ews"`` with
            ``alpha > 0`` changes what the network computes, so the cascade then no longer settles on the
            pretrained network.

    Returns:
        the model, in evaluation mode.

    Raises:
        CheckpointError: not a torchvision-layout ResNet, an unknown architecture, missing, unexpected or
            misshapen weights.
        ValueError: a bad option, or one that the weights decide.
    """
    decided = sorted(set(options) & set(DECIDED))
    if decided:
        raise ValueError(f"{', '.join(decided)}: set by the weights being converted, not an option here")
    arch, _, layers = _infer_architecture(state, source)
    conv1 = state["conv1.weight"]
    if conv1.ndim != 4 or tuple(conv1.shape[2:]) != (7, 7):
        raise CheckpointError(f"{source}: conv1 is {tuple(conv1.shape)}, not the 7x7 stem of a torchvision ResNet")
    if "fc.weight" not in state:
        raise CheckpointError(f"{source}: no classifier (fc.weight)")
    config = CascadeConfig(arch=arch, width=conv1.shape[0], stem="imagenet", in_channels=conv1.shape[1],
                           num_classes=state["fc.weight"].shape[0], **options)  # fmt: skip
    model = config.build()
    target = model.state_dict()
    out, used = _converted_layers(state, target, _mapping(model, layers), source)
    heads, used_fc = _converted_classifier(state, target, len(model.heads), source)
    out.update(heads)
    used |= used_fc
    unexpected = sorted(set(state) - used)
    if unexpected:
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        raise CheckpointError(f"{source}: weights that a {arch} has no place for: {', '.join(unexpected[:3])}{more}")
    model.load_state_dict(out)
    return model.eval()


def _converted_layers(
    state: Mapping[str, Tensor], target: dict[str, Tensor], names: dict[str, str], source: str
) -> tuple[dict[str, Tensor], set[str]]:
    """The convolutions and batch norms of ``state`` under our names (``names``: torchvision's -> ours), each batch
    norm's vectors in every step's slot; with the keys of ``state`` they use."""
    out: dict[str, Tensor] = {}
    used = set()
    for tv, ours in names.items():
        kind = "bn" if ours.endswith(".bn") else "conv"
        fields = ("weight", "bias", "running_mean", "running_var") if kind == "bn" else ("weight",)
        for f in fields:
            key = f"{tv}.{f}"
            if key not in state:
                raise CheckpointError(f"{source}: missing {key}")
            value, want = state[key], target[f"{ours}.{f}"]
            if kind == "bn":  # one vector -> every slot
                if value.shape != want.shape[1:]:
                    raise CheckpointError(
                        f"{source}: {key} has shape {tuple(value.shape)}, expected {tuple(want.shape[1:])}"
                    )
                value = value.unsqueeze(0).expand_as(want)
            elif value.shape != want.shape:
                raise CheckpointError(f"{source}: {key} has shape {tuple(value.shape)}, expected {tuple(want.shape)}")
            out[f"{ours}.{f}"] = value.to(want.dtype).clone()
            used.add(key)
        used.add(f"{tv}.num_batches_tracked")
    return out, used


def _converted_classifier(
    state: Mapping[str, Tensor], target: dict[str, Tensor], num_heads: int, source: str
) -> tuple[dict[str, Tensor], set[str]]:
    """torchvision's classifier (``fc``) in every one of our heads; with the keys of ``state`` it uses."""
    out: dict[str, Tensor] = {}
    used = set()
    for f in ("weight", "bias"):
        key = f"fc.{f}"
        if key not in state:
            raise CheckpointError(f"{source}: missing {key}")
        for h in range(num_heads):
            want = target[f"heads.{h}.{f}"]
            if state[key].shape != want.shape:
                raise CheckpointError(
                    f"{source}: {key} has shape {tuple(state[key].shape)}, expected {tuple(want.shape)}"
                )
            out[f"heads.{h}.{f}"] = state[key].to(want.dtype).clone()
        used.add(key)
    return out, used


def convert_file(
    source: str | os.PathLike, output: str | os.PathLike, *, overwrite: bool = False, **options: Any
) -> CascadedResNet:
    """``convert_state_dict`` of a local file, saved as ``output`` (safetensors with the model configuration,
    what ``cascadenet train --init`` and ``load_model`` read). An existing ``output`` is never replaced unless
    ``overwrite``; nothing is written when the conversion fails.

    Raises:
        CheckpointError: as ``convert_state_dict``, or an unreadable source.
        FileExistsError: ``output`` exists and ``overwrite`` is false.
        ValueError: a bad option.
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists (nothing was written): choose another -o or pass --overwrite")
    if output.suffix != ".safetensors":
        raise ValueError(f"-o {output}: the converted model is written as safetensors: name it *.safetensors")
    if not output.parent.is_dir():
        raise ValueError(f"-o {output}: the folder {output.parent} does not exist")
    check_writable(output.parent, output.name)
    if options.get("num_steps") is not None and options.get("stem_delay", True) and options["num_steps"] < 2:
        # checked before reading the source: such a model's only output would ignore the input
        raise ValueError(
            f"--num-steps {options['num_steps']} leaves no step that sees the input (with the stem delayed, step 0 "
            "cannot): use --num-steps 2 or more, or --no-stem-delay"
        )
    model = convert_state_dict(load_torchvision_state_dict(source), source=str(source), **options)
    if model.first_informative_exit >= model.num_steps:
        raise ValueError(f"--num-steps {model.num_steps}: no exit of the converted model sees the input")
    extra = {"converted_from": Path(source).name, "normalization": IMAGENET_NORMALIZATION}  # what torchvision used
    save_weights(output, model, extra, overwrite=overwrite)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Starting a training from a model file (train --init)


def read_init(
    init: str, model: ModelConfig, num_classes: int, in_channels: int
) -> tuple[ModelConfig, tuple[dict[str, Tensor], ModelConfig]]:
    """The model and weights of ``train --init FILE`` (a model file written by cascadenet: a converted ResNet or
    a trained run), for a dataset of ``num_classes`` classes and ``in_channels`` channels. ``model`` (the
    training options' model) must be left at its default (the file decides the model) or describe the file's.

    Returns:
        the model configuration to train, and the file's weights with the configuration they were saved for
        (for ``load_init``).
    """
    path = Path(init)
    stored = _stored_config(path)
    if stored.in_channels != in_channels:
        raise CheckpointError(
            f"--init {path} takes {stored.in_channels}-channel images but the dataset has {in_channels} channel(s)"
        )
    dataset = {"num_classes": num_classes, "in_channels": in_channels}
    model_cfg = dataclasses.replace(stored, **dataset)
    differ = _contradicted(model, model_cfg, dataset)
    if differ:
        raise ValueError(
            f"--init {path} holds its own model, and the model options given differ from it ({differ}): leave the "
            "model options out"
        )
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"--init {path}: not a readable safetensors file: {first_sentence(e)}") from None
    if stored.num_classes != num_classes:
        log.warning(
            "%s was trained for %d classes and the dataset has %d: its classifier is replaced by a new one "
            "(initialised at random); every other weight comes from %s", path, stored.num_classes,
            num_classes, path.name,
        )  # fmt: skip
    return model_cfg, (state, stored)


def _stored_config(path: Path, what: str = "--init") -> ModelConfig:
    """The model configuration an --init file was saved with (a .safetensors file written by cascadenet)."""
    if not path.is_file():
        raise CheckpointError(f"{what} {path}: no such file")
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"{what} {path}: not a .safetensors model file (convert a torchvision ResNet with: cascadenet convert "
            f"{path} -o MODEL.safetensors)"
        )
    meta = read_metadata(path)
    if "model_config" not in meta:
        raise CheckpointError(f"{what} {path}: no model configuration in the metadata (not written by cascadenet?)")
    try:
        return config_from_dict(meta["model_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{what} {path}: unreadable model configuration: {e}") from None


def _contradicted(model: ModelConfig, model_cfg: ModelConfig, dataset: dict[str, int]) -> str:
    """The model options given (``model``) that the file's model (``model_cfg``) contradicts, in words; empty when
    they are left at their defaults or describe the file's model."""
    given = dataclasses.replace(model, **dataset)
    default = dataclasses.replace(type(model)(), **dataset)
    differ = ""
    if given != model_cfg and given != default:
        if type(given) is not type(model_cfg):
            differ = config_difference(given, model_cfg)
        else:  # the options set away from their defaults that the file contradicts (none: the file's model)
            fields = [f.name for f in dataclasses.fields(given) if f.name not in dataset]
            differ = "; ".join(
                f"{'model' if n == 'arch' else n} {getattr(given, n)} vs {getattr(model_cfg, n)} in the file"
                for n in fields
                if getattr(given, n) != getattr(model_cfg, n) and getattr(given, n) != getattr(default, n)
            )
    return differ


def load_init(model: nn.Module, initial: tuple[dict[str, Tensor], ModelConfig], path: str | None) -> None:
    """Load ``--init``'s weights; those whose shape changed with the class count (the classifier) stay as
    initialised. Anything else that does not fit is an error."""
    initial, stored = initial
    target = model.state_dict()
    changed = {k for k, v in initial.items() if k in target and target[k].shape != v.shape}
    if changed:
        with torch.random.fork_rng():  # the shapes of the file's model, without using the seeded stream
            reference = stored.build().state_dict()
        not_classifier = sorted(k for k in changed if reference[k].shape != initial[k].shape)
        if not_classifier:
            k = not_classifier[0]
            raise CheckpointError(
                f"--init {path}: {k} has shape {tuple(initial[k].shape)}, expected {tuple(target[k].shape)}"
            )
    kept = {k: v for k, v in initial.items() if k not in changed}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    missing = sorted(set(missing) - changed)
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise CheckpointError(f"--init {path}: the weights do not fit the model ({what})")


def config_difference(a: ModelConfig, b: ModelConfig) -> str:
    """The options in which two model configurations differ, as "name a vs b; ..." (``arch`` named ``model``)."""
    if type(a) is not type(b):
        return f"a {a.family} model vs a {b.family} model"
    pairs = [(f.name, getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)]
    diff = [(n, x, y) for n, x, y in pairs if x != y]
    return "; ".join(f"{'model' if n == 'arch' else n} {x} vs {y}" for n, x, y in diff)


# ----------------------------------------------------------------------------------------------------------------
# create_model(name, pretrained=PATH)


def load_pretrained(name: str, path: str | os.PathLike, **overrides: Any) -> nn.Module:
    """``create_model(name, pretrained=path, **overrides)``: the model ``name`` with the weights of ``path``.

    ``path`` is a cascadenet model file (``.safetensors``: ``cascadenet convert``'s, a run's ``model.safetensors``)
    or a torchvision-layout ResNet state dict (``.pth``/``.pt``, converted here). The file decides the
    architecture; ``overrides`` may set the options it does not decide (``num_steps``, ``scheme``, ...) and
    ``num_classes`` (another number of classes gets a new classifier, initialised at random). The normalisation
    the weights were trained with is ``model.normalization`` (``{"mean": [...], "std": [...]}``, ImageNet's for
    torchvision weights; None when the file stores none): normalise inputs with it.

    Raises:
        CheckpointError: an unreadable or foreign file, weights that do not fit.
        ValueError: the file holds another model than ``name``, or an option contradicts it.
    """
    from .registry import model_name

    source = Path(path)
    if source.suffix == ".safetensors":
        stored = _stored_config(source, "pretrained=")
        normalization = read_metadata(source).get("normalization")
        try:
            state = load_file(str(source))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"pretrained={source}: not a readable safetensors file: {first_sentence(e)}"
            ) from None
    else:
        if not source.is_file():
            raise CheckpointError(f"pretrained={source}: no such file")
        converted = convert_state_dict(load_torchvision_state_dict(source), source=str(source))
        stored, state, normalization = converted.config, converted.state_dict(), IMAGENET_NORMALIZATION
    found = model_name(stored)
    if found != name:
        raise ValueError(f"pretrained={source} holds a {found} model, not {name}")
    decided = [k for k in DECIDED if k != "num_classes" and k in overrides and overrides[k] != getattr(stored, k)]
    if decided:
        k = decided[0]
        raise ValueError(f"pretrained={source}: {k} {overrides[k]} vs {getattr(stored, k)} in the file (the weights "
                         "decide it: leave it out)")  # fmt: skip
    config = dataclasses.replace(stored, **overrides)
    model = config.build()
    load_init(model, (state, stored), f"pretrained={source}")
    model.normalization = normalization
    return model
