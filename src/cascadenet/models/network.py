"""``cascadenet.cascade``: a user's residual network (an ``nn.Module``) turned into a cascade with the same weights.

The network's parts are read from its layout (``cascadenet.models.layouts``: torchvision's ResNet, ResNeXt and
Wide-ResNet, or any module with a ``cascade_layout()`` method) and run by the step loop and the trajectory engine of
``CascadedResNet`` unchanged: the stem, each residual branch and each projection shortcut become a *module branch*
(``ModuleBranch``), the user's own modules run as they are, with every ``nn.BatchNorm2d`` in them replaced by a
temporal batch norm whose per-step slots (running statistics, and scale/shift with ``temporal_affine``) start as
copies of the original's. The settled step of the parallel cascade is the original network (``tests/test_network.py``
checks it in float64 for every layout). The engine runs a module branch once per distinct state (the project's own
branches batch the states into one convolution): exact, with the engine's savings, without the batching.

A cascade made from a *builder* (an importable function returning the network, e.g.
``cascadenet.cascade("torchvision.models:resnet18", builder_args={"num_classes": 10})``) records the builder's import
path and its arguments in its configuration (``NetworkConfig``), so that saved weights and run directories rebuild in
a fresh process (load the builder's own code first: ``cascadenet --import MODULE`` on the command line). A cascade of
a module object alone still trains, evaluates and saves, but cannot be rebuilt from its files; ``builder=`` says how.
"""

from __future__ import annotations

import copy
import importlib
import json
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .anytime import ModelConfig, choice, positive_int
from .cascade import DELAYS, SCHEMES, CascadedResNet
from .layouts import Layout, layout_of
from .norm import TemporalBatchNorm2d
from .registry import register_model

__all__ = ["NetworkConfig", "CascadedNetwork", "ModuleBranch", "cascade", "resolve_builder"]


@dataclass(frozen=True, kw_only=True)
class NetworkConfig(ModelConfig):
    """A cascade of a user's residual network, rebuilt by calling ``builder(**builder_args)`` and reading its
    layout (``cascadenet.cascade`` makes it)."""

    family = "cascaded-network"

    builder: str = ""
    """Import path of a function returning the network (e.g. torchvision.models:resnet18); load your own code
    with cascadenet --import MODULE."""
    builder_args: str = "{}"
    """The builder's keyword arguments, as a JSON object."""
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
        choice("scheme", self.scheme, SCHEMES)
        choice("delay", self.delay, DELAYS)
        if self.num_steps is not None:
            positive_int("num_steps", self.num_steps)
        if isinstance(self.alpha, bool) or not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"alpha must be a number in [0, 1), got {self.alpha!r}")
        if self.delay == "osd" and self.alpha != 0.0:
            raise ValueError("alpha is the EWS smoothing factor; with delay='osd' it must be 0 (or use delay='ews')")
        if self.temporal_affine and not self.temporal_bn:
            raise ValueError("temporal_affine=True needs temporal_bn=True")
        object.__setattr__(self, "alpha", float(self.alpha))
        if not isinstance(self.args(), dict):
            raise ValueError(f"builder_args must be a JSON object, got {self.builder_args!r}")

    def args(self) -> Any:
        try:
            return json.loads(self.builder_args)
        except ValueError as e:
            raise ValueError(f"builder_args is not JSON ({e}): {self.builder_args!r}") from None

    def build(self) -> CascadedNetwork:
        if not self.builder:
            raise ValueError(
                "this cascade was made from a module object, so nothing says how to rebuild it: cascade it with "
                "builder='package.module:function' (and builder_args) to save a model that loads again"
            )
        return _cascade_module(resolve_builder(self.builder)(**self.args()), self)


def resolve_builder(path: str) -> Any:
    """The function at ``path`` (``package.module:function`` or ``package.module.function``).

    Raises:
        ValueError: it cannot be imported (one line naming it, and how to load user code).
    """
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    try:
        if not module_name or not attr:
            raise ImportError(f"{path!r} is not of the form package.module:function")
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as e:
        detail = " ".join(str(e).split())
        raise ValueError(
            f"cannot import the network builder {path!r} ({detail}): install the package that holds it, or load "
            "your code first (cascadenet --import MODULE, or import it before loading)"
        ) from None
    if not callable(target):
        raise ValueError(f"the network builder {path!r} is not callable")
    return target


