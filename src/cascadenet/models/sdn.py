"""Shallow-Deep Networks (Kaya, Hong & Dumitras, ICML 2019): a feed-forward ResNet with internal classifiers.

An SDN is an ordinary ResNet (the same stems and residual blocks as the cascades, ``blocks.py``) with an
*internal classifier* (IC) after some of its residual blocks; the backbone's own head is the final exit. As an
anytime model its exits are the ICs in depth order, then the final head: ``model(x)`` is ``(E, B, C)``.

Following the reference code (yigitcankaya/Shallow-Deep-Networks; see docs/baselines.md):

- An IC reads the block's residual sum *before* the block's final ReLU (``ResNet_SDN.py``: the block returns
  ``relu(sum)`` to the next block and gives ``sum`` to its IC).
- The IC head (``aux_funcs.InternalClassifier``): a map of side s >= 4 is pooled with kernel and stride
  k = floor(s / 4) (to floor(s / k) = 4 px when s is a multiple of 4) as ``alpha * maxpool + (1 - alpha) *
  avgpool``, alpha one learned scalar per IC initialised U[0, 1) and left unclamped; a map under 4 px is not
  pooled. Then flatten and one Linear layer, no batch norm, no hidden layer. The Linear's size depends on the map
  size, so an SDN is built for one input size (``SDNConfig.input_size``; training sets it from the dataset).
- Default placement (``ic_after=None``): the reference hand-placed its ICs at about 15, 30, 45, 60, 75 and 90% of
  the network's cost. Here that rule is applied to the backbone: IC i follows the residual block whose cumulative
  multiply-accumulates (stem and blocks 1..k, shortcuts included) are nearest to f_i times the backbone's whole
  cost (every block plus the final classifier), f_i in ``IC_FRACTIONS``; ties go to the earlier block, repeats are
  dropped, and the last block is never a candidate (the final head is there). The fractions hardly depend on the
  input size (convolution costs scale with the map area), but the rule is evaluated at ``input_size``.

Costs (``exit_costs``): an exit's MACs are cumulative, as the reference profiler counts them (but in MACs, not
FLOPs): the backbone up to its block, every earlier IC head and its own head. Pooling, batch norm, ReLU and the
alpha mix are not counted, as nowhere in this package. Latency is in the cascade's block units: the stem is one
unit and each residual block one more, so the exit after block k (1-based) is at k + 1 and the final exit at
D + 1; heads count zero units, as a cascade's classifier is part of its step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .anytime import ExitCosts, ModelConfig, choice, positive_int
from .blocks import STEMS, make_stages, make_stem
from .cascade import ARCHITECTURES
from .norm import TemporalBatchNorm2d
from .registry import register_model

__all__ = ["SDNConfig", "SDN", "InternalClassifier", "IC_FRACTIONS", "place_ics"]

# The cost fractions SDN's ICs were placed at (the reference's comment in network_architectures.py).
IC_FRACTIONS = (0.15, 0.30, 0.45, 0.60, 0.75, 0.90)


@dataclass(frozen=True, kw_only=True)
class SDNConfig(ModelConfig):
    """Every architectural option of a Shallow-Deep Network; ``SDN(config)`` builds it.

    Raises ``ValueError`` on construction for a bad value, naming the option and the valid choices.
    """

    family = "sdn"

    arch: str = "resnet18"
    """Backbone: resnet10, resnet18, resnet34 or resnet50 (or one added with register_architecture)."""
    width: int = 64
    """Channels of the first stage (64 = the standard ResNet); stages use 1x, 2x, 4x, 8x."""
    stem: Literal["cifar", "cifar_pool", "imagenet"] = "cifar"
    """cifar: 3x3 conv; cifar_pool: plus 3x3/2 max-pool (4x cheaper); imagenet: 7x7/2 conv plus max-pool."""
    ic_after: tuple[int, ...] | None = None
    """Residual blocks (1-based, increasing, not the last) followed by an internal classifier, 0 meaning one on
    the stem's output (an exit one unit deep); default: SDN's rule, the blocks nearest 15/30/45/60/75/90% of the
    backbone's cumulative MACs (never the stem)."""
    input_size: int = 32
    """Side of the square input images the internal classifiers are sized for (training sets it from the data)."""

    def __post_init__(self) -> None:
        if isinstance(self.ic_after, list):  # a JSON round trip turns the tuple into a list
            object.__setattr__(self, "ic_after", tuple(self.ic_after))
        super().__post_init__()
        choice("model", self.arch, tuple(ARCHITECTURES))
        positive_int("width", self.width)
        choice("stem", self.stem, STEMS)
        positive_int("input_size", self.input_size)
        if self.ic_after is not None:
            blocks = self.num_blocks
            ok = all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k < blocks for k in self.ic_after)
            if not ok or list(self.ic_after) != sorted(set(self.ic_after)):
                raise ValueError(
                    f"ic_after must list increasing residual blocks in 0..{blocks - 1} (0: the stem; {self.arch} "
                    f"has {blocks} blocks; the last one feeds the final head), got {self.ic_after!r}"
                )

    @property
    def num_blocks(self) -> int:
        return sum(ARCHITECTURES[self.arch][1])

    def build(self) -> SDN:
        return SDN(self)


