"""Robustness of a cascade to noise that persists and to noise that passes (docs/properties.md, "Noise").

A cascade is a dynamical system: its input may change from step to step, so noise can be given a time course.
Frames that change over time go through the streaming form, ``model.step(x_t, state)``: frame ``t`` is the input
of step ``t``.

Noise: Gaussian pixel noise of standard deviation ``sigma`` on the [0, 1] pixel scale (uint8 / 255), added before
normalisation, clipped to [0, 1], then normalised with the run's mean and std, as training normalises. Protocols:

- ``persistent``: a fresh draw at every step;
- ``frozen``: one draw, the same at every step (a single noisy image held still);
- ``transient``: noise in steps 0 .. K-1 (``steps_noisy``), then the clean image;
- ``burst``: the clean image, noise in steps t0 .. t1 (``burst``, inclusive), then the clean image again.

Methods, all on the very same frames:

- ``cascade``: the model itself (its own delay kernel and scheme);
- ``ews-<alpha>``: the same weights rebuilt with the exponential-smoothing kernel (``delay="ews"``) at test time, a
  temporal integrator of the frames (as the reference code's eval.py swaps EWS into OSD-trained nets), with a
  batch-norm slot per step and, from ``cascadenet noise``, statistics recomputed on its own clean trajectory;
- ``feedforward``: the ordinary ResNet of the same weights (``model.feedforward``) on each frame alone;
- ``feedforward-average``: the same on the mean of the frames so far (a running average, the simplest integrator).

The noise is seeded: the draw for the i-th evaluated example at draw step t comes from a generator seeded by
(seed, i // 64, t), so it depends neither on the batch size nor on the device, and every sigma scales the same
standard normal draw (common random numbers: curves against sigma are not jagged by resampling).

With the one-step delay a cascade has a finite memory: with D blocks its output at step t depends only on frames
t - D - 1 .. t - 1 (stem delayed; t - D .. t without), so noise that ends at step e no longer reaches the output
from step ``e + settle_steps`` on, where the output equals the clean trajectory's exactly (the tests check it).
With EWS the memory decays geometrically but never ends.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.datasets import ImageSet
from ..evaluation.evaluate import SPLITS
from ..models.precise_bn import recalibrate_bn
from ..runs.data import run_training_batches
from ..runs.load import load_run
from ..utils.device import autocast
from ..utils.files import atomic_write_all, new_folder
from ..utils.memory import check_fits
from ..utils.progress import ProgressLog
from .noise_report import OUTPUT_FILES, format_report, noise_figures, report_contents  # importable from here too

__all__ = [
    "PROTOCOLS",
    "Protocol",
    "standard_noise",
    "noisy_frames",
    "ews_variant",
    "noise_trajectories",
    "noise_robustness",
    "noise_run",
    "format_report",
    "noise_figures",
    "OUTPUT_FILES",
]

PROTOCOLS = ("persistent", "frozen", "transient", "burst")
CHUNK = 64  # examples per noise draw: the noise of an example does not depend on the batch it is evaluated in
RECOVERED = 0.99  # agreement with the clean run above which a method counts as recovered

_DESCRIPTIONS = {
    "persistent": "fresh noise at every step",
    "frozen": "one noise draw, the same at every step",
    "transient": "noise in the first steps, then the clean image",
    "burst": "clean image, a noisy burst, clean again",
}


@dataclass(frozen=True)
class Protocol:
    """When the frames are noisy.

    Attributes:
        name: ``persistent`` (a fresh draw every step), ``frozen`` (one draw held at every step), ``transient``
            (noise in steps ``0 .. steps_noisy - 1``, then clean) or ``burst`` (noise in steps ``burst[0] ..
            burst[1]``, inclusive; clean before and after).
        steps_noisy: the transient's number of noisy steps (>= 1).
        burst: the burst's first and last noisy steps.
    """

    name: str
    steps_noisy: int = 1
    burst: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if self.name not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.name!r}; valid choices: {', '.join(PROTOCOLS)}")
        k = self.steps_noisy
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"--steps-noisy must be a positive integer, got {k!r}")
        b = tuple(self.burst)
        if len(b) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in b) or not 0 <= b[0] <= b[1]:
            raise ValueError(f"--burst takes two steps T0 T1 with 0 <= T0 <= T1, got {self.burst!r}")
        object.__setattr__(self, "burst", b)

    def noisy(self, t: int) -> bool:
        """Whether frame ``t`` carries noise."""
        if self.name == "transient":
            return t < self.steps_noisy
        if self.name == "burst":
            return self.burst[0] <= t <= self.burst[1]
        return True

    def draw(self, t: int) -> int:
        """Which noise draw frame ``t`` uses: 0 for every frame of ``frozen``, else its own step."""
        return 0 if self.name == "frozen" else t

    @property
    def last_noisy(self) -> int | None:
        """The last noisy step of a protocol whose noise ends (transient, burst); None when it never ends."""
        return {"transient": self.steps_noisy - 1, "burst": self.burst[1]}.get(self.name)

    def noisy_steps(self, num_steps: int) -> list[int]:
        """The noisy steps among ``0 .. num_steps - 1``."""
        return [t for t in range(num_steps) if self.noisy(t)]


def _seed(seed: int, chunk: int, step: int) -> int:
    # SeedSequence mixes the three numbers into well-separated streams (consecutive torch seeds would not be)
    a, b = np.random.SeedSequence([seed, chunk, step]).generate_state(2)
    return ((int(a) << 32) | int(b)) & ((1 << 63) - 1)


def standard_noise(seed: int, start: int, stop: int, step: int, shape: Sequence[int]) -> Tensor:
    """Standard normal noise of evaluated examples ``start .. stop - 1`` at draw ``step``: ``(stop - start, *shape)``
    float32 on the CPU. Drawn in blocks of 64 examples, each from a generator seeded by (seed, block, step), so an
    example's noise is the same whatever batch it is in and whatever device runs the model."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {seed!r}")
    if not 0 <= start < stop:
        raise ValueError(f"need 0 <= start < stop, got {start}, {stop}")
    first, last = start // CHUNK, (stop - 1) // CHUNK
    blocks = [
        torch.randn((CHUNK, *shape), generator=torch.Generator().manual_seed(_seed(seed, c, step)))
        for c in range(first, last + 1)
    ]
    lo = start - first * CHUNK
    return torch.cat(blocks)[lo : lo + stop - start]


