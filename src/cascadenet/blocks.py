"""Building blocks of cascaded ResNets: conv-norm units, stems and residual blocks.

Every part that holds a batch norm is a *branch*: a short sequence of ``ConvNorm`` units (conv, temporal
batch norm, optional ReLU), optionally followed by a max-pool. A residual block is a residual branch plus a
shortcut (identity, or a projection branch: 1x1 conv + BN as in the standard ResNet). Describing all of
them the same way lets the step loop and the trajectory engine run them with one code path each.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from .norm import TemporalBatchNorm2d

__all__ = ["ConvNorm", "Branch", "BasicBlock", "Bottleneck", "make_stem", "STEMS"]

NormFactory = Callable[[int], TemporalBatchNorm2d]

STEMS = ("cifar", "cifar_pool", "imagenet")


class ConvNorm(nn.Module):
    """conv (no bias) -> temporal batch norm -> optional ReLU."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int, norm: NormFactory, relu: bool, padding: int | None = None
    ) -> None:
        super().__init__()
        pad = kernel // 2 if padding is None else padding
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=pad, bias=False)
        self.bn = norm(cout)
        self.relu = relu

    def forward(self, x: Tensor, t: int | None) -> Tensor:
        y = self.bn(self.conv(x), t)
        return F.relu(y) if self.relu else y

    def macs(self, out_hw: tuple[int, int]) -> int:
        """Multiply-accumulates for one sample, given the output spatial size."""
        c = self.conv
        k = c.kernel_size[0] * c.kernel_size[1] * (c.in_channels // c.groups)
        return c.out_channels * out_hw[0] * out_hw[1] * k


class Branch(nn.Module):
    """A sequence of ConvNorm units with an optional trailing 3x3/2 max-pool (the ImageNet stem)."""

    def __init__(self, units: list[ConvNorm], pool: bool = False) -> None:
        super().__init__()
        self.units = nn.ModuleList(units)
        self.pool = pool

    def forward(self, x: Tensor, t: int | None) -> Tensor:
        for unit in self.units:
            x = unit(x, t)
        return self.maxpool(x) if self.pool else x

    @staticmethod
    def maxpool(x: Tensor) -> Tensor:
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)

    def norms(self) -> list[TemporalBatchNorm2d]:
        return [u.bn for u in self.units]


def make_stem(kind: str, in_channels: int, width: int, norm: NormFactory) -> Branch:
    """``cifar``: 3x3 stride-1 conv. ``cifar_pool``: the same plus the 3x3/2 max-pool (what the published
    CIFAR code does; 4x cheaper). ``imagenet``: 7x7 stride-2 conv plus the 3x3/2 max-pool."""
    if kind == "cifar":
        return Branch([ConvNorm(in_channels, width, 3, 1, norm, relu=True)])
    if kind == "cifar_pool":
        return Branch([ConvNorm(in_channels, width, 3, 1, norm, relu=True)], pool=True)
    if kind == "imagenet":
        return Branch([ConvNorm(in_channels, width, 7, 2, norm, relu=True)], pool=True)
    raise ValueError(f"unknown stem {kind!r}; valid choices: {', '.join(STEMS)}")


class _Block(nn.Module):
    """A residual block: ``relu(shortcut(x) + delayed residual(x))``; the delay lives in the cascade."""

    expansion = 1
    residual: Branch
    shortcut: Branch | None  # None = identity

    def _make_shortcut(self, cin: int, cout: int, stride: int, norm: NormFactory) -> Branch | None:
        if stride == 1 and cin == cout:
            return None
        return Branch([ConvNorm(cin, cout, 1, stride, norm, relu=False, padding=0)])


class BasicBlock(_Block):
    """Two 3x3 convs (ResNet-18/34)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, norm: NormFactory) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.residual = Branch(
            [ConvNorm(cin, planes, 3, stride, norm, relu=True), ConvNorm(planes, cout, 3, 1, norm, relu=False)]
        )
        self.shortcut = self._make_shortcut(cin, cout, stride, norm)


class Bottleneck(_Block):
    """1x1 reduce, 3x3 (carrying the stride, as in torchvision), 1x1 expand by 4 (ResNet-50)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, norm: NormFactory) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.residual = Branch(
            [
                ConvNorm(cin, planes, 1, 1, norm, relu=True, padding=0),
                ConvNorm(planes, planes, 3, stride, norm, relu=True),
                ConvNorm(planes, cout, 1, 1, norm, relu=False, padding=0),
            ]
        )
        self.shortcut = self._make_shortcut(cin, cout, stride, norm)
