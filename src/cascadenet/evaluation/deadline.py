"""Deadlines in wall-clock time for step-by-step anytime prediction.

``cascadenet.predict(model, x, deadline=seconds)`` runs ``model.anytime(x)`` one step at a time and, before each
step, asks a :class:`Deadline` whether that step would finish in time. The estimate comes from the step times
measured so far in the same call: the seconds per unit of work (the step's multiply-accumulates per example times
the examples still running) of the steps that did work, times the next step's work. A step that does no work
(input-independent states) is estimated at zero. The clock is injectable, so tests are exact.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

__all__ = ["Deadline"]


class Deadline:
    """A wall-clock deadline ``seconds`` from now, with the step times measured against it.

    Args:
        seconds: time allowed from the construction (``> 0``; ``math.inf`` never stops).
        clock: a function returning seconds (default ``time.perf_counter``); called once here and once per
            ``done`` call, never anywhere else.
    """

    def __init__(self, seconds: float, clock: Callable[[], float] | None = None) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            raise ValueError(f"deadline must be a positive number of seconds, got {seconds!r}")
        self.clock = clock or time.perf_counter
        self.start = self.clock()
        self.end = self.start + float(seconds)
        self.now = self.start
        self.work = 0.0  # work of the measured steps that did work
        self.busy = 0.0  # their seconds
        self.longest = 0.0  # the longest measured step (the estimate before any step did work)

    def done(self, work: float) -> None:
        """A step that did ``work`` (MACs per example x examples) has just finished."""
        now = self.clock()
        seconds = max(now - self.now, 0.0)
        self.now = now
        self.longest = max(self.longest, seconds)
        if work > 0:
            self.work += work
            self.busy += seconds

    def estimate(self, work: float) -> float:
        """Seconds a step of ``work`` is expected to take, from the steps measured so far."""
        if work <= 0:
            return 0.0
        if self.work > 0:
            return self.busy / self.work * work
        return self.longest

    def fits(self, work: float) -> bool:
        """Would a step of ``work`` started now finish by the deadline?"""
        return math.isinf(self.end) or self.now + self.estimate(work) <= self.end

    @property
    def elapsed(self) -> float:
        """Seconds from the start to the last measurement."""
        return self.now - self.start