def _check_sigma(sigma: Any) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"--sigmas: each must be a finite number >= 0 (pixel scale [0, 1]), got {sigma!r}")
    return float(sigma)


def noisy_frames(
    images: Tensor,
    mean: Tensor,
    std: Tensor,
    sigma: float,
    protocol: Protocol,
    num_steps: int,
    *,
    seed: int = 0,
    offset: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Iterator[Tensor]:
    """The normalised input frames of steps ``0 .. num_steps - 1`` for a batch of uint8 images ``(B, C, H, W)``.

    A noisy frame is ``(clip(images / 255 + sigma * z, 0, 1) - mean) / std`` with ``z`` from ``standard_noise``
    (``offset`` is the index of the batch's first example among the evaluated ones); a clean frame is
    ``(images / 255 - mean) / std``. A frame equal to the one before is the same tensor object (frozen noise,
    clean steps), so a caller may reuse what it computed from it.
    """
    sigma = _check_sigma(sigma)
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
    dev, c = images.device, images.shape[1]
    pixels = images.to(dtype) / 255
    m = mean.to(dev, dtype).view(1, c, 1, 1)
    s = std.to(dev, dtype).view(1, c, 1, 1)
    clean = (pixels - m) / s
    held: tuple[int, Tensor] | None = None  # the last noisy frame, by its draw
    for t in range(num_steps):
        if sigma == 0 or not protocol.noisy(t):
            yield clean
            continue
        d = protocol.draw(t)
        if held is None or held[0] != d:
            z = standard_noise(seed, offset, offset + len(images), d, images.shape[1:]).to(dev, dtype)
            held = (d, ((pixels + sigma * z).clamp_(0, 1) - m) / s)
        yield held[1]


def ews_variant(
    model: nn.Module,
    alpha: float,
    *,
    num_steps: int | None = None,
    calibration: Iterable[Any] | None = None,
) -> nn.Module:
    """The same weights with the exponential-smoothing delay kernel, ``delay="ews"`` and ``alpha``, in evaluation
    mode, on the model's device and dtype.

    Args:
        model: a cascade with a delay kernel (``config.delay``).
        alpha: the smoothing factor, in [0, 1).
        num_steps: the variant's number of steps (default: the model's). Its per-step tables (batch-norm
            statistics, and per-step scale/shift and heads where the model has them) get one slot per step; slots
            past the model's repeat its last one, which is what the model itself uses past its last step, so
            without ``calibration`` the variant computes the same thing whatever ``num_steps``.
        calibration: batches of clean training inputs (``x`` or ``(x, y)``). When given, the variant's batch-norm
            statistics are recomputed on its own trajectory (``recalibrate_bn``, one slot per step): a model trained
            with the one-step delay holds statistics of the states of that trajectory, and the smoothed states of
            EWS differ from them (the mean of a branch builds up over tens of steps instead of arriving at once),
            so with the trained statistics EWS can normalise its states wrongly at every step.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha < 1:
        raise ValueError(f"--alphas: each must be a number in [0, 1), got {alpha!r}")
    config = model.config
    names = {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else set()
    if not {"delay", "alpha", "num_steps"} <= names:
        raise ValueError(f"--alphas: a {config.family} model has no EWS delay kernel to run at test time")
    steps = int(model.num_steps) if num_steps is None else num_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    variant = dataclasses.replace(config, delay="ews", alpha=float(alpha), num_steps=steps).build()
    p = next(model.parameters())
    variant.to(device=p.device, dtype=p.dtype)
    variant.load_state_dict(_per_step_tables(model.state_dict(), variant.state_dict()))
    variant.eval()
    if calibration is not None:
        recalibrate_bn(variant, calibration)
    return variant


_HEAD = re.compile(r"heads\.(\d+)\.(.+)")


def _per_step_tables(state: dict[str, Tensor], target: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` laid out as ``target``, a model of the same weights with another number of steps: a per-step
    table (first dimension = slots) is cut, or lengthened by repeating its last slot; a head past the last one is
    a copy of the last one."""
    last_head = max((int(m[1]) for k in state if (m := _HEAD.fullmatch(k))), default=None)
    out = {}
    for key, want in target.items():
        have = state.get(key)
        if have is None and (m := _HEAD.fullmatch(key)) and last_head is not None:
            have = state[f"heads.{last_head}.{m[2]}"]
        if have is None:
            raise ValueError(f"the EWS variant has a tensor the model lacks: {key}")  # a family this does not know
        if have.shape != want.shape and have.ndim >= 1 and have.shape[1:] == want.shape[1:]:
            n = want.shape[0]
            have = have[:n] if len(have) >= n else torch.cat([have, have[-1:].expand(n - len(have), *have.shape[1:])])
        out[key] = have
    return out


def _method_names(model: nn.Module, alphas: Sequence[float]) -> list[str]:
    names = ["cascade", *(f"ews-{a:g}" for a in alphas)]
    if callable(getattr(model, "feedforward", None)):
        names += ["feedforward", "feedforward-average"]
    return names


def _check_streaming(model: nn.Module) -> None:
    if not callable(getattr(model, "step", None)):
        family = getattr(getattr(model, "config", None), "family", type(model).__name__)
        raise ValueError(
            f"cascadenet noise needs a cascade, a model with a streaming step (model.step) whose input can change "
            f"from step to step; a {family} model computes its exits in one pass over one image (its exits are "
            f"depths, not time steps), so noise with a time course has no meaning for it"
        )


@torch.no_grad()
def noise_trajectories(
    model: nn.Module,
    images: Tensor,
    mean: Tensor,
    std: Tensor,
    sigma: float,
    protocol: Protocol,
    num_steps: int,
    *,
    variants: dict[str, nn.Module] | None = None,
    seed: int = 0,
    offset: int = 0,
) -> dict[str, Tensor]:
    """The logits ``(num_steps, B, num_classes)`` of every method on one batch, all fed the same frames
    (``noisy_frames``): ``cascade`` (``model.step``), each of ``variants`` (models with a ``step``, e.g.
    ``{"ews-0.9": ews_variant(model, 0.9)}``), and, when the model has ``feedforward``, ``feedforward`` (each
    frame alone) and ``feedforward-average`` (the mean of frames ``0 .. t``). The model should be in evaluation
    mode."""
    _check_streaming(model)
    streams = {"cascade": model, **(variants or {})}
    dtype = next(model.parameters()).dtype
    feedforward = getattr(model, "feedforward", None)
    states: dict[str, Any] = dict.fromkeys(streams)
    out: dict[str, list[Tensor]] = {name: [] for name in streams}
    if feedforward is not None:
        out["feedforward"], out["feedforward-average"] = [], []
    total, last_frame, last_logits = None, None, None
    frames = noisy_frames(images, mean, std, sigma, protocol, num_steps, seed=seed, offset=offset, dtype=dtype)
    for t, frame in enumerate(frames):
        for name, m in streams.items():
            logits, states[name] = m.step(frame, states[name])
            out[name].append(logits.float())
        if feedforward is not None:
            if frame is not last_frame:  # the same frame gives the same answer: computed once
                last_frame, last_logits = frame, feedforward(frame).float()
            out["feedforward"].append(last_logits)
            total = frame.clone() if total is None else total.add_(frame)
            out["feedforward-average"].append(feedforward(total / (t + 1)).float())
    return {name: torch.stack(v) for name, v in out.items()}


def _default_lengths(
    model: nn.Module, protocols: Sequence[str], steps_noisy: int | None, burst: Sequence[int] | None
) -> tuple[int, tuple[int, int], int]:
    """Defaults: K = half the settling time (at least 1); the burst starts when the ordinary trajectory ends (the
    clean image has settled) and lasts K steps; the trajectory is long enough that every requested transient
    clears by its last step."""
    settle = int(getattr(model, "settle_steps", model.num_steps))
    k = max(1, settle // 2) if steps_noisy is None else steps_noisy
    if burst is None:
        t0 = int(model.num_steps)
        burst = (t0, t0 + (k if isinstance(k, int) and k > 0 else 1) - 1)
    burst = tuple(burst)
    need = [int(model.num_steps)]
    if "transient" in protocols and isinstance(k, int):
        need.append(k + settle)
    if "burst" in protocols and len(burst) == 2 and isinstance(burst[1], int):
        need.append(burst[1] + 1 + settle)
    return k, burst, max(need)


def _unique(flag: str, values: Sequence[Any]) -> list[Any]:
    values = list(values)
    if not values:
        raise ValueError(f"{flag} needs at least one value")
    for v in values:
        if values.count(v) > 1:
            raise ValueError(f"{flag}: {v!r} is given twice")
    return values


@torch.no_grad()
def noise_robustness(
    model: nn.Module,
    ds: ImageSet,
    mean: Tensor,
    std: Tensor,
    *,
    sigmas: Sequence[float] = (0.1, 0.2, 0.4),
    protocols: Sequence[str] = PROTOCOLS,
    alphas: Sequence[float] = (0.9,),
    ews_calibration: Callable[[], Iterable[Any]] | None = None,
    num_steps: int | None = None,
    steps_noisy: int | None = None,
    burst: Sequence[int] | None = None,
    max_examples: int | None = None,
    seed: int = 0,
    batch_size: int = 500,
    amp: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Accuracy per step of every method (see the module) under every protocol and sigma, batched over ``ds``.

    Args:
        model: a cascade (a model with ``step``); other families are refused with a ``ValueError``.
        ds: the examples (on the model's device); ``mean``, ``std``: the normalisation, per channel.
        sigmas: noise standard deviations on the [0, 1] pixel scale.
        protocols: any of ``PROTOCOLS``.
        alphas: EWS smoothing factors of the test-time EWS variants (none: ``()``); each has a batch-norm slot
            per step of the trajectory.
        ews_calibration: makes batches of clean training inputs, called once per variant: each EWS variant's
            batch-norm statistics are then its own (``ews_variant``'s ``calibration``); ``None`` keeps the trained
            ones (the reference code's test-time swap).
        num_steps: steps of every trajectory (default: the model's own, lengthened so that the transient and
            the burst clear by the last step).
        steps_noisy: the transient's noisy steps K (default: half the settling time, at least 1).
        burst: the burst's first and last noisy steps (default: from the model's own number of steps, K steps).
        max_examples: evaluate a random subset of this many examples (seeded by ``seed``).
        seed: seeds the noise and the subset.

    Returns:
        a JSON-ready dict: the settings, the clean run of every method, and per protocol and sigma, per method:
        ``accuracy_per_step``, ``final_accuracy``, ``mean_accuracy`` (over steps), ``agreement_per_step`` (the
        fraction of examples whose prediction equals the same method's on clean frames), and for the transient
        and the burst ``recovery_step``: the first step after the noise from which the agreement stays >= 0.99
        (None if it does not within the trajectory).
    """
    _check_streaming(model)
    sigmas, protocols, alphas = _check_options(sigmas, protocols, alphas, seed, batch_size, max_examples)
    templates, num_steps = _plan_protocols(model, protocols, num_steps, steps_noisy, burst)
    n = len(ds) if max_examples is None else min(len(ds), max_examples)
    # every method's prediction at every step for every example (int64), before any is computed
    check_fits(8.0 * num_steps * n * len(_method_names(model, alphas)), f"{num_steps} steps for {n} examples",
               "use fewer --num-steps or --max-examples")  # fmt: skip
    variants = {
        f"ews-{a:g}": ews_variant(model, a, num_steps=num_steps, calibration=ews_calibration and ews_calibration())
        for a in alphas
    }
    images, labels = _pick_examples(ds, max_examples, seed)
    was_training = model.training
    model.eval()
    runs = [(p, s) for p in protocols for s in sigmas if s > 0]
    total = (len(runs) + 1) * math.ceil(len(labels) / batch_size)
    bar = ProgressLog(total, f"noise: batches of {num_steps} steps",  # a log line every half minute too
                      bar=tqdm(total=total, desc="noise", disable=not progress, leave=False))  # fmt: skip
    bench = _Bench(model, variants, _method_names(model, alphas), images, labels, mean, std, num_steps, seed,
                   batch_size, amp, bar)  # fmt: skip
    try:
        clean = bench.predictions(Protocol("persistent"), 0.0)
        results = {p: [bench.entry(templates[p], sigma, clean) for sigma in sigmas] for p in protocols}
    finally:
        bar.close()
        model.train(was_training)
    return _record(bench, templates, sigmas, alphas, ews_calibration is not None, max_examples, clean, results)


def _check_options(
    sigmas: Sequence[float], protocols: Sequence[str], alphas: Sequence[float], seed: int, batch_size: int,
    max_examples: int | None,
) -> tuple[list[float], list[str], list[float]]:  # fmt: skip
    """Check ``noise_robustness``'s options; returns the sigmas, protocols and alphas as lists."""
    sigmas = [_check_sigma(s) for s in _unique("--sigmas", sigmas)]
    protocols = _unique("--protocols", protocols)
    for p in protocols:
        if p not in PROTOCOLS:
            raise ValueError(f"--protocols: unknown protocol {p!r}; valid choices: {', '.join(PROTOCOLS)}")
    alphas = _unique("--alphas", alphas) if len(alphas) else []
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {seed!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)
                                     or max_examples < 1):  # fmt: skip
        raise ValueError(f"--max-examples must be a positive integer, got {max_examples!r}")
    return sigmas, protocols, alphas


def _plan_protocols(
    model: nn.Module, protocols: list[str], num_steps: int | None, steps_noisy: int | None, burst: Sequence[int] | None
) -> tuple[dict[str, Protocol], int]:
    """Each protocol with its K and burst (defaults from the model), and the trajectory length, checked against
    each other: the transient and the burst must end within the trajectory."""
    k, burst, default_steps = _default_lengths(model, protocols, steps_noisy, burst)
    templates = {p: Protocol(p, steps_noisy=k, burst=burst) for p in protocols}  # validates K and the burst
    if num_steps is None:
        num_steps = default_steps
    elif isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"--num-steps must be a positive integer, got {num_steps!r}")
    if "transient" in protocols and k >= num_steps:
        raise ValueError(f"--steps-noisy {k} must be below --num-steps {num_steps} (else the noise never ends)")
    if "burst" in protocols and burst[1] >= num_steps:
        raise ValueError(f"--burst {burst[0]} {burst[1]}: its last step must be below --num-steps {num_steps}")
    return templates, num_steps


def _pick_examples(ds: ImageSet, max_examples: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """The evaluated images (on their device) and labels (on the CPU): all of ``ds``, or a seeded random subset
    of ``max_examples`` in their original order."""
    n_all = len(ds)
    if max_examples is not None and max_examples < n_all:
        picked = torch.randperm(n_all, generator=torch.Generator().manual_seed(seed))[:max_examples].sort().values
        images, labels = ds.images[picked.to(ds.images.device)], ds.labels[picked.to(ds.labels.device)]
    else:
        images, labels = ds.images, ds.labels
    return images, labels.cpu()


@dataclass
class _Bench:
    """What every trajectory of one ``noise_robustness`` call shares: the model and its EWS variants, the methods,
    the examples, the normalisation, the trajectory length, the noise seed and the batching."""

    model: nn.Module
    variants: dict[str, nn.Module]
    methods: list[str]
    images: Tensor
    labels: Tensor  # on the CPU
    mean: Tensor
    std: Tensor
    num_steps: int
    seed: int
    batch_size: int
    amp: bool
    bar: Any  # the progress bar: one update per batch

    def predictions(self, protocol: Protocol, sigma: float) -> dict[str, Tensor]:
        """Every method's predictions ``(T, N)`` on the frames of one protocol and sigma, batch by batch."""
        parts: dict[str, list[Tensor]] = {m: [] for m in self.methods}
        for start in range(0, len(self.labels), self.batch_size):
            with autocast(self.images.device.type, self.amp):
                traj = noise_trajectories(self.model, self.images[start : start + self.batch_size], self.mean,
                                          self.std, sigma, protocol, self.num_steps, variants=self.variants,
                                          seed=self.seed, offset=start)  # fmt: skip
            for m in self.methods:
                parts[m].append(traj[m].argmax(-1).cpu())
            self.bar.update()
        return {m: torch.cat(v, dim=1) for m, v in parts.items()}  # (T, N) each

    def scores(self, pred: Tensor) -> dict[str, Any]:
        """Accuracy per step, at the last step and over the steps, of predictions ``(T, N)``."""
        acc = (pred == self.labels).double().mean(1)
        return {"accuracy_per_step": acc.tolist(), "final_accuracy": float(acc[-1]), "mean_accuracy": float(acc.mean())}

    def entry(self, protocol: Protocol, sigma: float, clean: dict[str, Tensor]) -> dict[str, Any]:
        """One protocol at one sigma: per method, its scores, its agreement with its own clean run, and (where
        the noise ends) its recovery step."""
        preds = clean if sigma == 0 else self.predictions(protocol, sigma)  # sigma 0: the frames are the clean ones
        entry = {}
        for m in self.methods:
            agree = (preds[m] == clean[m]).double().mean(1)
            entry[m] = {**self.scores(preds[m]), "agreement_per_step": agree.tolist()}
            if protocol.last_noisy is not None:
                entry[m]["recovery_step"] = _recovery(agree, protocol.last_noisy)
        return {"sigma": sigma, "methods": entry}


def _record(
    bench: _Bench, templates: dict[str, Protocol], sigmas: list[float], alphas: Sequence[float],
    own_statistics: bool, max_examples: int | None, clean: dict[str, Tensor], results: dict[str, list[Any]],
) -> dict[str, Any]:  # fmt: skip
    """``noise_robustness``'s JSON-ready result: the settings, each protocol's noisy steps, the methods, the
    clean run and the results."""
    model, num_steps, protocols = bench.model, bench.num_steps, list(templates)
    settle = int(getattr(model, "settle_steps", model.num_steps))
    config = model.config
    own_delay = getattr(config, "delay", None)
    protocol_info = {}
    for p, protocol in templates.items():
        info: dict[str, Any] = {"description": _DESCRIPTIONS[p], "noisy_steps": protocol.noisy_steps(num_steps)}
        if protocol.last_noisy is not None:
            info["last_noisy_step"] = protocol.last_noisy
            # with the one-step delay the output forgets a frame settle_steps - 1 steps later (finite memory)
            info["cascade_clears_at_step"] = protocol.last_noisy + settle if own_delay == "osd" else None
        protocol_info[p] = info
    return {
        "split": None,
        "num_examples": len(bench.labels),
        "max_examples": max_examples,
        "seed": bench.seed,
        "num_steps": num_steps,
        "model_num_steps": int(model.num_steps),
        "settle_steps": settle,
        "first_informative_exit": int(model.first_informative_exit),
        "model": config.to_dict(),
        "noise": "Gaussian pixel noise of std sigma on the [0, 1] pixel scale, added before normalisation, "
        "clipped to [0, 1], then normalised with the run's mean and std",
        "normalization": {"mean": bench.mean.tolist(), "std": bench.std.tolist()},
        "sigmas": sigmas,
        "alphas": [float(a) for a in alphas],
        "ews_statistics": "own" if own_statistics else "trained",
        "steps_noisy": templates["transient"].steps_noisy if "transient" in protocols else None,
        "burst": list(templates["burst"].burst) if "burst" in protocols else None,
        "protocols": protocol_info,
        "methods": {m: _method_description(m, config, own_statistics) for m in bench.methods},
        "recovered_agreement": RECOVERED,
        "clean": {m: bench.scores(clean[m]) for m in bench.methods},
        "results": results,
    }


def _recovery(agreement: Tensor, last_noisy: int) -> int | None:
    """The first step after ``last_noisy`` from which ``agreement`` stays >= RECOVERED to the end, or None."""
    step = None
    for t in range(len(agreement) - 1, last_noisy, -1):
        if agreement[t] < RECOVERED:
            break
        step = t
    return step


def _method_description(name: str, config: Any, own_statistics: bool = False) -> str:
    if name == "cascade":
        delay = getattr(config, "delay", "?")
        alpha = f", alpha {config.alpha:g}" if delay == "ews" else ""
        return f"the cascade itself ({delay}{alpha}, its own scheme), fed one frame per step"
    if name.startswith("ews-"):
        stats = ("batch-norm statistics recomputed on its own clean trajectory" if own_statistics
                 else "the trained batch-norm statistics")  # fmt: skip
        return f"the same weights with the EWS kernel, alpha {name[4:]}, at test time (a temporal integrator), {stats}"
    if name == "feedforward":
        return "the ordinary ResNet of the same weights on each frame alone"
    return "the ordinary ResNet of the same weights on the mean of the frames so far"


def noise_run(
    run_dir: str | os.PathLike,
    *,
    sigmas: Sequence[float] = (0.1, 0.2, 0.4),
    protocols: Sequence[str] = PROTOCOLS,
    alphas: Sequence[float] = (0.9,),
    ews_recalibrate_batches: int = 4,
    num_steps: int | None = None,
    steps_noisy: int | None = None,
    burst: Sequence[int] | None = None,
    split: str = "test",
    max_examples: int | None = None,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    data_root: str | None = None,
    device: str = "auto",
    batch_size: int = 500,
    progress: bool = False,
) -> tuple[dict[str, Any], list[Path]]:
    """``cascadenet noise``: ``noise_robustness`` on a split of a trained run, written to ``out`` (default
    ``RUN_DIR/noise``) as noise.md, noise.json (every number) and two plots, noise-steps.png and noise-final.png.
    Existing files are never replaced without ``overwrite`` (checked before any work). Each EWS variant's batch-norm
    statistics are recomputed on its own clean trajectory over ``ews_recalibrate_batches`` training batches, drawn
    as training's final recalibration draws them (0 keeps the trained statistics)."""
    run_dir = Path(run_dir)
    if isinstance(ews_recalibrate_batches, bool) or not isinstance(ews_recalibrate_batches, int) \
            or ews_recalibrate_batches < 0:  # fmt: skip
        raise ValueError(f"--ews-recalibrate-batches must be a non-negative integer, got {ews_recalibrate_batches!r}")
    if split not in SPLITS:
        raise ValueError(f"unknown --split {split!r}; valid choices: {', '.join(SPLITS)}")
    folder = run_dir / "noise" if out is None else Path(out)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {folder}: exists and is not a folder")
    paths = [folder / name for name in OUTPUT_FILES]
    taken = [p for p in paths if p.exists()]
    if taken and not overwrite:
        raise FileExistsError(f"{taken[0]} exists; pass --overwrite to replace it (nothing was written)")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {folder}: {existing} is not writable")
    loaded = load_run(run_dir, split=split, data_root=data_root, device=device)
    calibration = None
    if alphas and ews_recalibrate_batches:
        calibration = run_training_batches(run_dir, ews_recalibrate_batches, data_root=data_root,
                                           device=loaded.data.images.device)  # fmt: skip
    result = noise_robustness(loaded.model, loaded.data, loaded.mean, loaded.std, sigmas=sigmas, protocols=protocols,
                              alphas=alphas, ews_calibration=calibration, num_steps=num_steps,
                              steps_noisy=steps_noisy, burst=burst, max_examples=max_examples, seed=seed,
                              batch_size=batch_size, amp=loaded.amp, progress=progress)  # fmt: skip
    result = {"run": run_dir.name, **result, "split": split, "ews_recalibrate_batches": ews_recalibrate_batches}
    contents = report_contents(result)
    with new_folder(folder):  # a failed write leaves neither a new empty folder nor half a report
        atomic_write_all(dict(zip(paths, contents)), overwrite=overwrite)
    return result, paths