def _builder_path(fn: Any) -> str:
    """The import path of a function, when importing it gives the same function back."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or not name or "<" in name or module == "__main__":
        raise ValueError(f"the builder {fn!r} is not importable by name (define it at the top of a module, not in "
                         "__main__ or a function, or give its import path as a string)")  # fmt: skip
    path = f"{module}:{name}"
    if resolve_builder(path) is not fn:
        raise ValueError(f"the builder {fn!r} is not what {path} imports")
    return path


def cascade(
    network: nn.Module | str | Any,
    *,
    builder: str | Any = None,
    builder_args: dict[str, Any] | None = None,
    normalization: dict[str, Any] | None = None,
    **options: Any,
) -> CascadedNetwork:
    """A residual network as a cascade with the same weights (an anytime model: ``model(x)`` gives the logits of
    every step, ``(T, B, classes)``; the settled step equals ``network(x)``).

    Args:
        network: the network (an ``nn.Module``: it is copied, the original stays as it is), or its builder (an
            importable function, or its import path ``"package.module:function"``), called with ``builder_args``.
        builder: with a module object, the builder that makes the same network (recorded, so that saved weights
            rebuild it in a fresh process).
        builder_args: the builder's keyword arguments (JSON values).
        normalization: the input normalisation the network's weights expect, ``{"mean": [...], "std": [...]}`` (one
            number per channel): ``model.normalization``, stored by ``save_weights`` so that ``train --init`` and
            ``load_model(...).preprocess`` use it. Default: a timm network's own (its ``pretrained_cfg``), else None.
        **options: the cascade's options (``NetworkConfig``: ``scheme``, ``delay``, ``alpha``, ``stem_delay``,
            ``temporal_bn``, ``temporal_affine``, ``multi_head``, ``num_steps``; ``num_classes`` gives the network a
            new classifier when it differs from its own).

    Raises:
        ValueError: no recognised layout (the message says how to describe one), an unimportable builder, a bad
            option.
    """
    args = dict(builder_args or {})
    try:
        args_json = json.dumps(args, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"builder_args must hold JSON values (they are stored with the model): {e}") from None
    if isinstance(network, nn.Module):
        module = copy.deepcopy(network)
    else:
        if builder is not None:
            raise ValueError("give the builder either as network or as builder=, not both")
        builder, module = network, None
    path = "" if builder is None else builder if isinstance(builder, str) else _builder_path(builder)
    if module is None:
        module = resolve_builder(path)(**args)
        if not isinstance(module, nn.Module):
            raise ValueError(f"the builder {path!r} returned a {type(module).__name__}, not an nn.Module")
    layout = layout_of(module)
    known = {"num_classes": _classifier(layout.head)[1].out_features, "in_channels": _in_channels(layout.stem)}
    config = NetworkConfig(builder=path, builder_args=args_json, **{**known, **options})
    norm = _normalization(module, normalization, known["in_channels"])
    model = _cascade_module(module, config, layout)
    model.normalization = norm
    return model


def _normalization(module: nn.Module, given: dict[str, Any] | None, channels: int) -> dict[str, list[float]] | None:
    """The normalisation given, or a timm network's (``pretrained_cfg``: the mean and std its weights expect)."""
    source = "normalization"
    if given is None:
        cfg = getattr(module, "pretrained_cfg", None)
        if not isinstance(cfg, dict) or "mean" not in cfg or "std" not in cfg:
            return None
        given, source = cfg, f"the network's pretrained_cfg ({type(module).__name__})"
    try:
        norm = {k: [float(v) for v in given[k]] for k in ("mean", "std")}
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{source} must be {{'mean': [...], 'std': [...]}} with numbers, got {given!r}") from None
    if any(len(v) != channels for v in norm.values()) or min(norm["std"]) <= 0:
        raise ValueError(f"{source}: mean and std must have {channels} number(s) each (std > 0), got {norm}")
    return norm


