"""``cascadenet.fit``: training on data given from Python, with everything a command-line run has.

``fit(config, train_set, val_set=None)`` reads the sets once into memory (``cascadenet.data.user``: any map-style
``Dataset`` of ``(image, label)``, a ``DataLoader`` over one, or an ``ImageSet``) and runs the same training as
``cascadenet train`` (``cascadenet.training.loop.train``): a run directory with config.json, checkpoints,
metrics.jsonl, the recalibrated final weights, and a resume (``fit(config, train_set, resume=run_dir)`` with the
same data) that ends with the same weights as an uninterrupted run. With ``test_set`` it also writes eval.json.
The run records its dataset as ``python``: the command line cannot read it back, and says so in one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..data.datasets import DataError, ImageSet
from ..data.loader import normalization, train_val_split
from ..data.user import PYTHON_DATA, as_image_set
from ..runs.config import TrainConfig
from .claim import read_run
from .loop import train

__all__ = ["fit", "fit_data"]


def fit(
    config: TrainConfig | None,
    train_set: Any,
    val_set: Any = None,
    *,
    test_set: Any = None,
    resume: str | os.PathLike | None = None,
    classes: Sequence[str] | int | None = None,
    hflip: bool = True,
    progress: bool | None = True,
) -> Path:
    """Train a model on data given from Python; returns the run directory.

    Args:
        config: the run's options (``TrainConfig``; the model, epochs, loss, ...); its ``dataset`` and
            ``data_root`` are replaced by the data given here. Ignored when resuming (the run's stored options).
        train_set: the training data: a map-style dataset of ``(image, label)`` (a tensor ``(C, H, W)`` of uint8
            pixels or floats in [0, 1], an array or a PIL image), a ``DataLoader`` over one, or an ``ImageSet``.
        val_set: the validation data; default: ``config.val_fraction`` of ``train_set`` held out (seeded).
        test_set: evaluate the finished run on it (eval.json in the run directory).
        resume: continue this run directory from its last checkpoint; pass the same data.
        classes: the class names, or their number (default: ``train_set.classes``, else ``0 .. max label``).
        hflip: whether a horizontal flip keeps the class (augmentation flips only then; crops always).
        progress: progress bars and a line per epoch on stderr (a logging handler is added for the call when the
            program configured none); ``None``: bars only when stderr is a terminal.

    Raises:
        DataError: data that cannot be read (the message names the set and the item), or a resumed run's data
            that is not the data it was trained on.
        TrainingError, ValueError, CheckpointError: as ``cascadenet.training.loop.train``.
    """
    if resume is not None:
        cfg, _ = read_run(Path(resume))
    else:
        cfg = dataclasses.replace(config or TrainConfig(), dataset=PYTHON_DATA, data_root=None, stream="off")
    data = fit_data(cfg, train_set, val_set, classes=classes, hflip=hflip)
    with _visible(progress):
        if resume is not None:
            run_dir = train(resume=resume, overrides={"progress": progress}, data=data)
        else:
            run_dir = train(dataclasses.replace(cfg, progress=progress), data=data)
        if test_set is not None:
            from ..evaluation.evaluate import evaluate, format_table

            result = evaluate(run_dir, data=as_image_set(test_set, classes=data[0].classes, hflip=hflip,
                                                         name="test_set"),
                              device=cfg.device, progress=bool(progress))  # fmt: skip
            logging.getLogger(__name__).info("%s", format_table(result))
    return run_dir


def fit_data(
    cfg: TrainConfig, train_set: Any, val_set: Any = None, *, classes: Sequence[str] | int | None = None,
    hflip: bool = True,
) -> tuple[ImageSet, ImageSet, ImageSet, Any, Any]:  # fmt: skip
    """What training needs of the data given from Python: the whole training set, its training and validation
    parts (``val_set``, or ``cfg.val_fraction`` of ``train_set`` held out with ``cfg.seed``), and the per-channel
    normalisation of the training part."""
    full = as_image_set(train_set, classes=classes, hflip=hflip, name="train_set")
    if val_set is None:
        train_part, val_part = train_val_split(full, cfg.val_fraction, seed=cfg.seed)
    else:
        train_part = full
        val_part = as_image_set(val_set, classes=full.classes, hflip=hflip, name="val_set")
        if val_part.images.shape[1:] != full.images.shape[1:]:
            raise DataError(f"val_set has images of {tuple(val_part.images.shape[1:])} but train_set has "
                            f"{tuple(full.images.shape[1:])}")  # fmt: skip
        if val_part.num_classes != full.num_classes:
            raise DataError(f"val_set has {val_part.num_classes} classes but train_set has {full.num_classes}")
    mean, std = normalization(train_part)
    return full, train_part, val_part, mean, std


@contextlib.contextmanager
def _visible(progress: bool | None) -> Iterator[None]:
    """The library's per-epoch lines on stderr for the call, when asked for and the program configured no logging."""
    logger = logging.getLogger("cascadenet")
    if not progress or logger.handlers or logging.getLogger().handlers:
        yield
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
