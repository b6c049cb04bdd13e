"""The ``cascadenet`` command: a thin layer that parses options (tyro, from dataclasses) and calls the library.

    cascadenet train --dataset fashion-mnist --model resnet18 --width 16 --loss td --lam 0.5
    cascadenet train --resume runs/resnet18-td-fashion-mnist-s0
    cascadenet eval runs/resnet18-td-fashion-mnist-s0 [--scheme serial] [--save-logits logits.npz]
    cascadenet predict runs/resnet18-td-fashion-mnist-s0 --threshold 0.9 -o predictions.npz   # early exit
    cascadenet recalibrate runs/resnet18-td-fashion-mnist-s0 [--batches 4]    # batch-norm statistics at the weights
    cascadenet ood runs/resnet18-td-fashion-mnist-s0 [--holdout] [--ood-dataset cifar10 --ood-data DIR]
    cascadenet noise runs/resnet18-td-fashion-mnist-s0 --sigmas 0.1 0.2 0.4    # persistent and transient noise
    cascadenet plot runs/a runs/b -o speed_accuracy.png
    cascadenet policy runs/a runs/b --out stopping    # stopping policies fitted on val, compared on test
    cascadenet demo
    cascadenet reproduce --dataset fashion-mnist --seeds 3 --budget small
    cascadenet models
    cascadenet convert resnet18.pth -o resnet18-cascade.safetensors    # a torchvision ResNet, then --init it
    cascadenet typicality runs/td runs/ce [--scores cifar10-cscores-orig-order.npz]   # typical examples sooner?

One convention for every verb: the shared flags (--data-root, --batch-size, --device, --threads, --progress:
``cli.options``) wherever they apply; booleans as --flag/--no-flag pairs; a file the user names is never
replaced without --overwrite. User errors (a bad command line, bad options, missing or malformed data, unusable
or busy run directories, unwritable folders, a full disk, an existing output) print one line and exit 2; a run
interrupted by Ctrl-C exits 130 and one stopped by SIGTERM exits 143, both after saving a checkpoint; output cut
short by its reader (``| head``) exits 141, quietly. The library reports progress through ``logging``; this
module sends it to stderr.

The modules: ``parsing`` (tyro, one-line errors), ``commands`` (the verbs), one module per group of verbs
(``train``, ``evaluation``, ``properties``, ``experiments``, ``models``), ``options`` (the shared flags),
``model_flags`` (the model flags of the registered families, ``given_options``).
"""

from __future__ import annotations

try:  # tyro and the verbs' imports take a moment too
    import logging
    import os
    import sys
    from collections.abc import Sequence
    from typing import Any

    from ..data.datasets import DataError
    from ..models.checkpoint import CheckpointError
    from ..runs.lock import RunLockedError
    from ..training.interrupts import Terminated
    from ..training.loop import TrainingError
    from .model_flags import given_options
    from .options import set_threads
    from .parsing import parse
    from .train import TrainCommand, run_train
except KeyboardInterrupt as _interrupt:
    from ..utils.command import exit_if_command  # imported here: an interrupt may have cut its own import short

    exit_if_command(_interrupt)

__all__ = ["main", "given_options"]

# what a user can get wrong; anything else is a bug, and its traceback is wanted
USER_ERRORS = (ValueError, DataError, CheckpointError, TrainingError, RunLockedError, OSError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cascadenet`` command; returns the exit status."""
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        _configure_logging()
        argv = import_user_code(argv)
        cmd = parse(argv)
        if cmd is not None:
            _run(cmd, argv)
        sys.stdout.flush()  # a reader gone away (`| head`) shows here, where it is handled, not at exit
    except BrokenPipeError:
        _quiet_stdout()
        return 141  # 128 + SIGPIPE, as a shell reports a tool whose reader went away
    except USER_ERRORS as e:
        _report(e)
        return 2
    except Terminated:
        return 143  # 128 + SIGTERM, as a shell reports a process that SIGTERM ended
    except KeyboardInterrupt:
        return 130
    return 0


def import_user_code(argv: list[str]) -> list[str]:
    """``cascadenet --import MODULE [--import MODULE ...] VERB ...``: import the user's modules (which may register
    model families, or hold the builder of a cascaded network, ``cascadenet.cascade``) before the verb runs; the
    current directory is searched first, as ``python -m`` does. Returns the line without those options.

    Raises:
        ValueError: a module that cannot be imported (one line naming it).
    """
    import importlib

    rest = list(argv)
    while rest and (rest[0] == "--import" or rest[0].startswith("--import=")):
        if rest[0] == "--import":
            if len(rest) < 2 or rest[1].startswith("-"):
                raise ValueError("--import needs a module name (cascadenet --import MODULE VERB ...)")
            name, rest = rest[1], rest[2:]
        else:
            name, rest = rest[0].partition("=")[2], rest[1:]
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ValueError(f"--import {name}: cannot import it ({' '.join(str(e).split())})") from None
    return rest


def _run(cmd: Any, argv: Sequence[str]) -> None:
    set_threads(getattr(cmd, "threads", None))  # for the whole command, whichever library function runs
    if isinstance(cmd, TrainCommand):
        run_train(cmd, argv[1:])  # train compares the options typed on the line with a resumed run's
    else:
        cmd.run()


def _report(e: BaseException) -> None:
    if rank() == 0:
        print(f"cascadenet: error: {_one_line(e)}", file=sys.stderr)
    elif not getattr(e, "reported_by_rank0", False):  # under torchrun: an error of this process alone
        print(f"cascadenet: error: process {rank()}: {_one_line(e)}", file=sys.stderr)


def rank() -> int:
    """This process's rank under torchrun (0 otherwise)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _one_line(e: BaseException) -> str:
    """An error as one line; an OSError as 'path: reason' (a full disk, a read-only folder, a file in the way)."""
    if isinstance(e, OSError) and e.strerror:
        text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    else:
        text = str(e) or type(e).__name__
    return " ".join(line.strip() for line in text.strip().splitlines())


def _quiet_stdout() -> None:
    """Point stdout at /dev/null once its reader has gone, so that the interpreter's last flush at exit does not
    report the broken pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # a stand-in stdout without a file descriptor (tests)
        pass


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at each message (not the one of the first call: callers such as test
    runners replace it)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging() -> None:
    """The library's INFO messages (epoch summaries, resume and interrupt notices) as plain lines on stderr."""
    logger = logging.getLogger("cascadenet")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


if __name__ == "__main__":
    sys.exit(main())
