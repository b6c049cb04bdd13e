"""Are typical examples classified sooner? Anytime behaviour of trained runs binned by typicality.

Typicality is a score per example (high: typical). It comes from a file (``--scores``: e.g. the published CIFAR
consistency scores, one per training example in the dataset's original order) or from the built-in hold-out
consistency estimator (:func:`consistency_scores`): the frequency with which small fast models trained on random
subsets of the training set that exclude an example classify it correctly (Jiang et al., ICML 2021: the
consistency score at one subset size). Published scores cover the training set only, so the split analysed is by
default the run's validation split (held out from training): its examples are mapped to their positions in the
original training set through :func:`cascadenet.data.loader.train_val_indices`.

Definitions (also in docs/properties.md, section "Typicality"):

- bins: typicality quantiles. Examples are ranked by score (the estimator breaks ties of its coarse score by the
  mean held-out probability of the label); example ``i`` goes to bin ``floor(r_i * B / N)`` where ``r_i`` is its
  0-based rank, ties averaged, so examples with the same key always share a bin (bins may then be unequal or
  empty). Bin 1 is the least typical, bin B the most.
- settle step: the first step from which the example stays correctly classified to the last step, never before
  the model's ``first_informative_exit`` (an input-independent step that happens to name the right class is not
  evidence); an example that is wrong at the last step never settles and counts as E (the number of exits), one
  past the last step: in the Spearman correlation it ties with the other never-settled examples at the bottom.
- stopping step: the confidence-threshold policy (``policies.Confidence(q)``), first step at or after
  ``first_informative_exit`` whose max softmax is ``>= q``, else the last step.
- Spearman: Pearson correlation of the ranks (ties averaged); ``None`` where one side is constant. Typical
  examples settling sooner shows as a negative correlation. Three are reported, because the plain one mostly
  measures final correctness (never-settled examples sit at E, and they are the least typical): of the raw
  score and the settle step (``spearman_score_settle``), of the bin (the score as the bins use it: ranked with
  its tie-break) and the settle step (``spearman_bin_settle``), and of the score and the settle step among the
  examples correct at the last step only (``spearman_score_settle_final_correct``; their settle step is
  observed, none is imputed).
- censored analysis: an example that never settles is censored at E (its settle step is unknown, past the last
  step), not imputed; per bin, the survival curve ``S(t)``, the fraction of the bin not yet settled after step t
  (with every censoring at the end, the Kaplan-Meier estimate is this fraction), and the mean settle step among
  the bin's examples correct at the last step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data.datasets import ImageSet, load_dataset
from ..data.loader import train_val_indices
from ..evaluation.logits import dataset_logits
from ..evaluation.policies import Confidence
from ..runs.config import CONFIG, TrainConfig
from ..runs.load import load_run
from ..utils.device import resolve_device
from ..utils.files import atomic_write_all, new_folder
from .consistency import EstimatorOptions, cached_consistency_scores, consistency_scores, fingerprint

# the report's writers (typicality_report.py); typicality() calls _figure_png by this module's name
from .typicality_report import _figure_png, format_report, format_summary

__all__ = [
    "EstimatorOptions",
    "average_ranks",
    "bin_analysis",
    "cached_consistency_scores",
    "consistency_scores",
    "format_summary",
    "quantile_bins",
    "read_scores",
    "settle_steps",
    "spearman",
    "typicality",
]

SPLITS = ("val", "test", "train")
REPORT_FILES = ("typicality.md", "typicality.json", "typicality.png")


# ---- statistics ------------------------------------------------------------------------------------------------


def average_ranks(*keys: Any) -> np.ndarray:
    """1-based ranks of the examples ordered by ``keys`` (the first key first, later keys break its ties), with
    the ranks of examples equal on every key averaged (scipy's ``rankdata(method="average")`` for one key)."""
    if not keys:
        raise ValueError("average_ranks needs at least one key")
    cols = [np.asarray(k, dtype=np.float64) for k in keys]
    n = cols[0].shape[0]
    if any(c.shape != (n,) for c in cols):
        raise ValueError(f"every key must be one-dimensional of the same length, got {[c.shape for c in cols]}")
    order = np.lexsort(tuple(reversed(cols)))  # lexsort sorts by its last key first
    stacked = np.stack([c[order] for c in cols])  # (keys, N) in sorted order
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = np.any(stacked[:, 1:] != stacked[:, :-1], axis=0)
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], n)
    ranks = np.empty(n, dtype=np.float64)
    # a group at sorted positions start..end-1 (0-based) holds 1-based ranks start+1..end: their mean
    ranks[order] = np.repeat((starts + 1 + ends) / 2, ends - starts)
    return ranks


