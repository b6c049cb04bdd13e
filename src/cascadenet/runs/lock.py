"""One live process per run directory: a lock file that names its owner, and the clean-up of what a killed
writer left behind.

The lock is ``RUN/train.lock``. Whoever holds an exclusive ``flock`` on it owns the run; the file records the
owner's PID, host and start time so that a refusal can say who holds it. The kernel drops a ``flock`` when its
owner dies (kill -9 included), so a lock whose owner is gone is stale by construction: the next process takes
it over and says so. On file systems without working ``flock`` (some network mounts) the record alone decides:
a lock whose owner PID is gone on this host is stale; one held on another host is refused with the command that
removes it.

Creating a run directory is claimed the same way: a new run takes the lock first and only then looks whether the
directory is free, so two runs started at once with the same name cannot both write into it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: the record alone decides
    fcntl = None  # type: ignore[assignment]

__all__ = ["holder", "LOCK", "RunLock", "RunLockedError", "clean_temporaries", "is_temporary"]

log = logging.getLogger(__name__)

LOCK = "train.lock"


class RunLockedError(RuntimeError):
    """Another live process owns the run directory; the message names it."""


def _host() -> str:
    return socket.gethostname()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def _read_record(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 4096, 0)
        record = json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def _owner(record: dict | None) -> str:
    if record is None:
        return "another process"
    since = record.get("since")
    when = ""
    if isinstance(since, int | float):
        when = f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}"
    return f"process {record['pid']} on {record.get('host', '?')}{when}"


class RunLock:
    """The lock of one run directory, held from ``acquire`` to ``release`` (or the owner's death)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, run_dir: str | os.PathLike) -> RunLock:
        """Take the lock of ``run_dir`` (which must exist), taking over a stale one.

        Raises:
            RunLockedError: a live process holds it (the message names its PID and host).
            OSError: the directory cannot be written.
        """
        path = Path(run_dir) / LOCK
        for _ in range(10):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                lock = cls._try(path, fd)
            except BaseException:
                os.close(fd)
                raise
            if lock is not None:
                return lock
            os.close(fd)  # the file was replaced between open and lock: try the new one
        raise RunLockedError(f"{path.parent}: the lock {path} keeps changing hands; try again")

    @classmethod
    def _try(cls, path: Path, fd: int) -> RunLock | None:
        record = None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunLockedError(cls._refusal(path, _read_record(fd))) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                record = cls._check_record(path, fd)  # no working flock here: the record decides
            # the previous owner removes the file when it releases: make sure we hold the file that is there now
            try:
                if not os.path.samestat(os.fstat(fd), os.stat(path)):
                    return None
            except FileNotFoundError:
                return None
            if record is None:
                stale = _read_record(fd)
                if stale is not None and stale.get("pid") != os.getpid():
                    log.warning("%s: took over a stale lock of %s (no longer running)", path.parent, _owner(stale))
        else:
            cls._check_record(path, fd)
        mine = json.dumps({"pid": os.getpid(), "host": _host(), "since": int(time.time())}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, mine, 0)
        os.fsync(fd)
        return cls(path, fd)

    @staticmethod
    def _check_record(path: Path, fd: int) -> dict | None:
        """Without flock: refuse a lock whose owner may be alive; return the stale record otherwise."""
        record = _read_record(fd)
        if record is None or record["pid"] == os.getpid() and record.get("host") == _host():
            return record
        if record.get("host") != _host() or _alive(record["pid"]):
            raise RunLockedError(RunLock._refusal(path, record))
        log.warning("%s: took over a stale lock of %s (no longer running)", path.parent, _owner(record))
        return record

    @staticmethod
    def _refusal(path: Path, record: dict | None) -> str:
        hint = ""
        if record is not None and record.get("host") != _host():
            hint = f"; if that process is gone, remove {path}"
        return (
            f"{path.parent} is in use by {_owner(record)} (lock {path}): one process at a time trains a run; wait "
            f"for it to finish, or choose another --name or --out{hint}"
        )

    def release(self) -> None:
        """Remove the lock file (if it is still ours) and drop the lock."""
        if self._fd < 0:
            return
        try:
            if os.path.samestat(os.fstat(self._fd), os.stat(self.path)):
                self.path.unlink()
        except OSError:
            pass
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder(run_dir: str | os.PathLike) -> str | None:
    """Who trains ``run_dir`` now (``process PID on HOST since ...``), or None: a read-only probe of its lock (a
    shared, non-blocking flock, dropped at once) that writes nothing and takes nothing over."""
    path = Path(run_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None  # no lock file: nobody trains it
    try:
        record = _read_record(fd)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return None  # nobody holds it: a stale file
            except BlockingIOError:
                return _owner(record)
            except OSError:
                pass  # no working flock here: the record decides
        if record is None or (record.get("host") == _host() and not _alive(record["pid"])):
            return None
        return _owner(record)
    finally:
        os.close(fd)  # drops the shared lock too


# Temporary files that atomic_write (cascadenet.models.checkpoint) leaves when killed mid-write:
# ".<target>.<random>.tmp".
_OWNED = ("config.json", "checkpoint.pt", "metrics.jsonl", "model.safetensors")


def is_temporary(name: str, targets: tuple[str, ...] = _OWNED) -> bool:
    """Whether ``name`` is a temporary file of an atomic write of one of ``targets``."""
    return name.endswith(".tmp") and any(name.startswith(f".{t}.") for t in targets)


def clean_temporaries(run_dir: str | os.PathLike) -> list[str]:
    """Remove the temporaries of training's own files that a killed writer left (call it holding the lock);
    returns their names."""
    removed = []
    for p in Path(run_dir).iterdir():
        if is_temporary(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p.name)
    if removed:
        log.info("%s: removed %d temporary file(s) left by an interrupted write", run_dir, len(removed))
    return removed
