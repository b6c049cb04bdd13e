"""Where the stem, the residual blocks and the head of a user's residual network are: the layouts that
``cascadenet.cascade`` reads (``cascadenet.models.network``).

A layout is ``(stem, [(branch, shortcut), ...], head)``: the stem maps the image to the first block's input; block
k computes ``relu(shortcut(y) + branch(y))`` (``shortcut`` None: the identity); the head maps the last block's
output ``(B, C, H, W)`` to the logits. Recognised:

- **torchvision's ResNet** and everything built on it (ResNet-18 ... 152, ResNeXt, Wide-ResNet): ``conv1``, ``bn1``,
  ``relu``, ``maxpool``, ``layer1`` ... ``layer4`` of ``BasicBlock`` (``conv1 bn1 relu conv2 bn2``) or
  ``Bottleneck`` (``conv1 bn1 relu conv2 bn2 relu conv3 bn3``; grouped and widened convolutions are ordinary
  convolutions here) with ``downsample``, then ``avgpool`` and ``fc``; matched by those names, so a hand-made
  network with the same names and blocks is read the same way;
- **timm's ResNet** family (``timm.models.resnet.ResNet``: ResNet, ResNeXt, Wide-ResNet, SE-ResNet/ResNeXt, the
  ``c``/``d``/``s``/``t`` variants), matched by its names: ``conv1`` (a 7x7 convolution, or the deep stem's sequence
  of 3x3 convolutions), ``bn1``, ``act1``, ``maxpool`` (a pool, or the convolution that replaces it), ``layer1`` ...
  ``layer4`` of its ``BasicBlock`` (``conv1 bn1 drop_block act1 aa conv2 bn2 se drop_path``, then ``act2`` after
  the sum) or ``Bottleneck`` (``conv1 bn1 act1 conv2 bn2 drop_block act2 aa conv3 bn3 se drop_path``, then
  ``act3``) with ``downsample`` (a convolution, or average pooling and a convolution with ``avg_down``), then
  ``global_pool``, dropout at ``drop_rate`` and ``fc``. The activation after each sum must be ``nn.ReLU`` (the
  cascade adds with ReLU);
- **the protocol**: any module with a method ``cascade_layout()`` returning the layout itself, whose parts are
  ordinary modules (any ``nn.BatchNorm2d`` in them becomes a temporal batch norm).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

__all__ = ["Layout", "PoolLinear", "layout_of"]


class Layout(NamedTuple):
    stem: nn.Module
    blocks: list[tuple[nn.Module, nn.Module | None]]
    head: nn.Module


class PoolLinear(nn.Module):
    """Global average pooling, then a linear classifier: torchvision's ``avgpool``, flatten and ``fc``."""

    def __init__(self, fc: nn.Linear) -> None:
        super().__init__()
        self.fc = fc

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.mean(dim=(-2, -1)))


# The residual blocks' children in the order their forward applies them to the residual, and the activation that
# follows the sum, for each block of the ResNet layouts: torchvision's (one ``relu`` module, used after every
# normalisation and after the sum) and timm's (``act1``, ``act2``, ``act3``, and optional parts that timm leaves
# ``None`` or ``nn.Identity`` when not asked for: ``drop_block``, ``aa`` (anti-aliasing), ``se`` (attention),
# ``drop_path``). Any other child is computation the layout would drop: the block is refused.
_BLOCKS = {
    "torchvision BasicBlock": (("conv1", "bn1", "relu", "conv2", "bn2"), "relu"),
    "torchvision Bottleneck": (("conv1", "bn1", "relu", "conv2", "bn2", "relu", "conv3", "bn3"), "relu"),
    "timm BasicBlock": (("conv1", "bn1", "drop_block", "act1", "aa", "conv2", "bn2", "se", "drop_path"), "act2"),
    "timm Bottleneck": (
        ("conv1", "bn1", "act1", "conv2", "bn2", "drop_block", "act2", "aa", "conv3", "bn3", "se", "drop_path"),
        "act3",
    ),
}
_OPTIONAL = ("drop_block", "aa", "se", "drop_path")
_STAGES = ("layer1", "layer2", "layer3", "layer4")


def layout_of(module: nn.Module) -> Layout:
    """The layout of ``module`` (see the module docstring).

    Raises:
        ValueError: the module has neither a recognised layout nor ``cascade_layout()``, or a block holds
            modules the layout would leave out (the message names them).
    """
    if callable(getattr(module, "cascade_layout", None)):
        return _protocol(module)
    if all(hasattr(module, n) for n in ("conv1", "bn1", "fc", *_STAGES)):
        return _resnet(module)
    raise ValueError(
        f"cannot cascade a {type(module).__name__}: it is not a torchvision- or timm-layout ResNet (conv1, bn1, "
        "layer1..4, fc) and has no cascade_layout() method returning (stem, [(branch, shortcut), ...], head)"
    )


