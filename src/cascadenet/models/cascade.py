"""Cascaded ResNets: every residual block runs at every step, from the previous step's state.

Notation (see docs/semantics.md): stem s(x), blocks k = 0..D-1 with residual branch F_k and shortcut S_k,
y_k(t) the output of block k at step t, y_{-1} the (optionally delayed) stem output.

- Stem delay: y_{-1}(0) = 0 and y_{-1}(t) = s(x) computed at step t-1; without it y_{-1}(t) = s(x).
- OSD (one-step delay): y_k(t) = relu(S_k(y_{k-1}(t)) + m_k(t) * F_k(y_{k-1}(t-1))), the branch value of step
  t-1 (computed with step t-1's normalisation) held in a delay buffer; zero at t = 0.
- EWS (exponential smoothing): e_t = alpha * e_{t-1} + (1 - alpha) * F_k(y_{k-1}(t)), y_k(t) = relu(S_k(..) + e_t).
- Parallel scheme: m_k(t) = 1. Serial scheme: block k passes its residual from step tau0 + k + 1 on, the first
  step whose delayed branch value comes from a settled input, so functional depth grows by one block per
  step; before that only its shortcut acts and its residual branch is not computed.
- Skip connections are instantaneous, so at step t the classifier sees a network of functional depth ~t.

The default number of steps is the settling time: the first step at which the OSD parallel cascade's output
equals the ordinary feed-forward network's (D + 2 steps with the stem delayed, D + 1 without). The
published code stops one step short of that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import engine
from .anytime import ExitCosts, ModelConfig, choice, positive_int
from .blocks import STEMS, BasicBlock, Bottleneck, ews_update, make_stages, make_stem
from .norm import TemporalBatchNorm2d
from .stepwise import AnytimeRun

__all__ = ["ARCHITECTURES", "CascadeConfig", "CascadedResNet", "CascadeState", "SCHEMES", "DELAYS"]

SCHEMES = ("parallel", "serial")
DELAYS = ("osd", "ews")
METHODS = ("engine", "loop")

# Residual block type and blocks per stage of each architecture (``cascadenet.register_model`` adds more).
ARCHITECTURES: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, ...]]] = {
    "resnet10": (BasicBlock, (1, 1, 1, 1)),
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


@dataclass(frozen=True, kw_only=True)
class CascadeConfig(ModelConfig):
    """Every architectural option of a cascaded ResNet; ``CascadedResNet(config)`` builds it.

    Raises ``ValueError`` on construction for a bad value or an impossible combination, naming the option and
    the valid choices.
    """

    family = "cascaded-resnet"

    arch: str = "resnet18"
    """Architecture: resnet10, resnet18, resnet34 or resnet50 (or one added with register_model)."""
    width: int = 64
    """Channels of the first stage (64 = the standard ResNet); stages use 1x, 2x, 4x, 8x."""
    stem: Literal["cifar", "cifar_pool", "imagenet"] = "cifar"
    """cifar: 3x3 conv; cifar_pool: plus 3x3/2 max-pool (4x cheaper); imagenet: 7x7/2 conv plus max-pool."""
    scheme: Literal["parallel", "serial"] = "parallel"
    """Default execution scheme (any weights run in either); training uses it."""
    delay: Literal["osd", "ews"] = "osd"
    """Delay kernel of the residual branches: one-step delay, or exponential smoothing with alpha."""
    alpha: float = 0.0
    """EWS smoothing factor in [0, 1); 0 is the plain ResNet. Must be 0 with osd."""
    stem_delay: bool = True
    """Delay the stem output by one step (as the published code); step 0 then cannot see the input."""
    temporal_bn: bool = True
    """Batch-norm running statistics per step."""
    temporal_affine: bool = False
    """Batch-norm scale and shift per step too (needs temporal_bn)."""
    multi_head: bool = False
    """One classifier per step instead of one shared classifier."""
    num_steps: int | None = None
    """Steps of a trajectory (default: the settling time, blocks + 2 with the stem delayed)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        choice("model", self.arch, tuple(ARCHITECTURES))
        positive_int("width", self.width)
        choice("stem", self.stem, STEMS)
        choice("scheme", self.scheme, SCHEMES)
        choice("delay", self.delay, DELAYS)
        if self.num_steps is not None:
            positive_int("num_steps", self.num_steps)
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be a number in [0, 1), got {alpha!r}")
        if self.delay == "osd" and alpha != 0.0:
            raise ValueError("alpha is the EWS smoothing factor; with delay='osd' it must be 0 (or use delay='ews')")
        if self.temporal_affine and not self.temporal_bn:
            raise ValueError(
                "temporal_affine=True needs temporal_bn=True (per-step scale/shift go with per-step statistics)"
            )
        object.__setattr__(self, "alpha", float(alpha))  # 0 and 0.0 are one configuration

    @property
    def num_blocks(self) -> int:
        return sum(ARCHITECTURES[self.arch][1])

    @property
    def settle_steps(self) -> int:
        """Steps until the OSD parallel cascade's output equals the feed-forward network's."""
        return self.num_blocks + (2 if self.stem_delay else 1)

    def build(self) -> CascadedResNet:
        return CascadedResNet(self)


