"""Building blocks of cascaded ResNets: conv-norm units, stems and residual blocks.

Every part that holds a batch norm is a *branch*: a short sequence of ``ConvNorm`` units (conv, temporal
batch norm, optional ReLU), optionally followed by a max-pool. A residual block is a residual branch plus a
shortcut (identity, or a projection branch: 1x1 conv + BN as in the standard ResNet). Describing all of
them the same way lets the step loop and the trajectory engine run them with one code path each:

- ``Branch.forward(x, t)``: one step, ``(B, C, H, W)`` (the step loop);
- ``Branch.forward_groups(x, steps)``: several distinct states at once, ``(B, G, C, H, W)``, group g
  normalised as at step ``steps[g]`` with its own statistics (the trajectory engine);
- ``Branch.macs(hw)``: the multiply-accumulates of one example, counted here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .norm import TemporalBatchNorm2d

__all__ = ["ConvNorm", "Branch", "BasicBlock", "Bottleneck", "make_stem", "ews_update", "STEMS"]

NormFactory = Callable[[int], TemporalBatchNorm2d]
Stats = tuple[Tensor, Tensor] | None  # per-group batch mean and unbiased variance (training), else None

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

    def forward_groups(self, x: Tensor, steps: Sequence[int], count: int | None) -> tuple[Tensor, Stats]:
        """``(B, G, C, H, W)`` in and out, time folded into the convolution's batch; see ``Branch.forward_groups``."""
        b, g = x.shape[:2]
        y = self.conv(x.flatten(0, 1))
        bn = self.bn
        y, stats = bn.forward_groups(
            y.view(b, g, *y.shape[1:]), [bn.stat_slot(t) for t in steps], [bn.affine_slot(t) for t in steps], count
        )
        return (F.relu(y) if self.relu else y), stats

    def macs(self, hw: tuple[int, int]) -> tuple[int, tuple[int, int]]:
        """Multiply-accumulates for one sample with input spatial size ``hw``, and the output spatial size."""
        c = self.conv
        out = tuple((n + 2 * p - k) // s + 1 for n, p, k, s in zip(hw, c.padding, c.kernel_size, c.stride))
        k = c.kernel_size[0] * c.kernel_size[1] * (c.in_channels // c.groups)
        return c.out_channels * out[0] * out[1] * k, out  # type: ignore[return-value]


class Branch(nn.Module):
    """A sequence of ConvNorm units with an optional trailing 3x3/2 max-pool (the ImageNet stem)."""

    def __init__(self, units: list[ConvNorm], pool: bool = False) -> None:
        super().__init__()
        self.units = nn.ModuleList(units)
        self.pool = pool

    def forward(self, x: Tensor, t: int | None) -> Tensor:
        """One step ``t`` (None: the settled feed-forward network), ``(B, C, H, W)``."""
        for unit in self.units:
            x = unit(x, t)
        return self.maxpool(x) if self.pool else x

    def forward_groups(self, x: Tensor, steps: Sequence[int], count: int | None = None) -> tuple[Tensor, list[Stats]]:
        """Several distinct states at once: ``x`` is ``(B, G, C, H, W)`` and group g is computed as at step
        ``steps[g]``, exactly as ``forward(x[:, g], steps[g])`` would (each group normalised with its own
        batch statistics in training, with its step's running statistics in evaluation).

        ``count`` marks input-independent states stored once (B == 1) that stand for ``count`` samples.

        Returns:
            the output ``(B, G, C', H', W')`` and, per unit, the groups' batch statistics ``(mean, var)``, each
            ``(G, C)`` (training), or None (evaluation). Running statistics are not touched: the caller folds
            them in with ``TemporalBatchNorm2d.update``, once per step and in step order.
        """
        stats = []
        for unit in self.units:
            x, s = unit.forward_groups(x, steps, count)
            stats.append(s)
        if self.pool:
            b, g = x.shape[:2]
            p = self.maxpool(x.flatten(0, 1))
            x = p.view(b, g, *p.shape[1:])
        return x, stats

    def macs(self, hw: tuple[int, int]) -> tuple[int, tuple[int, int]]:
        """Multiply-accumulates for one sample with input spatial size ``hw``, and the output spatial size."""
        total = 0
        for unit in self.units:
            m, hw = unit.macs(hw)
            total += m
        if self.pool:
            hw = tuple((n + 2 - 3) // 2 + 1 for n in hw)  # type: ignore[assignment]
        return total, hw

    def out_channels(self, hw: tuple[int, int]) -> int:
        """The channels of the output for an input of spatial size ``hw`` (``ModuleBranch`` has the same)."""
        return self.units[-1].conv.out_channels

    @staticmethod
    def maxpool(x: Tensor) -> Tensor:
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)

    def norms(self) -> list[TemporalBatchNorm2d]:
        return [u.bn for u in self.units]


def make_stages(
    block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, ...], width: int, norm: NormFactory
) -> tuple[nn.ModuleList, int]:
    """A ResNet's residual blocks after the stem (stage s has ``width * 2**s`` planes, and the first block of every
    later stage has stride 2), and the channels of the last block's output."""
    blocks: list[nn.Module] = []
    cin = width
    for stage, n in enumerate(layers):
        planes = width * 2**stage
        for i in range(n):
            blocks.append(block(cin, planes, 2 if stage > 0 and i == 0 else 1, norm))
            cin = planes * block.expansion
    return nn.ModuleList(blocks), cin


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


def ews_update(prev: Tensor | None, value: Tensor, alpha: float) -> Tensor:
    """One step of the exponential-smoothing delay kernel (EWS); the state starts from zero. Shared by the step
    loop and the trajectory engine so that both do the same floating-point operations."""
    if prev is None:
        return value if alpha == 0 else (1 - alpha) * value
    return alpha * prev + (1 - alpha) * value
