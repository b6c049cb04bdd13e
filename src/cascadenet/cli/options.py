"""The flags that the verbs share, defined once: every verb that loads data or runs a model takes the ones that
apply to it under the same name, with the same meaning and help text."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import tyro

__all__ = ["BatchSize", "Calibrated", "DataRoot", "Device", "Progress", "RunDir", "RunDirs", "Threads", "progress_of",
           "set_threads", "tristate"]  # fmt: skip


def tristate(help: str, hint: str) -> Any:
    """A ``bool | None`` option as a flag pair, ``--x`` / ``--no-x``; left out, it stays None (the automatic
    choice, described by ``hint``). tyro would otherwise make it take a value (``--x {None,True,False}``)."""
    return Annotated[tyro.conf.DisallowNone[bool | None], tyro.conf.arg(help=help, help_behavior_hint=hint)]


RunDir = Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR")]
RunDirs = Annotated[tuple[str, ...], tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR")]

DataRoot = Annotated[str | None, tyro.conf.arg(help=(
    "Dataset folder. A run's own by default (give it if the data moved since training); for a new run, the "
    "dataset's usual place (fashion-mnist: where Debian's dataset-fashion-mnist installs it)."))]  # fmt: skip
Device = Annotated[str, tyro.conf.arg(help="cpu, cuda, cuda:N, or auto (cuda when available).")]
Threads = Annotated[int | None, tyro.conf.arg(help="CPU threads for PyTorch (torch.set_num_threads; None: PyTorch's "
                                                   "own choice).")]  # fmt: skip
BatchSize = Annotated[int, tyro.conf.arg(help="Examples per forward pass.")]
Progress = tristate("Progress bars on stderr.", "(default: when stderr is a terminal)")
Calibrated = tristate("Read the temperature-scaled exits (`cascadenet calibrate`'s temperatures.json in the run).",
                      "(default: when the run has them)")  # fmt: skip


def progress_of(flag: bool | None) -> bool:
    """--progress / --no-progress, or, left out, whether stderr is a terminal."""
    return sys.stderr.isatty() if flag is None else flag


def set_threads(threads: int | None) -> None:
    """--threads N: PyTorch's CPU threads for the whole command (None leaves PyTorch's choice)."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)
