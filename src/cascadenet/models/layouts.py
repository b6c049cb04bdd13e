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


# the children of torchvision's residual blocks that the layout places; any other one is computation we would drop
_BASIC = ("conv1", "bn1", "relu", "conv2", "bn2", "downsample")
_BOTTLENECK = (*_BASIC, "conv3", "bn3")
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
        return _torchvision(module)
    raise ValueError(
        f"cannot cascade a {type(module).__name__}: it is not a torchvision-layout ResNet (conv1, bn1, layer1..4, fc) "
        "and has no cascade_layout() method returning (stem, [(branch, shortcut), ...], head)"
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


def _torchvision(net: nn.Module) -> Layout:
    relu = getattr(net, "relu", None) or nn.ReLU()
    stem = [net.conv1, net.bn1, relu]
    if isinstance(getattr(net, "maxpool", None), nn.Module):
        stem.append(net.maxpool)
    blocks: list[tuple[nn.Module, nn.Module | None]] = []
    for stage in _STAGES:
        for i, block in enumerate(getattr(net, stage)):
            where = f"{stage}.{i}"
            bottleneck = hasattr(block, "conv3")
            known = _BOTTLENECK if bottleneck else _BASIC
            extra = [n for n, _ in block.named_children() if n not in known]
            if extra or not all(hasattr(block, n) for n in known[:5]):
                raise ValueError(
                    f"block {where} ({type(block).__name__}) is not torchvision's BasicBlock or Bottleneck"
                    f"{' (it also has ' + ', '.join(extra) + ')' if extra else ''}: describe the network with a "
                    "cascade_layout() method"
                )
            act = getattr(block, "relu", None) or nn.ReLU()
            parts = [block.conv1, block.bn1, act, block.conv2, block.bn2]
            if bottleneck:
                parts += [act, block.conv3, block.bn3]
            blocks.append((nn.Sequential(*parts), getattr(block, "downsample", None)))
    if not isinstance(net.fc, nn.Linear):
        raise ValueError(f"the classifier fc is a {type(net.fc).__name__}, not an nn.Linear: describe the network "
                         "with a cascade_layout() method")  # fmt: skip
    return Layout(nn.Sequential(*stem), blocks, PoolLinear(net.fc))
