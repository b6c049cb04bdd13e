"""MSDNet, the multi-scale dense network of Huang et al. (ICLR 2018), in its CIFAR form: a baseline anytime model.

The network keeps feature maps at ``num_scales`` resolutions (32, 16, 8 px on CIFAR). A stem makes the first map
of each scale; every *layer* then adds ``growth * gr_factor[s]`` channels at each scale s, densely (the new
channels are concatenated to the layer's input). At the finest scale they come from a 3x3 conv of that scale;
at a coarser scale half come from a stride-2 3x3 conv of the next finer scale and half from a 3x3 conv of the
scale itself. With ``bottleneck`` a 1x1 conv to at most ``bn_factor[s]`` times the new channels comes first.
Layers are grouped into ``num_blocks`` blocks; after each block a classifier reads the coarsest map, so exit k
sees blocks 0..k. As depth grows the finest scales are dropped (``prune``) and 1x1 *transitions* shrink the
channels by ``reduction``. Every conv is conv (no bias) -> batch norm -> ReLU.

The layout follows the authors' PyTorch port (kalviny/MSDNet-PyTorch, ``models/msdnet.py``), whose ``args.py``
flags map one to one onto :class:`MSDNetConfig` (nBlocks -> num_blocks, stepmode -> step_mode, nChannels ->
channels, growthRate -> growth_rate, grFactor -> gr_factor, bnFactor -> bn_factor). Two generalisations, which
change nothing at the published settings: the input may have any number of channels and any size (the head
pools adaptively, so 28x28 Fashion-MNIST works), and ``width`` multiplies the channel counts so that the cost
can be matched to another model's.

Costs (``MSDNet.exit_costs``) are counted analytically from the layer shapes: a conv costs
``k*k*Cin*Cout*Hout*Wout / groups`` multiply-accumulates, a linear layer ``in*out``; batch norm, ReLU and pooling
are not counted (as for the cascaded ResNets). Exit k's count is cumulative over everything computed to produce
exits 0..k, the earlier classifiers included, as the reference's ``op_counter.py`` accumulates it. That counter
also charges one operation per ReLU input element, the pooling and the linear bias (about 1% more); the per-exit
counts quoted for the reference networks are conv and linear only, and these reproduce them (docs/baselines.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .anytime import ExitCosts, ModelConfig, choice, positive_int
from .registry import register_model

__all__ = ["MSDNetConfig", "MSDNet", "LayerSpec"]

STEP_MODES = ("even", "lin_grow")
PRUNES = ("max", "min")

HEAD_CHANNELS = 128  # the reference's classifier width (interChannels1/2), before ``width``


def _scaled(value: int, width: float) -> int:
    """``value * width`` rounded to the nearest integer (halves up), at least 1."""
    return max(1, math.floor(value * width + 0.5))


@dataclass(frozen=True)
class LayerSpec:
    """One dense layer of the layout: the scales it reads and writes and its channel counts.

    Channel counts are *base* counts: at scale s the tensor has ``base * gr_factor[s]`` channels.

    Attributes:
        in_scales: scales of the layer's input (the coarsest ``in_scales`` of ``num_scales``).
        out_scales: scales of its output; one fewer than ``in_scales`` where the finest scale is dropped.
        base_in: base channels of its input; the output has ``base_in + growth``.
        transition: base channels after the 1x1 transition that follows the layer, or None if none does.
    """

    in_scales: int
    out_scales: int
    base_in: int
    transition: int | None


@dataclass(frozen=True, kw_only=True)
class MSDNetConfig(ModelConfig):
    """Every architectural option of an MSDNet; ``MSDNet(config)`` builds it. The defaults are the anytime
    CIFAR network of the PyTorch port's README (7 blocks, even, step 2, base 4, 16 channels, growth 6).

    Raises ``ValueError`` on construction for a bad value, naming the option and the valid choices.
    """

    family = "msdnet"

    num_blocks: int = 7
    """Blocks, one classifier after each: the number of exits (reference: nBlocks)."""
    step_mode: Literal["even", "lin_grow"] = "even"
    """Layers per block after the first: even, ``step`` each; lin_grow, ``step * i + 1`` in block i (stepmode)."""
    step: int = 2
    """Layer count that step_mode grows blocks by (step)."""
    base: int = 4
    """Layers of the first block (base)."""
    num_scales: int = 3
    """Resolutions kept side by side, each half the previous one (nScales); gr_factor and bn_factor have one
    entry per scale."""
    channels: int = 16
    """Stem channels at the finest scale; scale s has channels * gr_factor[s] (nChannels; CIFAR uses 16)."""
    growth_rate: int = 6
    """Channels each layer adds at the finest scale; scale s gets growth_rate * gr_factor[s] (growthRate)."""
    gr_factor: tuple[int, ...] = (1, 2, 4)
    """Per scale, the multiplier of channels and growth (grFactor)."""
    bn_factor: tuple[int, ...] = (1, 2, 4)
    """Per scale, the bottleneck width as a multiple of the channels a conv adds (bnFactor)."""
    bottleneck: bool = True
    """A 1x1 conv to min(input, bn_factor[s] * new channels) before each 3x3 conv (bottleneck)."""
    prune: Literal["max", "min"] = "max"
    """Where the finest scale is dropped: max, at each of num_scales equal intervals of the layers (with a
    transition each time); min, only in the last layers (transitions at 1/3 and 2/3 of the depth)."""
    reduction: float = 0.5
    """Channel factor of the 1x1 transitions, in [0, 1]; 0 means no transitions (reduction)."""
    width: float = 1.0
    """Multiplier of channels, growth_rate and the classifiers' 128 channels (rounded), to match another
    model's cost; cost grows roughly as width squared. 1 is the published network."""
    stem: Literal["cifar", "cifar_pool"] = "cifar"
    """cifar: the published stem (3x3 conv at the input's resolution); cifar_pool: the same conv followed by a
    3x3/2 max-pool, so that every scale has half the side (4x cheaper), as the cascades' pooled stem: matches a
    small model's cost on small images without shrinking the published proportions."""

    def __post_init__(self) -> None:
        # a configuration read back from JSON holds lists where it was built with tuples
        for name in ("gr_factor", "bn_factor"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        super().__post_init__()
        for name in ("num_blocks", "step", "base", "num_scales", "channels", "growth_rate"):
            positive_int(name, getattr(self, name))
        choice("step_mode", self.step_mode, STEP_MODES)
        choice("stem", self.stem, ("cifar", "cifar_pool"))
        choice("prune", self.prune, PRUNES)
        for name in ("gr_factor", "bn_factor"):
            factors = getattr(self, name)
            if len(factors) != self.num_scales:
                raise ValueError(f"{name} needs one entry per scale (num_scales={self.num_scales}), got {factors!r}")
            for f in factors:
                positive_int(name + " entries", f)
        if not 0.0 <= self.reduction <= 1.0:
            raise ValueError(f"reduction must be a number in [0, 1] (0: no transitions), got {self.reduction!r}")
        if not (math.isfinite(self.width) and self.width > 0):
            raise ValueError(f"width must be a positive number, got {self.width!r}")
        object.__setattr__(self, "reduction", float(self.reduction))  # 1 and 1.0 are one configuration
        object.__setattr__(self, "width", float(self.width))
        self.layout()  # raises for a reduction that leaves a transition no channels

    # ---- derived layout -------------------------------------------------------------------------------------
    @property
    def block_layers(self) -> tuple[int, ...]:
        """Layers per block: ``base``, then ``step`` (even) or ``step * i + 1`` (lin_grow) for block i >= 1."""
        grow = (self.step if self.step_mode == "even" else self.step * i + 1 for i in range(1, self.num_blocks))
        return (self.base, *grow)

    @property
    def stem_channels(self) -> int:
        """Base channels of the stem output (``channels`` times ``width``)."""
        return _scaled(self.channels, self.width)

    @property
    def growth(self) -> int:
        """Base channels each layer adds (``growth_rate`` times ``width``)."""
        return _scaled(self.growth_rate, self.width)

    @property
    def head_channels(self) -> int:
        """Channels of the classifiers' two convs (128 times ``width``)."""
        return _scaled(HEAD_CHANNELS, self.width)

    def layout(self) -> list[list[LayerSpec]]:
        """Per block, its layers in order (the reference's ``_build_block`` rules for scales and transitions).

        Raises:
            ValueError: a transition would leave no channels (``reduction`` too small for these channels).
        """
        total = sum(self.block_layers)
        S = self.num_scales
        interval = math.ceil(total / S)
        base, index = self.stem_channels, 0
        blocks = []
        for count in self.block_layers:
            specs = []
            for _ in range(count):
                index += 1  # 1-based layer number, as in the reference
                if self.prune == "max":
                    # the finest scale goes at the start of each interval of ceil(total / S) layers
                    in_scales = S - max(0, index - 2) // interval
                    out_scales = S - (index - 1) // interval
                    shrink = in_scales > out_scales
                else:
                    # scales leave only where fewer layers remain than there are scales to reach the coarsest
                    in_scales = min(S, total - index + 2)
                    out_scales = min(S, total - index + 1)
                    shrink = index in (total // 3, 2 * total // 3)
                grown = base + self.growth
                transition = None
                if shrink and self.reduction > 0:
                    transition = math.floor(self.reduction * grown)
                    if transition < 1:
                        raise ValueError(
                            f"reduction {self.reduction} leaves no channels after the transition following layer "
                            f"{index} ({grown} channels); use a larger reduction, or 0 for no transitions"
                        )
                specs.append(LayerSpec(in_scales, out_scales, base, transition))
                base = grown if transition is None else transition
            blocks.append(specs)
        return blocks

    def build(self) -> MSDNet:
        return MSDNet(self)


# ---- modules ------------------------------------------------------------------------------------------------
class _ConvUnit(nn.Sequential):
    """conv (no bias) -> batch norm -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    def macs(self, hw: tuple[int, int]) -> tuple[int, tuple[int, int]]:
        """Multiply-accumulates for one example with input spatial size ``hw``, and the output spatial size."""
        c: nn.Conv2d = self[0]  # type: ignore[assignment]
        out = tuple((n + 2 * p - k) // s + 1 for n, p, k, s in zip(hw, c.padding, c.kernel_size, c.stride))
        per_pixel = c.kernel_size[0] * c.kernel_size[1] * (c.in_channels // c.groups) * c.out_channels
        return per_pixel * out[0] * out[1], out  # type: ignore[return-value]


def _chain_macs(units: Iterable[nn.Module], hw: tuple[int, int]) -> int:
    """MACs of conv units applied one after another from an ``hw`` map (each unit's ``macs`` gives its output size)."""
    total = 0
    for unit in units:
        m, hw = unit.macs(hw)
        total += m
    return total


class _DenseConv(nn.Sequential):
    """The conv that makes a layer's new channels at one scale: optional 1x1 bottleneck, then 3x3 (stride 1 for
    the same scale, 2 from the next finer one)."""

    def __init__(self, cin: int, cout: int, stride: int, bottleneck: bool, bn_factor: int) -> None:
        units = []
        if bottleneck:
            inner = min(cin, bn_factor * cout)
            units.append(_ConvUnit(cin, inner, 1, 1))
            cin = inner
        units.append(_ConvUnit(cin, cout, 3, stride))
        super().__init__(*units)

    def macs(self, hw: tuple[int, int]) -> int:
        return _chain_macs(self, hw)


class _ScaleUpdate(nn.Module):
    """One scale of a dense layer: ``cat(x_s, down(x_{s-1}), same(x_s))`` (``down`` absent at the finest scale
    the layer keeps when it drops none)."""

    def __init__(self, same: _DenseConv, down: _DenseConv | None) -> None:
        super().__init__()
        self.down = down
        self.same = same

    def forward(self, finer: Tensor | None, x: Tensor) -> Tensor:
        if self.down is None:
            return torch.cat([x, self.same(x)], dim=1)
        return torch.cat([x, self.down(finer), self.same(x)], dim=1)


class _DenseLayer(nn.Module):
    """A layer over all kept scales: a list of maps, finest first, in; the grown (maybe fewer) maps out."""

    def __init__(self, config: MSDNetConfig, spec: LayerSpec) -> None:
        super().__init__()
        S, gr, bn = config.num_scales, config.gr_factor, config.bn_factor
        self.in_scales, self.out_scales = spec.in_scales, spec.out_scales
        first = S - spec.out_scales  # absolute index of the finest output scale
        updates = []
        for s in range(first, S):
            new = config.growth * gr[s]
            c_in = spec.base_in * gr[s]
            if s == first and spec.in_scales == spec.out_scales:
                updates.append(_ScaleUpdate(_DenseConv(c_in, new, 1, config.bottleneck, bn[s]), None))
            else:
                # half the new channels from the finer scale; an odd count (possible with ``width``) gives the
                # same-scale conv the extra one (the reference, written for even counts, splits evenly)
                c_finer = spec.base_in * gr[s - 1]
                down = _DenseConv(c_finer, new // 2, 2, config.bottleneck, bn[s - 1])
                updates.append(_ScaleUpdate(_DenseConv(c_in, new - new // 2, 1, config.bottleneck, bn[s]), down))
        self.updates = nn.ModuleList(updates)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        # xs[i] is absolute scale (S - in_scales + i); output j is absolute scale (S - out_scales + j)
        drop = self.in_scales - self.out_scales
        return [u(xs[j + drop - 1] if j + drop > 0 else None, xs[j + drop]) for j, u in enumerate(self.updates)]

    def macs(self, hws: list[tuple[int, int]]) -> int:
        S = len(hws)
        total = 0
        for s, u in zip(range(S - self.out_scales, S), self.updates):
            total += u.same.macs(hws[s])
            if u.down is not None:
                total += u.down.macs(hws[s - 1])
        return total


class _Transition(nn.ModuleList):
    """1x1 conv units, one per kept scale, that shrink the channels by ``reduction``."""

    def __init__(self, config: MSDNetConfig, spec: LayerSpec) -> None:
        S, gr = config.num_scales, config.gr_factor
        grown = spec.base_in + config.growth
        assert spec.transition is not None
        super().__init__(_ConvUnit(grown * gr[s], spec.transition * gr[s], 1, 1) for s in range(S - spec.out_scales, S))

    def forward(self, xs: list[Tensor]) -> list[Tensor]:  # type: ignore[override]
        return [unit(x) for unit, x in zip(self, xs)]

    def macs(self, hws: list[tuple[int, int]]) -> int:
        return sum(unit.macs(hw)[0] for unit, hw in zip(self, hws[len(hws) - len(self) :]))


def _pooled(hw: tuple[int, int]) -> tuple[int, int]:
    """The side of a 3x3/2 max-pool's output (padding 1)."""
    return tuple((n + 2 - 3) // 2 + 1 for n in hw)  # type: ignore[return-value]


class _Stem(nn.ModuleList):
    """3x3 stride-1 conv to the finest scale (with ``pool``, then a 3x3/2 max-pool), then a stride-2 3x3 conv to
    each coarser one."""

    def __init__(self, config: MSDNetConfig) -> None:
        widths = [config.stem_channels * g for g in config.gr_factor]
        units = [_ConvUnit(config.in_channels, widths[0], 3, 1)]
        units += [_ConvUnit(widths[s - 1], widths[s], 3, 2) for s in range(1, config.num_scales)]
        super().__init__(units)
        self.pool = config.stem == "cifar_pool"

    def forward(self, x: Tensor) -> list[Tensor]:  # type: ignore[override]
        maps = []
        for i, unit in enumerate(self):
            x = unit(x)
            if i == 0 and self.pool:
                x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
            maps.append(x)
        return maps

    def macs(self, hw: tuple[int, int]) -> int:
        """MACs for one example whose input has spatial size ``hw``."""
        first, hw = self[0].macs(hw)
        return first + _chain_macs(list(self)[1:], _pooled(hw) if self.pool else hw)


class _Head(nn.Module):
    """The classifier on the coarsest map: two stride-2 3x3 conv units, average pool to 1x1, linear."""

    def __init__(self, cin: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(_ConvUnit(cin, hidden, 3, 2), _ConvUnit(hidden, hidden, 3, 2))
        self.linear = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        # adaptive, so that any map size works (the reference's 2x2 average pool assumes 32 px inputs)
        return self.linear(F.adaptive_avg_pool2d(self.convs(x), 1).flatten(1))

    def macs(self, hw: tuple[int, int]) -> int:
        total = 0
        for unit in self.convs:
            m, hw = unit.macs(hw)
            total += m
        return total + self.linear.in_features * self.linear.out_features


class MSDNet(nn.Module):
    """Multi-scale dense network: ``MSDNet(MSDNetConfig(...))`` or ``cascadenet.create_model("msdnet-cifar")``.
    An anytime model (``cascadenet.models.anytime``) whose exits are its ``num_blocks`` classifiers; all of them see the
    input, so ``first_informative_exit`` is 0 and the ``ce`` loss is the reference's training loss, the unweighted
    sum of the exits' cross-entropies."""

    first_informative_exit = 0

    def __init__(self, config: MSDNetConfig) -> None:
        super().__init__()
        self.config = config
        self.stem = _Stem(config)
        blocks, heads = [], []
        coarsest = config.gr_factor[-1]
        for specs in config.layout():
            layers: list[nn.Module] = []
            for spec in specs:
                layers.append(_DenseLayer(config, spec))
                if spec.transition is not None:
                    layers.append(_Transition(config, spec))
            blocks.append(nn.ModuleList(layers))
            last = specs[-1]
            base_out = last.base_in + config.growth if last.transition is None else last.transition
            heads.append(_Head(base_out * coarsest, config.head_channels, config.num_classes))
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(heads)
        self._init_weights()

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    def _init_weights(self) -> None:
        # as the reference: conv N(0, sqrt(2 / (k*k*Cout))), batch norm 1 and 0, linear bias 0 (weight: default)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """The logits of every exit, ``(num_blocks, B, num_classes)``."""
        if not isinstance(x, Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected an input of shape (B, C, H, W), got {shape}")
        if x.shape[1] != self.config.in_channels:
            raise ValueError(f"the model takes {self.config.in_channels} input channels, the input has {x.shape[1]}")
        xs = self.stem(x)  # finest first
        out = []
        for block, head in zip(self.blocks, self.heads):
            for layer in block:
                xs = layer(xs)
            out.append(head(xs[-1]))
        return torch.stack(out)  # (E, B, C)

    def scale_sizes(self, hw: tuple[int, int]) -> list[tuple[int, int]]:
        """Spatial size of each scale's maps for an input of spatial size ``hw``, finest first."""
        sizes = [_pooled(tuple(hw)) if self.config.stem == "cifar_pool" else tuple(hw)]
        for _ in range(1, self.config.num_scales):
            sizes.append(tuple((n - 1) // 2 + 1 for n in sizes[-1]))  # 3x3 conv, stride 2, padding 1
        return sizes  # type: ignore[return-value]

    def exit_costs(self, input_size: tuple[int, int, int]) -> ExitCosts:
        """Per exit, per example: cumulative multiply-accumulates of everything computed to produce exits
        0..k (stem, the layers and transitions of blocks 0..k and the classifiers 0..k: earlier classifiers are
        counted, as in the reference's counter; convs and linear layers only), and latency on parallel hardware
        in layer units: the stem is 1, each dense layer 1, the exit's classifier 1 (two 3x3 convs, as deep as a
        layer), a transition 0 (one 1x1 conv, as light as a layer's own bottleneck), so exit k has latency
        ``1 + (layers in blocks 0..k) + 1``. A step of a cascade (one residual block) is the same unit."""
        c, h, w = input_size
        if c != self.config.in_channels:
            raise ValueError(f"the model takes {self.config.in_channels} input channels, input_size has {c}")
        hws = self.scale_sizes((h, w))
        total = self.stem.macs((h, w))
        depth = 1
        macs, latency = [], []
        for block, head in zip(self.blocks, self.heads):
            for layer in block:
                total += layer.macs(hws)
                depth += isinstance(layer, _DenseLayer)
            total += head.macs(hws[-1])
            macs.append(int(total))
            latency.append(float(depth + 1))
        return ExitCosts(macs, latency)


register_model("msdnet-cifar", MSDNetConfig, num_blocks=7, step_mode="even", step=2, base=4, channels=16, growth_rate=6)
