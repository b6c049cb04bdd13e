"""The ``cascadenet`` command's own process (imports nothing of the package, nor torch)."""

from __future__ import annotations

import os
import sys

__all__ = ["exit_if_command"]


def exit_if_command(interrupt: KeyboardInterrupt) -> None:
    """Ctrl-C while the ``cascadenet`` command is still importing (torch takes seconds): exit 130 quietly, as
    the command does once it runs, instead of a traceback of the import machinery. A library import re-raises."""
    argv = getattr(sys, "orig_argv", sys.argv)
    as_module = any(a == "-m" and b.split(".")[0] == "cascadenet" for a, b in zip(argv, argv[1:]))
    script = sys.argv[0] or ""
    running_main = (
        os.path.basename(script) == "__main__.py" and os.path.basename(os.path.dirname(script)) == "cascadenet"
    )
    if as_module or running_main or os.path.basename(script) == "cascadenet":
        raise SystemExit(130) from None
    raise interrupt
