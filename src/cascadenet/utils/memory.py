"""What a command is about to allocate, checked against the memory available before it allocates it.

A value typed by mistake (``--synthetic-size 1e10``, ``--width 1000000``, ``--num-steps 100000000``) must be one
line, not an allocation traceback, and never a process that grows until the kernel kills it (or, on a shared
machine, kills another job). The estimates are lower bounds of what the step will hold at once; a step refused
here would certainly not have fit.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

__all__ = ["MemoryEstimateError", "available_bytes", "check_fits", "format_bytes"]


class MemoryEstimateError(ValueError):
    """A step would need more memory than this machine (or this process's limits) has available."""


def available_bytes() -> int | None:
    """The memory this process can still take: the least of the machine's available memory, the cgroup's
    remaining memory, and the address-space limit (``ulimit -v``); None where none is known."""
    found = [_meminfo_available(), _cgroup_remaining(), _rlimit_remaining()]
    known = [b for b in found if b is not None]
    return min(known) if known else None


def check_fits(nbytes: float, what: str, fix: str) -> None:
    """Raise ``MemoryEstimateError`` (one line: ``what``, the estimate, what is available, ``fix``) when
    ``nbytes`` exceeds the memory available."""
    available = available_bytes()
    if available is not None and nbytes > available:
        raise MemoryEstimateError(
            f"{what} would need at least {format_bytes(nbytes)} of memory, more than the {format_bytes(available)} "
            f"available: {fix}"
        )


def format_bytes(nbytes: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{nbytes / 1e3:.3g} kB"


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_remaining() -> int | None:
    """cgroup v2's memory.max minus memory.current (v1: limit_in_bytes minus usage_in_bytes)."""
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):  # fmt: skip
        try:
            raw = Path(limit).read_text().strip()
            if raw == "max":
                return None
            cap, used = int(raw), int(Path(usage).read_text().strip())
        except (OSError, ValueError):
            continue
        if cap >= 1 << 60:  # v1's "no limit"
            return None
        return max(cap - used, 0)
    return None


def _rlimit_remaining() -> int | None:
    """``ulimit -v`` minus the address space this process already maps."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (OSError, ValueError):
        return None
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return max(soft - int(line.split()[1]) * 1024, 0)
    except (OSError, ValueError, IndexError):
        pass
    return soft