class InternalClassifier(nn.Module):
    """SDN's IC head on a ``(B, C, s, s)`` map: mixed max/average pooling with kernel floor(s / 4) (none under
    4 px), flatten, one Linear layer."""

    def __init__(self, channels: int, size: int, num_classes: int) -> None:
        super().__init__()
        self.kernel = size // 4 if size >= 4 else 0  # 0: no pooling
        self.size = size
        pooled = size // self.kernel if self.kernel else size
        self.alpha = nn.Parameter(torch.rand(1)) if self.kernel else None  # the reference: U[0, 1), unclamped
        self.linear = nn.Linear(channels * pooled * pooled, num_classes)

    def pool(self, x: Tensor) -> Tensor:
        """The mixed pooling alone: ``alpha * maxpool + (1 - alpha) * avgpool`` (identity under 4 px)."""
        if not self.kernel:
            return x
        k = self.kernel
        return self.alpha * F.max_pool2d(x, k) + (1 - self.alpha) * F.avg_pool2d(x, k)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.pool(x).flatten(1))

    def macs(self) -> int:
        """Multiply-accumulates of one example (the Linear layer; pooling is not counted)."""
        return self.linear.in_features * self.linear.out_features


def place_ics(cumulative: list[int], total: int, fractions: tuple[float, ...] = IC_FRACTIONS) -> tuple[int, ...]:
    """SDN's default placement: for each fraction f, the block k (1-based) among 1..D-1 whose cumulative cost
    ``cumulative[k - 1]`` is nearest to ``f * total`` (ties: the earlier block); sorted, without repeats."""
    candidates = range(1, len(cumulative))  # never the last block
    if not candidates:  # a one-block backbone: its final head is the only exit
        return ()
    chosen = {min(candidates, key=lambda k: (abs(cumulative[k - 1] - f * total), k)) for f in fractions}
    return tuple(sorted(chosen))