def _protocol(module: nn.Module) -> Layout:
    layout = module.cascade_layout()
    try:
        stem, blocks, head = layout
        blocks = [tuple(b) for b in blocks]
    except (TypeError, ValueError):
        raise ValueError(
            f"{type(module).__name__}.cascade_layout() must return (stem, [(branch, shortcut), ...], head)"
        ) from None
    for what, part in [("stem", stem), ("head", head)] + [
        (f"block {k} {name}", p) for k, b in enumerate(blocks) for name, p in zip(("branch", "shortcut"), b)
    ]:
        if part is None and "shortcut" in what:
            continue
        if not isinstance(part, nn.Module):
            raise ValueError(f"{type(module).__name__}.cascade_layout(): the {what} is a {type(part).__name__}, "
                             "not an nn.Module")  # fmt: skip
    if not blocks or any(len(b) != 2 for b in blocks):
        raise ValueError(f"{type(module).__name__}.cascade_layout(): the blocks must be a non-empty list of "
                         "(branch, shortcut) pairs")  # fmt: skip
    return Layout(stem, [(b[0], b[1]) for b in blocks], head)


def _block_kind(block: nn.Module) -> str:
    """Which of ``_BLOCKS`` a residual block is, by its children's names."""
    timm = "act1" in block._modules and "relu" not in block._modules
    bottleneck = "conv3" in block._modules
    return f"{'timm' if timm else 'torchvision'} {'Bottleneck' if bottleneck else 'BasicBlock'}"


def _resnet_block(block: nn.Module, where: str) -> tuple[nn.Module, nn.Module | None]:
    kind = _block_kind(block)
    order, final = _BLOCKS[kind]
    known = {*order, final, "downsample"}
    extra = [n for n, _ in block.named_children() if n not in known]
    missing = [n for n in (*order, final) if n not in _OPTIONAL and not isinstance(getattr(block, n, None), nn.Module)]
    if extra or missing:
        found = (" (it also has " + ", ".join(extra) + ")") if extra else (" (it lacks " + ", ".join(missing) + ")")
        raise ValueError(f"block {where} ({type(block).__name__}) is not {kind}{found}: describe the network with a "
                         "cascade_layout() method")  # fmt: skip
    act = getattr(block, final)
    if type(act) is not nn.ReLU:
        raise ValueError(f"block {where} ({type(block).__name__}) ends in {type(act).__name__}, not ReLU: a "
                         "cascade adds each residual with ReLU: describe it with cascade_layout()")  # fmt: skip
    parts = [getattr(block, n) for n in order if isinstance(getattr(block, n, None), nn.Module)]
    parts = [p for p in parts if not isinstance(p, nn.Identity)]
    return nn.Sequential(*parts), getattr(block, "downsample", None)


def _resnet(net: nn.Module) -> Layout:
    """torchvision's ResNet (``relu``, ``avgpool``) or timm's (``act1``, ``global_pool``, ``drop_rate``; deep
    stems: ``conv1`` a sequence of convolutions; ``maxpool`` a convolution when the stem pool is replaced)."""
    act = getattr(net, "act1", None) if "relu" not in net._modules else net.relu
    stem = [net.conv1, net.bn1, act if isinstance(act, nn.Module) else nn.ReLU()]
    if isinstance(getattr(net, "maxpool", None), nn.Module):
        stem.append(net.maxpool)
    blocks = [_resnet_block(block, f"{stage}.{i}") for stage in _STAGES for i, block in enumerate(getattr(net, stage))]
    if not isinstance(net.fc, nn.Linear):
        raise ValueError(f"the classifier fc is a {type(net.fc).__name__}, not an nn.Linear: describe the network "
                         "with a cascade_layout() method")  # fmt: skip
    pool = getattr(net, "global_pool", None)
    if not isinstance(pool, nn.Module):  # torchvision: avgpool, flatten, fc
        return Layout(nn.Sequential(*stem), blocks, PoolLinear(net.fc))
    drop = float(getattr(net, "drop_rate", 0.0) or 0.0)  # timm: global_pool, dropout (functional), fc
    return Layout(nn.Sequential(*stem), blocks, nn.Sequential(pool, *([nn.Dropout(drop)] if drop else []), net.fc))
