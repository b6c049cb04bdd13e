"""Progress of long analyses as log lines (``recalibrate --batches 100000``, ``noise --burst 1000 2000``): a line
every half minute with how far it is and how long the rest will take, whether or not stderr is a terminal
(progress bars show only there)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["ProgressLog", "logged"]

log = logging.getLogger("cascadenet.progress")
EVERY_S = 30.0  # seconds between two lines
T = TypeVar("T")


class ProgressLog:
    """Counts work done out of ``total`` and logs ``what: done/total (p%) after Ns, about Ms left`` every
    ``every_s`` seconds (never for work that ends sooner)."""

    def __init__(self, total: int, what: str, every_s: float | None = None, bar: Any = None) -> None:
        self.total, self.what, self.bar = max(int(total), 1), what, bar
        self.every_s = EVERY_S if every_s is None else every_s
        self.done = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            elapsed = now - self.start
            left = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
            log.info("%s: %d/%d (%.0f%%) after %.0fs, about %.0fs left", self.what, self.done, self.total,
                     100 * self.done / self.total, elapsed, left)  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def logged(items: Iterable[T], total: int, what: str, every_s: float | None = None) -> Iterator[T]:
    """``items``, logging progress (``ProgressLog``) as they are consumed."""
    progress = ProgressLog(total, what, every_s)
    for item in items:
        yield item
        progress.update()
