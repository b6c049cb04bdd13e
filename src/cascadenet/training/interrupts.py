"""Ctrl-C and SIGTERM during training: exceptions, but never inside a critical section.

Schedulers send SIGTERM before pre-empting a job; training treats it like Ctrl-C (checkpoint the current step,
one line, then the CLI exits 143). An optimizer step and the counters that record it are a critical section: a
signal that arrives inside one waits for its end, so that an interrupted run can always save a consistent state.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["Terminated", "Interrupts", "catch_signals"]


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while training: handled like Ctrl-C (the position is checkpointed); the CLI exits 143."""


class Interrupts:
    """While training, Ctrl-C raises ``KeyboardInterrupt`` and SIGTERM ``Terminated`` (once: a second SIGTERM
    while the checkpoint is written is ignored). Inside ``critical()`` (an optimizer step and its counters, where
    weights and position disagree) they wait for its end, so that an interrupted run can always save."""

    def __init__(self) -> None:
        self.depth = 0
        self.pending: type[BaseException] | None = None
        self.terminated = False

    def handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGTERM:
            if self.terminated:
                return
            self.terminated = True
        exc = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        if self.depth:
            self.pending = self.pending or exc
            return
        raise exc

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth and self.pending is not None:
            exc, self.pending = self.pending, None
            raise exc


@contextlib.contextmanager
def catch_signals() -> Iterator[Interrupts]:
    """Install ``Interrupts`` for SIGINT and SIGTERM, where the program left them at their defaults (a program
    with its own handlers keeps them) and only in the main thread (the only one that receives signals)."""
    interrupts = Interrupts()
    installed = {}
    if threading.current_thread() is threading.main_thread():
        for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            if signal.getsignal(sig) is default:
                installed[sig] = signal.signal(sig, interrupts.handle)
    try:
        yield interrupts
    finally:
        for sig, previous in installed.items():
            signal.signal(sig, previous)