def spearman(x: Any, y: Any) -> float | None:
    """Spearman's rank correlation of ``x`` and ``y`` (ties averaged); ``None`` when either is constant or there
    are fewer than two examples (the correlation is undefined)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"spearman needs two 1-D arrays of one length, got {x.shape} and {y.shape}")
    if x.size < 2:
        return None
    rx, ry = average_ranks(x) - (x.size + 1) / 2, average_ranks(y) - (y.size + 1) / 2
    denom = math.sqrt(float(np.dot(rx, rx)) * float(np.dot(ry, ry)))
    return None if denom == 0 else float(np.dot(rx, ry) / denom)


def quantile_bins(score: Any, bins: int, tiebreak: Any = None) -> np.ndarray:
    """Each example's typicality bin, 0 (least typical) .. ``bins - 1`` (most): ``floor((r - 1) * bins / N)``
    for the 1-based average rank ``r`` of (score, tiebreak), so examples equal on both keys share a bin."""
    score = np.asarray(score, dtype=np.float64)
    if isinstance(bins, bool) or not isinstance(bins, numbers.Integral) or bins < 1:
        raise ValueError(f"--bins must be an integer >= 1, got {bins!r}")
    if bins > score.size:
        raise ValueError(f"--bins {bins}: more bins than examples ({score.size})")
    ranks = average_ranks(score) if tiebreak is None else average_ranks(score, tiebreak)
    return np.minimum(np.floor((ranks - 1) * bins / score.size).astype(np.int64), bins - 1)


def settle_steps(correct: Any, first_step: int = 0) -> np.ndarray:
    """Per example, the first step ``t >= first_step`` from which ``correct[t:]`` is all true; ``E`` (the number
    of steps) for an example wrong at the last step. ``correct``: ``(E, N)`` booleans."""
    correct = np.asarray(correct, dtype=bool)
    if correct.ndim != 2 or correct.shape[0] == 0:
        raise ValueError(f"correct must have shape (steps, N), got {correct.shape}")
    E = correct.shape[0]
    if not 0 <= first_step < E:
        raise ValueError(f"first_step must be in [0, {E}), got {first_step}")
    # stays[t] = correct at every step from t on (a suffix AND, computed by cumulative products from the end)
    # true exactly from the settle step on, so it holds on E - settle steps
    stays = np.flip(np.cumprod(np.flip(correct, 0), axis=0), 0).astype(bool)
    return np.maximum(E - stays.sum(0), first_step).astype(np.int64)


def bin_analysis(
    probs: Any,
    labels: Any,
    bin_of: Any,
    bins: int,
    score: Any,
    *,
    thresholds: Sequence[float] = (0.9,),
    first_step: int = 0,
) -> dict[str, Any]:
    """Per typicality bin: accuracy at each step, settle step, and the confidence-threshold policy's stopping step
    and accuracy; Spearman correlations of the score with the settle and stopping steps (module docstring).

    Args:
        probs: ``(E, N, C)`` softmax outputs of every exit.
        labels: ``(N,)`` true classes.
        bin_of: ``(N,)`` bin of each example, in ``[0, bins)`` (:func:`quantile_bins`).
        bins: number of bins (a bin may be empty: its numbers are ``None``).
        score: ``(N,)`` typicality scores.
        thresholds: thresholds ``q`` of the confidence policy.
        first_step: the model's ``first_informative_exit``.
    """
    probs = torch.as_tensor(probs, dtype=torch.float32)
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    bin_of, score = np.asarray(bin_of), np.asarray(score, dtype=np.float64)
    E, N = probs.shape[:2]
    if labels_t.shape != (N,) or bin_of.shape != (N,) or score.shape != (N,):
        raise ValueError(f"labels, bins and scores must have one entry per example ({N})")
    correct = (probs.argmax(-1) == labels_t).numpy()  # (E, N)
    settle = settle_steps(correct, first_step)
    members = [np.flatnonzero(bin_of == b) for b in range(bins)]
    final = correct[-1]
    per_bin = [
        {
            "n": int(idx.size),
            "accuracy_per_step": [float(a) for a in correct[:, idx].mean(1)] if idx.size else None,
            "mean_settle_step": _mean_of(settle, idx),
            "never_settled": _mean_of((settle == E).astype(np.float64), idx),
            "mean_settle_step_final_correct": _mean_of(settle, idx[final[idx]]),
            "survival": [float((settle[idx] > t).mean()) for t in range(E)] if idx.size else None,
        }
        for idx in members
    ]  # fmt: skip
    return {
        "num_exits": E,
        "first_informative_exit": first_step,
        "accuracy_per_step": [float(a) for a in correct.mean(1)],
        "bins": per_bin,
        "threshold_policy": [_threshold_policy(q, probs, correct, score, members, first_step) for q in thresholds],
        "spearman_score_settle": spearman(score, settle),
        "spearman_bin_settle": spearman(bin_of, settle),
        "spearman_score_settle_final_correct": spearman(score[final], settle[final]) if final.sum() > 1 else None,
        "final_correct": float(final.mean()),
        "settle_step": settle.tolist(),
    }


def _mean_of(values: np.ndarray, idx: np.ndarray) -> float | None:
    """The mean of ``values`` over the examples ``idx`` (the last axis); None for no example."""
    return float(values[..., idx].mean(-1)) if idx.size else None


def _threshold_policy(
    q: float, probs: Tensor, correct: np.ndarray, score: np.ndarray, members: list[np.ndarray], first_step: int
) -> dict[str, Any]:
    """The confidence-threshold policy at ``q``: its mean stopping step and accuracy, overall and per bin, and the
    Spearman correlation of the score with the stopping step."""
    stop = Confidence(q).stopping_steps(probs, first_step).numpy()
    right = correct[stop, np.arange(correct.shape[1])].astype(np.float64)
    return {
        "threshold": float(q),
        "mean_step": float(stop.mean()),
        "accuracy": float(right.mean()),
        "spearman_score_stop": spearman(score, stop),
        "mean_step_per_bin": [_mean_of(stop.astype(np.float64), idx) for idx in members],
        "accuracy_per_bin": [_mean_of(right, idx) for idx in members],
    }


# ---- score files -------------------------------------------------------------------------------------------------


def read_scores(path: str | os.PathLike, n: int, labels: Any = None, what: str = "the dataset") -> np.ndarray:
    """Typicality scores from a user file: a ``.npy`` array, or an ``.npz`` with a ``scores`` array and optionally
    ``labels`` (checked against ``labels``, e.g. the published CIFAR consistency-score files). One finite score
    per example of ``what`` (``n`` of them), in its original order.

    Raises:
        ValueError: naming ``--scores`` and the file: missing, unreadable, wrong shape or length, not finite,
            labels that disagree.
    """
    path = Path(path)
    where = f"--scores {path}"
    if path.suffix not in (".npy", ".npz"):
        raise ValueError(f"{where}: takes a .npy file or an .npz file with a 'scores' array")
    if not path.is_file():
        raise ValueError(f"{where}: no such file")
    file_labels = None
    try:
        with open(path, "rb") as f:
            loaded = np.load(f, allow_pickle=False)
            if isinstance(loaded, np.ndarray) == (path.suffix == ".npz"):  # the content is not what the name says
                kind = "a single array (.npy)" if isinstance(loaded, np.ndarray) else "an archive of arrays (.npz)"
                raise ValueError(f"{where}: the file holds {kind}; name it by its content")
            if path.suffix == ".npz":
                if "scores" not in loaded.files:
                    raise ValueError(f"{where}: no 'scores' array (it holds {', '.join(loaded.files) or 'nothing'})")
                scores = loaded["scores"]
                file_labels = loaded["labels"] if "labels" in loaded.files else None
            else:
                scores = loaded
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:  # truncated, corrupt, foreign
        if str(e).startswith(where):
            raise
        raise ValueError(f"{where}: not a readable numpy file ({_one_line(e)})") from None
    if not isinstance(scores, np.ndarray) or scores.ndim != 1 or not np.issubdtype(scores.dtype, np.number):
        shape, dtype = getattr(scores, "shape", None), getattr(scores, "dtype", type(scores).__name__)
        raise ValueError(f"{where}: scores must be a 1-D numeric array, got shape {shape} ({dtype})")
    if scores.shape[0] != n:
        raise ValueError(
            f"{where}: {scores.shape[0]} scores but {what} has {n} examples (one score per example, in the dataset's "
            "original order)"
        )
    scores = scores.astype(np.float64)
    if not np.isfinite(scores).all():
        raise ValueError(f"{where}: {int((~np.isfinite(scores)).sum())} scores are not finite (NaN or infinite)")
    if file_labels is not None and labels is not None:
        labels = np.asarray(labels)
        if file_labels.shape != (n,):
            raise ValueError(f"{where}: labels has shape {file_labels.shape}, expected ({n},)")
        wrong = np.flatnonzero(file_labels != labels)
        if wrong.size:
            i = int(wrong[0])
            raise ValueError(
                f"{where}: its labels disagree with {what}'s at {wrong.size} of {n} examples (first at index {i}: "
                f"file {file_labels[i]}, data {labels[i]}): another dataset or another order"
            )
    return scores


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ---- runs --------------------------------------------------------------------------------------------------------


def _source_examples(run_dir: Path, split: str, data_root: str | None) -> tuple[TrainConfig, ImageSet, Tensor]:
    """The dataset split that a run's ``split`` is drawn from (the original training set for val and train, the
    test set for test) and the evaluated examples' positions in it, with the reader and options of
    ``evaluate.load_run`` (whose split the caller checks against these positions)."""
    cfg = TrainConfig.from_file(run_dir / CONFIG)
    options = {"image_size": cfg.image_size, "synthetic_size": cfg.synthetic_size, "seed": cfg.seed}
    source = load_dataset(cfg.dataset, data_root or cfg.data_root, "test" if split == "test" else "train", **options)
    if split == "test" or not 0 < cfg.val_fraction < 1:
        return cfg, source, torch.arange(len(source))
    trained, val = train_val_indices(len(source), cfg.val_fraction, cfg.seed)
    return cfg, source, val if split == "val" else trained


def _check_options(split: str, bins: Any, thresholds: Any, scores: Any, run_dirs: Sequence[Any]) -> None:
    if not run_dirs:
        raise ValueError("typicality needs at least one RUN_DIR")
    if split not in SPLITS:
        raise ValueError(f"unknown --split {split!r}; valid choices: {', '.join(SPLITS)}")
    if isinstance(bins, bool) or not isinstance(bins, numbers.Integral) or bins < 1:
        raise ValueError(f"--bins must be an integer >= 1, got {bins!r}")
    if not thresholds:
        raise ValueError("--thresholds needs at least one threshold")
    for q in thresholds:
        if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0 <= q <= 1:
            raise ValueError(f"--thresholds: each threshold must be a number in [0, 1], got {q!r}")
    if scores is not None and Path(scores).suffix not in (".npy", ".npz"):
        raise ValueError(f"--scores {scores}: takes a .npy file or an .npz file with a 'scores' array")
    if scores is not None and not Path(scores).is_file():
        raise ValueError(f"--scores {scores}: no such file")


def typicality(
    run_dirs: Sequence[str | os.PathLike],
    *,
    scores: str | os.PathLike | None = None,
    split: str = "val",
    bins: int = 5,
    thresholds: Sequence[float] = (0.9,),
    estimator: EstimatorOptions = EstimatorOptions(),  # noqa: B008 (frozen: immutable)
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    data_root: str | None = None,
    batch_size: int = 500,
    device: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Bin one split's examples by typicality and compare the runs' anytime behaviour per bin; writes
    ``typicality.md``, ``typicality.json`` and ``typicality.png`` in ``out`` and returns the JSON's content.

    Args:
        run_dirs: run directories written by ``cascadenet train``, all on the same examples of ``split`` (same
            dataset, seed and validation fraction), e.g. CascadedTD, CascadedCE and SDN.
        scores: a typicality file (:func:`read_scores`) with one score per example of the dataset split that
            ``split`` is drawn from (the training set for val and train); default: the built-in estimator.
        split: ``val`` (default: the run's held-out validation split), ``test`` or ``train``.
        bins: typicality quantile bins.
        thresholds: thresholds of the confidence policy.
        estimator: options of the built-in estimator (ignored with ``scores``).
        out: output folder (default ``<first run>/typicality``, or ``typicality-<split>`` for another split); the
            estimator's scores are cached there.
        overwrite: allow replacing the report files of an earlier call (the cache is always reused or added to).
        data_root: override the dataset location stored in the runs.
        batch_size: evaluation batch size.
        device: where the runs and the estimator run (cpu, cuda, cuda:N, auto).
        progress: progress bars.
    """
    _check_options(split, bins, thresholds, scores, run_dirs)
    paths = [Path(r) for r in run_dirs]
    out = Path(out) if out is not None else paths[0] / ("typicality" if split == "val" else f"typicality-{split}")
    existing = [out / name for name in REPORT_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace it (nothing was written)")
    dev = resolve_device(device)

    runs, (cfg, source, idx) = _load_runs(paths, split, data_root, dev)
    idx_np = idx.numpy()
    labels = source.labels[idx].numpy()
    if bins > idx_np.size:  # before the estimator's work, not after it
        raise ValueError(f"--bins {bins}: more bins than {split} examples ({idx_np.size})")

    with new_folder(out):  # a failure leaves no new empty folder (the estimator's cache, once made, stays)
        return _typicality_in(out, runs, cfg, source, idx, idx_np, labels, split, bins, thresholds, scores, estimator,
                              data_root, dev, batch_size, progress)  # fmt: skip


def _typicality_in(out: Path, runs: list, cfg: TrainConfig, source: ImageSet, idx: Tensor, idx_np: np.ndarray,
                   labels: np.ndarray, split: str, bins: int, thresholds: Sequence[float], scores: str | None,
                   estimator: EstimatorOptions, data_root: str | None, dev: torch.device, batch_size: int,
                   progress: bool) -> dict[str, Any]:  # fmt: skip
    score, tiebreak, score_source = _example_scores(scores, split, cfg, source, idx_np, estimator, out, data_root, dev,
                                                    progress)  # fmt: skip
    bin_of = quantile_bins(score, bins, tiebreak)
    bin_info = _bin_summary(score, bin_of, bins)
    run_results = _analyse_runs(runs, labels, bin_of, bins, score, thresholds, batch_size, progress)
    result = {
        "split": split,
        "dataset": cfg.dataset,
        "num_examples": int(idx.numel()),
        "scores": score_source,
        "tiebreak": None if tiebreak is None else "mean held-out probability of the label",
        "num_bins": bins,
        "thresholds": [float(q) for q in thresholds],
        "never_settled_counts_as": "E (the number of exits)",
        "bins": bin_info,
        "runs": run_results,
        "examples": {
            "index": idx_np.tolist(),
            "label": labels.tolist(),
            "score": score.tolist(),
            "bin": (bin_of + 1).tolist(),
        },  # fmt: skip
    }
    atomic_write_all({out / "typicality.json": (json.dumps(result, indent=2) + "\n").encode(),
                      out / "typicality.md": format_report(result).encode(),
                      out / "typicality.png": _figure_png(result)})  # fmt: skip
    result["out"] = str(out)
    return result


def _load_runs(
    paths: Sequence[Path], split: str, data_root: str | None, dev: torch.device
) -> tuple[list[tuple[Path, Any]], tuple[TrainConfig, ImageSet, Tensor]]:
    """Each run loaded on its ``split``, checked to hold the examples at the positions computed for them, and the
    same examples as the first run; returns the runs, and the first run's configuration, the dataset split its
    examples are drawn from and their positions in it."""
    runs, first = [], None
    for path in paths:
        loaded = load_run(path, split=split, data_root=data_root, device=str(dev))
        cfg, source, idx = _source_examples(path, split, data_root)
        data = loaded.data
        if not (torch.equal(source.labels[idx], data.labels.cpu()) and torch.equal(source.images[idx],
                                                                                   data.images.cpu())):  # fmt: skip
            raise RuntimeError(f"{path}: the {split} split's examples are not at the positions computed for them")
        if first is None:
            first = (path, cfg, source, idx)
        elif (
            cfg.dataset != first[1].dataset
            or not torch.equal(idx, first[3])
            or fingerprint(data) != fingerprint(first[2].subset(first[3]))
        ):
            raise ValueError(
                f"{path} and {first[0]} evaluate different {split} examples (dataset {cfg.dataset} vs "
                f"{first[1].dataset}, seed {cfg.seed} vs {first[1].seed}, val fraction {cfg.val_fraction} vs "
                f"{first[1].val_fraction}): typicality compares runs on the same examples"
            )
        runs.append((path, loaded))
    _, cfg, source, idx = first
    return runs, (cfg, source, idx)


def _example_scores(
    scores: str | os.PathLike | None, split: str, cfg: TrainConfig, source: ImageSet, idx: np.ndarray,
    estimator: EstimatorOptions, out: Path, data_root: str | None, dev: torch.device, progress: bool,
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:  # fmt: skip
    """The typicality of each evaluated example (at positions ``idx`` of ``source``), its tie-break (None for a
    score file) and where it came from: the score file, or the estimator (its scores cached in ``out``)."""
    tiebreak = None
    if scores is not None:
        what = f"the {cfg.dataset} {'test' if split == 'test' else 'training'} set"
        score = read_scores(scores, len(source), source.labels.numpy(), what)[idx]
        return score, tiebreak, {"kind": "file", "path": str(scores)}
    if split == "test":  # the test examples are scored by every model trained on the training set
        pool = load_dataset(cfg.dataset, data_root or cfg.data_root, "train", image_size=cfg.image_size,
                            synthetic_size=cfg.synthetic_size, seed=cfg.seed)  # fmt: skip
        found, cache, reused = cached_consistency_scores(pool, estimator, out, extra=source, device=dev,
                                                         progress=progress)  # fmt: skip
        score, tiebreak = found["extra_score"][idx], found["extra_probability"][idx]
    else:
        found, cache, reused = cached_consistency_scores(source, estimator, out, device=dev, progress=progress)
        score, tiebreak = found["score"][idx], found["probability"][idx]
    score_source = {"kind": "estimator", "options": dataclasses.asdict(estimator), "cache": str(cache),
                    "reused": reused}  # fmt: skip
    return score, tiebreak, score_source


def _bin_summary(score: np.ndarray, bin_of: np.ndarray, bins: int) -> list[dict[str, Any]]:
    """Per bin, its size and the range and mean of its scores (None for an empty bin)."""
    bin_info = []
    for b in range(bins):
        members = score[bin_of == b]
        bin_info.append({
            "bin": b + 1,
            "n": int(members.size),
            "score_min": float(members.min()) if members.size else None,
            "score_max": float(members.max()) if members.size else None,
            "score_mean": float(members.mean()) if members.size else None,
        })  # fmt: skip
    return bin_info


def _analyse_runs(
    runs: list[tuple[Path, Any]], labels: np.ndarray, bin_of: np.ndarray, bins: int, score: np.ndarray,
    thresholds: Sequence[float], batch_size: int, progress: bool,
) -> list[dict[str, Any]]:  # fmt: skip
    """Each run's exit logits on the examples, analysed per typicality bin (``bin_analysis``)."""
    names = _run_names([path for path, _ in runs])
    run_results = []
    for name, (path, loaded) in zip(names, runs):
        model = loaded.model
        logits = dataset_logits(model, loaded.data, loaded.mean, loaded.std, batch_size=batch_size, amp=loaded.amp,
                                progress=progress, desc=f"typicality {name}")  # fmt: skip
        analysis = bin_analysis(logits.softmax(-1), labels, bin_of, bins, score, thresholds=thresholds,
                                first_step=model.first_informative_exit)  # fmt: skip
        run_results.append({"name": name, "run_dir": str(path), "family": model.config.family, **analysis})
    return run_results


def _run_names(paths: Sequence[Path]) -> list[str]:
    """Run directory names, or the paths as given where two runs share a name."""
    names = [p.name or str(p) for p in paths]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths)]