@dataclass(frozen=True)
class CascadeState:
    """Everything a cascade carries from one step to the next (the model itself holds no state).

    Attributes:
        t: index of the next step.
        scheme: execution scheme fixed at the first step.
        stem: stem output waiting in the stem's delay buffer (None before the first step or without delay).
        branches: per block, the delayed branch value (OSD) or the smoothed value (EWS); None = zero.
    """

    t: int
    scheme: str
    stem: Tensor | None
    branches: tuple[Tensor | None, ...]


class CascadedResNet(nn.Module):
    """A residual network run as a parallel (or serial) cascade: ``CascadedResNet(CascadeConfig(...))``, or
    ``cascadenet.create_model(name, ...)``. An anytime model (``cascadenet.models.anytime``) whose exits are its steps.

    Calls:
        ``model(x)``: logits at every step for a constant input, ``(T, B, num_classes)``; a time-varying
        input ``(T, B, C, H, W)`` is streamed through the step loop.
        ``model.step(x_t, state)``: one step of the streaming form.
        ``model.anytime(x)``: the steps of ``model(x)`` one at a time, each computed only when asked for, with
        examples leaving the batch between steps (real early exit).
        ``model.feedforward(x)``: the ordinary ResNet with the same weights, ``(B, num_classes)``.
    """

    def __init__(self, config: CascadeConfig) -> None:
        super().__init__()
        if not isinstance(config, CascadeConfig):
            raise TypeError(f"CascadedResNet takes a CascadeConfig, got {type(config).__name__}")
        self.config = config
        block, layers = ARCHITECTURES[config.arch]
        self.num_blocks = config.num_blocks
        self.stem_delay = config.stem_delay
        self.settle_steps = config.settle_steps
        self.num_steps = config.settle_steps if config.num_steps is None else config.num_steps
        self.scheme = config.scheme
        self.delay = config.delay
        self.alpha = config.alpha
        self.in_channels = config.in_channels
        self.num_classes = config.num_classes
        T = self.num_steps

        def norm(c: int) -> TemporalBatchNorm2d:
            return TemporalBatchNorm2d(c, T if config.temporal_bn else 1, T if config.temporal_affine else 1)

        width = config.width
        self.stem = make_stem(config.stem, config.in_channels, width, norm)
        self.blocks, cin = make_stages(block, layers, width, norm)
        self.features = cin
        heads = T if config.multi_head else 1
        self.heads = nn.ModuleList([nn.Linear(cin, config.num_classes) for _ in range(heads)])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    # ---- the schedule -----------------------------------------------------------------------------------
    def active(self, k: int, t: int, scheme: str) -> bool:
        """Whether block k passes its residual at step t."""
        return scheme == "parallel" or t >= int(self.stem_delay) + k + 1

    def computes_residual(self, k: int, t: int, scheme: str) -> bool:
        """Whether block k evaluates its residual branch at step t (OSD: for use at t + 1)."""
        return self.active(k, t + 1 if self.delay == "osd" else t, scheme)

    @property
    def first_informative_exit(self) -> int:
        """The first step whose output can depend on the input (1 with the stem delayed, else 0)."""
        return int(self.stem_delay)

    def head(self, t: int) -> nn.Linear:
        return self.heads[min(t, len(self.heads) - 1)]

    def pool(self, y: Tensor) -> Tensor:
        """What the heads take from the last block's output: its global average (a cascaded network's own head
        pools itself: ``cascadenet.models.network``)."""
        return y.mean(dim=(-2, -1))

    def classify(self, y: Tensor, t: int | None) -> Tensor:
        return (self.heads[-1] if t is None else self.head(t))(self.pool(y))

    def norms(self) -> list[TemporalBatchNorm2d]:
        """Every temporal batch norm, in module order (the architecture is fixed at construction)."""
        if "_norms" not in self.__dict__:
            self.__dict__["_norms"] = [m for m in self.modules() if isinstance(m, TemporalBatchNorm2d)]
        return self.__dict__["_norms"]

    # ---- validation -------------------------------------------------------------------------------------
    def _check_input(self, x: Tensor, ndim: int = 4) -> None:
        if not isinstance(x, Tensor) or x.ndim != ndim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            want = "(B, C, H, W)" if ndim == 4 else "(T, B, C, H, W)"
            raise ValueError(f"expected an input of shape {want}, got {shape}")
        if x.shape[-3] != self.in_channels:
            raise ValueError(f"the model takes {self.in_channels} input channels, the input has {x.shape[-3]}")

    def _resolve(self, scheme: str | None, num_steps: int | None) -> tuple[str, int]:
        scheme = self.scheme if scheme is None else scheme
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; valid choices: {', '.join(SCHEMES)}")
        T = self.num_steps if num_steps is None else num_steps
        if not isinstance(T, int) or T < 1:
            raise ValueError(f"num_steps must be a positive integer, got {T!r}")
        return scheme, T

    # ---- execution --------------------------------------------------------------------------------------
    def forward(
        self, x: Tensor, *, num_steps: int | None = None, scheme: str | None = None, method: str = "engine"
    ) -> Tensor:
        """Logits at every step, ``(T, B, num_classes)``.

        Args:
            x: a constant input ``(B, C, H, W)``, or a sequence ``(T, B, C, H, W)`` (one frame per step).
            num_steps: steps to run (default ``self.num_steps``); ignored for a sequence.
            scheme: ``"parallel"`` or ``"serial"`` (default: the model's); any weights run in either.
            method: ``"engine"`` (default, exact and fast) or ``"loop"`` (the step loop, for reference).
        """
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; valid choices: {', '.join(METHODS)}")
        if isinstance(x, Tensor) and x.ndim == 5:
            self._check_input(x, 5)
            scheme, _ = self._resolve(scheme, None)
            return self._loop(list(x), scheme)
        self._check_input(x)
        scheme, T = self._resolve(scheme, num_steps)
        if method == "loop":
            return self._loop([x] * T, scheme)
        return engine.trajectory(self, x, T, scheme)

    def anytime(self, x: Tensor, *, num_steps: int | None = None, scheme: str | None = None) -> AnytimeRun:
        """Real anytime inference on a constant input: an iterator over the steps of ``model(x)``, each step
        computed by ``next()`` (only the states that changed since the previous step), and ``keep(...)`` to drop
        the examples that are done between steps. See ``cascadenet.models.stepwise``.

        Each step yields ``AnytimeStep(step, logits (B_t, C), macs, indices)``: the logits equal ``model(x)[t]``
        for the remaining rows, and ``macs`` is ``exit_costs(...).macs[t]``, what the run has actually spent per
        example. Evaluation mode only; the model must not change while the run is in progress.

        Args:
            x: a constant input ``(B, C, H, W)`` (a time-varying input streams through ``model.step``).
            num_steps: steps to run at most (default ``self.num_steps``).
            scheme: ``"parallel"`` or ``"serial"`` (default: the model's).
        """
        if self.training:
            raise ValueError(
                "model.anytime runs in evaluation mode only (in training mode batch norm would use the statistics "
                "of a batch that shrinks as examples leave, and update its running statistics): call model.eval()"
            )
        self._check_input(x)
        scheme, T = self._resolve(scheme, num_steps)
        return AnytimeRun(self, x, T, scheme)

    def _loop(self, frames: list[Tensor], scheme: str) -> Tensor:
        state = None
        out = []
        for x_t in frames:
            logits, state = self.step(x_t, state, scheme=scheme)
            out.append(logits)
        return torch.stack(out)

    def step(
        self, x: Tensor, state: CascadeState | None = None, *, scheme: str | None = None
    ) -> tuple[Tensor, CascadeState]:
        """Advance the cascade one step.

        Args:
            x: this step's input ``(B, C, H, W)``; it may change from step to step.
            state: the state returned by the previous call, or None to start a new sequence.
            scheme: execution scheme for a new sequence (default: the model's).

        Returns:
            this step's logits ``(B, num_classes)`` and the new state.
        """
        self._check_input(x)
        if state is None:
            scheme, _ = self._resolve(scheme, None)
            state = CascadeState(0, scheme, None, (None,) * self.num_blocks)
        t, scheme = state.t, state.scheme
        h = self.stem(x, t)
        if self.stem_delay:
            y = torch.zeros_like(h) if state.stem is None else state.stem
            stem_buffer = h
        else:
            y, stem_buffer = h, None
        branches: list[Tensor | None] = []
        for k, block in enumerate(self.blocks):
            short = y if block.shortcut is None else block.shortcut(y, t)
            held = state.branches[k]
            if self.delay == "osd":
                delayed = held if self.active(k, t, scheme) else None
                new = block.residual(y, t) if self.computes_residual(k, t, scheme) else None
            elif self.active(k, t, scheme):
                new = delayed = ews_update(held, block.residual(y, t), self.alpha)
            else:
                new = delayed = None
            branches.append(new)
            y = F.relu(short if delayed is None else short + delayed)
        return self.classify(y, t), CascadeState(t + 1, scheme, stem_buffer, tuple(branches))

    def feedforward(self, x: Tensor, num_blocks: int | None = None) -> Tensor:
        """The ordinary (non-cascaded) ResNet with the same weights: ``(B, num_classes)``.

        Uses the last step's normalisation statistics and head; in training mode it writes its batch
        statistics to every step's slot (an ordinary ResNet has the same statistics at every step).

        Args:
            num_blocks: keep only the first ``num_blocks`` residual branches (the rest pass their shortcut),
                which is what the serial scheme computes at intermediate steps.
        """
        self._check_input(x)
        n = self.num_blocks if num_blocks is None else num_blocks
        y = self.stem(x, None)
        for k, block in enumerate(self.blocks):
            short = y if block.shortcut is None else block.shortcut(y, None)
            y = F.relu(short + block.residual(y, None) if k < n else short)
        return self.classify(y, None)

    # ---- cost -------------------------------------------------------------------------------------------
    def exit_costs(
        self, input_size: tuple[int, int, int], *, num_steps: int | None = None, scheme: str | None = None
    ) -> ExitCosts:
        """Per step, per example: cumulative multiply-accumulates on serial hardware (what the exact engine
        spends to produce steps 0..t, each distinct state once; states that do not depend on the input are
        constants and not counted), and latency on parallel hardware in block units: the depth of the longest
        path from the input to step t's output, every delayed computation one unit, shortcuts none. With the stem
        delayed that is t (step 0 does not depend on the input: a constant, as its 0 MACs say; step t has gone
        through the stem and t - 1 blocks, as an early-exit network's exit after block t - 1 has, at t units);
        without the stem delay, t + 1 (the stem's unit comes first)."""
        scheme, T = self._resolve(scheme, num_steps)
        offset = 0 if self.config.stem_delay else 1
        return ExitCosts(engine.cumulative_macs(self, input_size, T, scheme), [float(t + offset) for t in range(T)])

    def feedforward_macs(self, input_size: tuple[int, int, int]) -> int:
        """Multiply-accumulates of one ordinary forward pass for one example (convolutions and the classifier)."""
        return engine.feedforward_macs(self, input_size)