class SDN(nn.Module):
    """A Shallow-Deep Network: ``SDN(SDNConfig(...))`` or ``cascadenet.create_model("sdn-resnet18", ...)``. An
    anytime model (``cascadenet.models.anytime``) whose exits are its internal classifiers, then the final head.

    Calls:
        ``model(x)``: logits of every exit, ``(E, B, num_classes)``, ICs in depth order then the final head.
        ``model.feedforward(x)``: the backbone and its head only (the plain ResNet), ``(B, num_classes)``.
    """

    first_informative_exit = 0

    def __init__(self, config: SDNConfig) -> None:
        super().__init__()
        if not isinstance(config, SDNConfig):
            raise TypeError(f"SDN takes an SDNConfig, got {type(config).__name__}")
        self.config = config
        self.num_classes = config.num_classes
        self.in_channels = config.in_channels
        block, layers = ARCHITECTURES[config.arch]

        def norm(c: int) -> TemporalBatchNorm2d:  # one slot: an ordinary batch norm
            return TemporalBatchNorm2d(c)

        width = config.width
        self.stem = make_stem(config.stem, config.in_channels, width, norm)
        self.blocks, cin = make_stages(block, layers, width, norm)
        self.features = cin
        self.head = nn.Linear(cin, config.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        # per block: cumulative backbone MACs after it (stem included), output channels and map side
        side = config.input_size
        macs, hw = self.stem.macs((side, side))
        # index 0 is the stem's output (an IC after "block 0" reads it), index k the output of block k
        self._block_macs: list[int] = [macs]
        shapes: list[tuple[int, int]] = [(width, hw[0])]
        for b in self.blocks:
            if b.shortcut is not None:
                macs += b.shortcut.macs(hw)[0]
            m, hw = b.residual.macs(hw)
            macs += m
            self._block_macs.append(macs)
            shapes.append((b.residual.units[-1].conv.out_channels, hw[0]))
        backbone = macs + self.features * config.num_classes
        if config.ic_after is None:
            self.ic_after = place_ics(self._block_macs[1:], backbone)
        else:
            self.ic_after = tuple(config.ic_after)
        # built after the backbone, so that the backbone's initialisation does not depend on the placement
        self.ics = nn.ModuleList(
            [InternalClassifier(shapes[k][0], shapes[k][1], config.num_classes) for k in self.ic_after]
        )
        self._ic_of = {k: i for i, k in enumerate(self.ic_after)}
        costs = self.exit_costs((config.in_channels, side, side))
        # per IC, its cumulative MACs as a fraction of the final exit's: the tau_i of SDN's joint loss
        self.ic_fractions = tuple(m / costs.macs[-1] for m in costs.macs[:-1])
        self.frozen_backbone = False

    @property
    def num_exits(self) -> int:
        return len(self.ics) + 1

    # ---- execution --------------------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected an input of shape (B, C, H, W), got {shape}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"the model takes {self.in_channels} input channels, the input has {x.shape[1]}")
        side = self.config.input_size
        if self.ics and tuple(x.shape[-2:]) != (side, side):
            raise ValueError(
                f"this SDN's internal classifiers are sized for {side}x{side} inputs, got "
                f"{x.shape[-2]}x{x.shape[-1]} (build it with input_size matching the data)"
            )

    def forward(self, x: Tensor) -> Tensor:
        """Logits of every exit, ``(E, B, num_classes)``: the ICs in depth order, then the final head."""
        self._check_input(x)
        out = []
        y = self.stem(x, None)
        if 0 in self._ic_of:  # the stem's output (already through its ReLU and pool)
            out.append(self.ics[self._ic_of[0]](y))
        for k, block in enumerate(self.blocks, start=1):
            short = y if block.shortcut is None else block.shortcut(y, None)
            total = short + block.residual(y, None)
            if k in self._ic_of:
                out.append(self.ics[self._ic_of[k]](total))  # the sum before the block's ReLU
            y = F.relu(total)
        out.append(self.head(y.mean(dim=(-2, -1))))
        return torch.stack(out)

    def feedforward(self, x: Tensor) -> Tensor:
        """The backbone and its own head only (the plain ResNet, no IC computed): ``(B, num_classes)``."""
        self._check_input(x)
        y = self.stem(x, None)
        for block in self.blocks:
            short = y if block.shortcut is None else block.shortcut(y, None)
            y = F.relu(short + block.residual(y, None))
        return self.head(y.mean(dim=(-2, -1)))

    # ---- IC-only training ---------------------------------------------------------------------------------
    def freeze_backbone(self) -> None:
        """SDN's IC-only mode: the backbone and the final head stop learning (``requires_grad`` off) and the
        backbone's batch norms stay in evaluation mode, even under ``model.train()``, so that their running
        statistics do not drift (the reference code's ``model.train()`` let them drift)."""
        if not self.ics:
            raise ValueError("this SDN has no internal classifiers (ic_after is empty): nothing to train IC-only")
        for module in (self.stem, self.blocks, self.head):
            for p in module.parameters():
                p.requires_grad_(False)
        self.frozen_backbone = True
        self.train(self.training)

    def train(self, mode: bool = True) -> SDN:
        super().train(mode)
        if self.frozen_backbone:
            self.stem.eval()
            self.blocks.eval()
        return self

    # ---- cost -------------------------------------------------------------------------------------------
    def exit_costs(self, input_size: tuple[int, int, int]) -> ExitCosts:
        """Per exit, per example: cumulative MACs on serial hardware (the backbone up to the exit's block, every
        earlier IC head and this exit's head) and latency in block units (stem 1, each block 1, heads 0: an IC on
        the stem is at 1)."""
        c, h, w = input_size
        side = self.config.input_size
        if (h, w) != (side, side) or c != self.in_channels:
            raise ValueError(f"this SDN is sized for {self.in_channels}x{side}x{side} inputs, got {c}x{h}x{w}")
        macs, latency, heads = [], [], 0
        for k, ic in zip(self.ic_after, self.ics):
            heads += ic.macs()
            macs.append(self._block_macs[k] + heads)
            latency.append(float(k + 1))
        macs.append(self._block_macs[-1] + heads + self.features * self.num_classes)
        latency.append(float(len(self.blocks) + 1))
        return ExitCosts(macs, latency)

    def feedforward_macs(self, input_size: tuple[int, int, int]) -> int:
        """MACs of ``feedforward`` for one example: the backbone and its head, no IC."""
        self.exit_costs(input_size)  # the same size checks
        return self._block_macs[-1] + self.features * self.num_classes


for _arch in ("resnet10", "resnet18", "resnet34", "resnet50"):
    register_model(f"sdn-{_arch}", SDNConfig, arch=_arch)