def _classifier(head: nn.Module) -> tuple[str, nn.Linear]:
    """The head's last ``nn.Linear`` (what sets the number of classes) and its name in the head."""
    found = [(n, m) for n, m in head.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError("the network's head has no nn.Linear classifier: cannot tell its number of classes")
    return found[-1]


def _in_channels(stem: nn.Module) -> int:
    for m in stem.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise ValueError("the network's stem has no nn.Conv2d: cannot tell its input channels")


def _cascade_module(module: nn.Module, config: NetworkConfig, layout: Layout | None = None) -> CascadedNetwork:
    layout = layout_of(module) if layout is None else layout
    name, fc = _classifier(layout.head)
    if fc.out_features != config.num_classes:  # a new classifier for the data's classes
        new = nn.Linear(fc.in_features, config.num_classes, bias=fc.bias is not None)
        new.to(device=fc.weight.device, dtype=fc.weight.dtype)
        parent = layout.head.get_submodule(name.rpartition(".")[0]) if "." in name else layout.head
        if name:
            setattr(parent, name.rpartition(".")[2], new)
        else:
            raise ValueError("the head is a bare nn.Linear of another number of classes: wrap it to replace it")
    if _in_channels(layout.stem) != config.in_channels:
        raise ValueError(f"the network takes {_in_channels(layout.stem)}-channel images, not in_channels="
                         f"{config.in_channels}")  # fmt: skip
    return CascadedNetwork(config, layout)


# ----------------------------------------------------------------------------------------------------------------
# The branches: the user's modules, their batch norms made temporal


class _Steps:
    """What a module branch's batch norms read while the branch runs: the step, and in the engine's grouped form
    the count of a constant state and where to put each norm's batch statistics."""

    t: int | None = None
    grouped: bool = False
    count: int | None = None
    stats: dict[int, tuple[Tensor, Tensor]] | None = None


class StepBatchNorm2d(TemporalBatchNorm2d):
    """A temporal batch norm called as ``nn.BatchNorm2d`` is (``bn(x)``) from inside a user's module: the module
    branch that holds it sets the step (and, for the engine, the grouped form) around the call."""

    def forward(self, x: Tensor, t: int | None = None) -> Tensor:  # type: ignore[override]
        steps: _Steps = self.__dict__["_steps"]
        if not steps.grouped:
            return super().forward(x, steps.t)
        t = steps.t
        assert t is not None
        y, stats = self.forward_groups(x.unsqueeze(1), [self.stat_slot(t)], [self.affine_slot(t)], steps.count)
        if stats is not None and steps.stats is not None:
            steps.stats[id(self)] = stats
        return y.squeeze(1)

    @classmethod
    def of(cls, bn: nn.BatchNorm2d, slots: int, affine_slots: int, steps: _Steps) -> StepBatchNorm2d:
        """A temporal copy of ``bn``: every slot starts as ``bn``'s statistics and scale/shift."""
        if not bn.track_running_stats or bn.running_mean is None:
            raise ValueError("a batch norm without running statistics (track_running_stats=False) cannot be cascaded")
        new = cls(bn.num_features, slots, affine_slots, eps=bn.eps, momentum=bn.momentum)
        ref = bn.running_mean
        new.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            new.running_mean.copy_(bn.running_mean.expand_as(new.running_mean))
            new.running_var.copy_(bn.running_var.expand_as(new.running_var))
            if bn.affine:
                new.weight.copy_(bn.weight.expand_as(new.weight))
                new.bias.copy_(bn.bias.expand_as(new.bias))
        new.__dict__["_steps"] = steps
        return new


def _temporal(module: nn.Module, slots: int, affine_slots: int, steps: _Steps) -> nn.Module:
    """``module`` with every ``nn.BatchNorm2d`` in it replaced (in place) by a ``StepBatchNorm2d``."""
    if isinstance(module, nn.BatchNorm2d):
        return StepBatchNorm2d.of(module, slots, affine_slots, steps)
    for name, child in list(module.named_children()):
        setattr(module, name, _temporal(child, slots, affine_slots, steps))
    return module


class ModuleBranch(nn.Module):
    """A user's module as a branch of the cascade (the interface of ``cascadenet.models.blocks.Branch``)."""

    def __init__(self, module: nn.Module, slots: int, affine_slots: int) -> None:
        super().__init__()
        steps = _Steps()
        self.__dict__["_steps"] = steps
        self.module = _temporal(module, slots, affine_slots, steps)
        first = next((m for m in self.module.modules() if isinstance(m, (nn.Conv2d, TemporalBatchNorm2d))), None)
        self.in_channels = None if first is None else getattr(first, "in_channels", getattr(first, "num_features", 0))
        self.__dict__["_macs"] = {}
        self.__dict__["_channels"] = {}

    def norms(self) -> list[TemporalBatchNorm2d]:
        return [m for m in self.module.modules() if isinstance(m, StepBatchNorm2d)]

    @property
    def units(self) -> list[nn.Conv2d]:
        """The branch's convolutions: its depth in layers for ``cascadenet.models.latency`` (taken to be in
        sequence; a branch with parallel paths inside counts them all)."""
        return [m for m in self.module.modules() if isinstance(m, nn.Conv2d)]

    def forward(self, x: Tensor, t: int | None) -> Tensor:
        steps = self.__dict__["_steps"]
        steps.t, steps.grouped, steps.stats = t, False, None
        return self.module(x)

    def forward_groups(self, x: Tensor, steps: list[int], count: int | None = None) -> tuple[Tensor, list[Any]]:
        """``Branch.forward_groups``: group g of ``x`` ``(B, G, C, H, W)`` as at step ``steps[g]`` (one call of the
        module each), with the groups' batch statistics per norm (training) or None."""
        ctx = self.__dict__["_steps"]
        norms = self.norms()
        outs, per_norm = [], [[] for _ in norms]
        for g, t in enumerate(steps):
            ctx.t, ctx.grouped, ctx.count, ctx.stats = t, True, count, {}
            try:
                outs.append(self.module(x[:, g]))
            finally:
                ctx.grouped = False
            for i, n in enumerate(norms):
                if id(n) in ctx.stats:
                    per_norm[i].append(ctx.stats[id(n)])
        ctx.stats = None
        stats: list[Any] = []
        for found in per_norm:
            if len(found) == len(steps):
                stats.append((torch.cat([m for m, _ in found]), torch.cat([v for _, v in found])))
            else:
                stats.append(None)
        return torch.stack(outs, dim=1), stats

    def macs(self, hw: tuple[int, int]) -> tuple[int, tuple[int, int]]:
        """Multiply-accumulates of convolutions and linear layers for one example of spatial size ``hw``, counted
        on a probe forward pass (in evaluation mode, nothing updated), and the output's spatial size."""
        hw = (int(hw[0]), int(hw[1]))
        held = self.__dict__["_macs"]
        if hw in held:
            return held[hw]
        if self.in_channels is None:
            return 0, hw
        param = next(self.parameters(), None)
        total = [0]

        def count(m: nn.Module, inputs: Any, out: Tensor) -> None:
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
                total[0] += out[0].numel() * k
            elif isinstance(m, nn.Linear):
                total[0] += out[0].numel() * m.in_features

        hooks = [m.register_forward_hook(count) for m in self.module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        modes = [(m, m.training) for m in self.modules()]
        try:
            self.eval()
            with torch.no_grad():
                probe = torch.zeros(1, self.in_channels, *hw, device=None if param is None else param.device,
                                    dtype=None if param is None else param.dtype)  # fmt: skip
                out = self.forward(probe, None)
        finally:
            for h in hooks:
                h.remove()
            for m, mode in modes:
                m.training = mode
        held[hw] = (total[0], (out.shape[-2], out.shape[-1]))
        self.__dict__["_channels"][hw] = out.shape[1]
        return held[hw]

    def out_channels(self, hw: tuple[int, int]) -> int:
        """The channels of the output for an input of spatial size ``hw`` (``Branch.out_channels``), from the
        probe that counts the MACs."""
        hw = (int(hw[0]), int(hw[1]))
        if hw not in self.__dict__["_channels"]:
            self.macs(hw)
        return self.__dict__["_channels"].get(hw, self.in_channels or 0)


class _Block(nn.Module):
    """A residual block of a cascaded network: ``relu(shortcut(y) + delayed residual(y))``."""

    def __init__(self, residual: ModuleBranch, shortcut: ModuleBranch | None) -> None:
        super().__init__()
        self.residual = residual
        self.shortcut = shortcut


class CascadedNetwork(CascadedResNet):
    """A user's residual network run as a cascade (``cascadenet.cascade`` makes it): the step loop, the streaming
    ``step``, the trajectory engine, ``feedforward``, ``exit_costs`` and ``model.anytime`` (real early exit, which
    ``cascadenet.predict``, deadlines, ``cascadenet predict`` and ``serve`` use) of ``CascadedResNet``, on the
    network's own modules."""

    def __init__(self, config: NetworkConfig, layout: Layout) -> None:
        nn.Module.__init__(self)
        if not isinstance(config, NetworkConfig):
            raise TypeError(f"CascadedNetwork takes a NetworkConfig, got {type(config).__name__}")
        self.config = config  # type: ignore[assignment]
        self.num_blocks = len(layout.blocks)
        self.stem_delay = config.stem_delay
        self.settle_steps = self.num_blocks + (2 if config.stem_delay else 1)
        self.num_steps = self.settle_steps if config.num_steps is None else config.num_steps
        self.scheme = config.scheme
        self.delay = config.delay
        self.alpha = config.alpha
        self.in_channels = config.in_channels
        self.num_classes = config.num_classes
        T = self.num_steps
        slots, affine = (T if config.temporal_bn else 1), (T if config.temporal_affine else 1)
        self.stem = ModuleBranch(layout.stem, slots, affine)  # type: ignore[assignment]
        self.blocks = nn.ModuleList(
            _Block(ModuleBranch(b, slots, affine), None if s is None else ModuleBranch(s, slots, affine))
            for b, s in layout.blocks
        )
        self.features = _classifier(layout.head)[1].in_features
        heads = [layout.head] + [copy.deepcopy(layout.head) for _ in range(T - 1 if config.multi_head else 0)]
        self.heads = nn.ModuleList(heads)

    def pool(self, y: Tensor) -> Tensor:
        return y  # the head is the network's own, pooling included


register_model("cascaded-network", NetworkConfig)
