"""The built-in hold-out consistency estimator of typicality (Jiang et al., ICML 2021: the consistency score at one
subset size): the frequency with which small fast models trained on random subsets of the training set that exclude
an example classify it correctly (:func:`consistency_scores`), cached by a key of the data and the options
(:func:`cached_consistency_scores`). ``cascadenet.properties.typicality`` bins examples by these scores."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import numbers
import os
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.datasets import ImageSet
from ..data.loader import iterate_batches, normalization
from ..utils.files import atomic_write

__all__ = ["CACHE_FORMAT", "EstimatorOptions", "cached_consistency_scores", "consistency_scores", "fingerprint"]

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class EstimatorOptions:
    """Options of the built-in hold-out consistency estimator (each is part of the cache key)."""

    folds: int = 4
    """Folds per repeat: each model trains on (folds - 1) / folds of the training set and scores the rest."""
    repeats: int = 8
    """Random fold partitions: each training example is held out (and scored) once per repeat, so the score takes
    repeats + 1 values (with 2 it was three-valued, and most examples tied at 1)."""
    epochs: int = 3
    """Training epochs of each small model."""
    model: Literal["mlp", "cnn"] = "mlp"
    """mlp: raw pixels -> hidden ReLU layer -> classes; cnn: two 3x3 conv layers (32, 64) -> global average pool."""
    hidden: int = 256
    """Width of the MLP's hidden layer."""
    batch_size: int = 128
    """Batch size of the small models' training."""
    lr: float = 1e-3
    """Adam learning rate of the small models."""
    seed: int = 0
    """Seed of the fold partitions, initialisations and batch orders."""

    def __post_init__(self) -> None:
        for name, low in (("folds", 2), ("repeats", 1), ("epochs", 1), ("hidden", 1), ("batch_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"--{_flag(name)} must be an integer >= {low}, got {value!r}")
        if self.model not in ("mlp", "cnn"):
            raise ValueError(f"--estimator-model must be mlp or cnn, got {self.model!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, numbers.Real) or not 0 < self.lr < math.inf:
            raise ValueError(f"--estimator-lr must be a number > 0, got {self.lr!r}")


def _flag(name: str) -> str:
    """The command-line flag of an estimator option (``folds`` and ``repeats`` are bare; others are prefixed)."""
    return name if name in ("folds", "repeats") else "estimator-" + name.replace("_", "-")


def _small_model(options: EstimatorOptions, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    c, h, w = input_shape
    if options.model == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(c * h * w, options.hidden), nn.ReLU(), nn.Linear(options.hidden, num_classes)
        )
    return nn.Sequential(
        nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes),
    )  # fmt: skip


def _seed(*parts: int) -> int:
    """A 63-bit seed derived from several integers (distinct tuples give unrelated seeds)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _fit(train: ImageSet, options: EstimatorOptions, num_classes: int, mean: Tensor, std: Tensor, seed: int):
    with torch.random.fork_rng(devices=[]):  # a seeded initialisation that leaves the caller's RNG alone
        torch.manual_seed(seed)
        model = _small_model(options, tuple(train.images.shape[1:]), num_classes)
    model = model.to(train.images.device)
    params = list(model.parameters())
    adam = _Adam(params, options.lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(options.epochs):
        for x, y in iterate_batches(train, options.batch_size, shuffle=True, augment=False, mean=mean, std=std,
                                    generator=g):  # fmt: skip
            loss = nn.functional.cross_entropy(model(x), y)
            grads = torch.autograd.grad(loss, params)
            adam.step(grads)
    return model.eval()


class _Adam:
    """Adam (Kingma and Ba; torch.optim.Adam's defaults: betas 0.9, 0.999, eps 1e-8, no weight decay), written out
    because the first use of any torch.optim optimizer imports torch._dynamo, which takes longer (seconds) than
    the whole estimator on a small dataset."""

    def __init__(self, params: list[Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps=1e-8):
        self.params, self.lr, self.betas, self.eps, self.t = params, lr, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, grads: Sequence[Tensor]) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-self.lr / c1)


@torch.no_grad()
def _assess(model: nn.Module, ds: ImageSet, mean: Tensor, std: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per example of ``ds``: correct (0/1) and the softmax probability of its label."""
    right, prob = [], []
    for x, y in iterate_batches(ds, 1024, shuffle=False, augment=False, mean=mean, std=std):
        p = model(x).float().softmax(-1)
        right.append((p.argmax(-1) == y).cpu())
        prob.append(p.gather(1, y[:, None])[:, 0].cpu())
    return torch.cat(right).double().numpy(), torch.cat(prob).double().numpy()


def consistency_scores(
    pool: ImageSet,
    options: EstimatorOptions = EstimatorOptions(),
    *,
    extra: ImageSet | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Hold-out consistency scores of every example of ``pool`` (a training set).

    For each of ``repeats`` seeded random partitions of ``pool`` into ``folds`` folds, a small model is trained
    on all folds but one and scores the held-out fold: each example is held out once per repeat, so its score is
    its accuracy over ``repeats`` models that never saw it (a consistency score at subset ratio
    (folds - 1) / folds). Images are normalised with the pool's per-channel statistics; no augmentation.

    Args:
        pool: the examples to score; the small models train on its other folds.
        options: folds, repeats, epochs, the small model, its optimiser and the seed.
        extra: examples outside the pool (e.g. a test split): every one of the ``folds * repeats`` models
            scores them (none trained on them).
        device: where the small models train.
        progress: a progress bar over the models.

    Returns:
        ``score`` (held-out accuracy) and ``probability`` (mean held-out softmax probability of the label; a finer
        tie-breaker for the coarse score), each ``(len(pool),)``; with ``extra``, ``extra_score`` and
        ``extra_probability`` too.
    """
    n, k = len(pool), options.folds
    if k > n:
        raise ValueError(f"--folds {k}: more folds than training examples ({n})")
    device = torch.device(device) if isinstance(device, str) else device
    num_classes = max(pool.num_classes, int(pool.labels.max()) + 1)
    mean, std = normalization(pool)
    pool = pool.to(device)
    extra = extra.to(device) if extra is not None else None
    right, prob = np.zeros(n), np.zeros(n)
    extra_right = np.zeros(len(extra)) if extra is not None else None
    extra_prob = np.zeros(len(extra)) if extra is not None else None
    bar = tqdm(total=k * options.repeats, desc="consistency estimator", disable=not progress, leave=False)
    for r in range(options.repeats):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(options.seed, r)))
        folds = perm.tensor_split(k)
        for f in range(k):
            held = folds[f].sort().values
            train_idx = torch.cat([folds[j] for j in range(k) if j != f]).sort().values
            model = _fit(pool.subset(train_idx), options, num_classes, mean, std, _seed(options.seed, r, f))
            c, p = _assess(model, pool.subset(held), mean, std)
            right[held.numpy()] += c
            prob[held.numpy()] += p
            if extra is not None:
                c, p = _assess(model, extra, mean, std)
                extra_right += c
                extra_prob += p
            bar.update()
    bar.close()
    out = {"score": right / options.repeats, "probability": prob / options.repeats}
    if extra is not None:
        out["extra_score"] = extra_right / (k * options.repeats)
        out["extra_probability"] = extra_prob / (k * options.repeats)
    return out


def fingerprint(ds: ImageSet) -> str:
    """A digest of a dataset: its images' shape, its name, its images and its labels."""
    h = hashlib.sha256()
    h.update(repr((tuple(ds.images.shape), ds.name)).encode())
    h.update(ds.images.cpu().contiguous().numpy().tobytes())
    h.update(ds.labels.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cached_consistency_scores(
    pool: ImageSet,
    options: EstimatorOptions,
    cache_dir: str | os.PathLike,
    *,
    extra: ImageSet | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[dict[str, np.ndarray], Path, bool]:
    """:func:`consistency_scores`, stored in ``cache_dir/consistency-<key>.npz`` and reused when the key matches.

    The key is a hash of the dataset (the pool's images and labels, and ``extra``'s when given) and every
    estimator option, so any change recomputes (into another file: the previous one stays for a later reuse).
    The scores cover the whole pool, so the val and train splits of runs on the same training set share them.

    Returns:
        (the scores, the cache file, whether it was reused).
    """
    key = {
        "format": CACHE_FORMAT,
        "dataset": pool.name,
        "pool": fingerprint(pool),
        "extra": None if extra is None else fingerprint(extra),
        "options": dataclasses.asdict(options),
    }
    text = json.dumps(key, sort_keys=True)
    path = Path(cache_dir) / f"consistency-{hashlib.sha256(text.encode()).hexdigest()[:16]}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as stored:
                found = {name: stored[name] for name in stored.files}
            if str(found.pop("key")) == text and len(found["score"]) == len(pool):
                log.info("consistency scores reused from %s", path)
                return found, path, True
            warnings.warn(f"{path}: another key than its name says; recomputing it", stacklevel=2)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # truncated or foreign:
            # compute it again
            warnings.warn(f"{path}: unreadable cache ({e}); recomputing it", stacklevel=2)
    scores = consistency_scores(pool, options, extra=extra, device=device, progress=progress)
    buffer = io.BytesIO()
    np.savez(buffer, key=np.array(text), **scores)
    atomic_write(path, buffer.getvalue())
    return scores, path, False
