"""Writing files so that a kill or a full disk never leaves a torn one, and errors that fit on one line.

Everything is written to a temporary file in the same directory, flushed to disk and then renamed over the
target (and the directory flushed after the rename), so a kill or a power cut at any moment leaves either the
previous file or the new one, never a torn one. A writer killed mid-write leaves its temporary
(``.<name>.<pid>-<random>.tmp``); the next write of the same file removes those of dead writers, and training
removes its own when it resumes (``cascadenet.runs.lock.clean_temporaries``).
"""

from __future__ import annotations

import errno
import os
import tempfile
import time
from pathlib import Path

__all__ = [
    "atomic_write",
    "check_writable",
    "remove_stale_temporaries",
    "fsync_dir",
    "first_sentence",
    "check_npz_output",
]


def atomic_write(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a partial one.

    With ``overwrite=False`` an existing ``path`` is never replaced, even one created while writing:
    ``FileExistsError``.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
    except OSError as e:  # a read-only or missing folder: name the file the user asked for, not a temporary
        raise _named(e, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; give them the usual permissions
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic, and fails if path exists
            except FileExistsError:
                raise FileExistsError(f"{path} exists (nothing was written)") from None
            os.unlink(tmp)
        fsync_dir(path.parent)
        remove_stale_temporaries(path)
    except FileExistsError:
        Path(tmp).unlink(missing_ok=True)
        raise
    except OSError as e:  # a full disk, an I/O error: nothing left behind, and the error names the target
        Path(tmp).unlink(missing_ok=True)
        raise _named(e, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _named(error: OSError, path: Path) -> OSError:
    """``error`` about ``path`` (the file being written), with its errno, so that callers still tell a full disk
    from a read-only folder."""
    if error.errno is None:
        return error
    reason = "the disk is full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else error.strerror
    return OSError(error.errno, reason, str(path))


def remove_stale_temporaries(path: str | os.PathLike, min_age_s: float = 10.0) -> list[str]:
    """Remove the temporaries that killed writers of ``path`` left beside it (``.<name>.<pid>-<random>.tmp``, the
    writer's process gone, the file older than ``min_age_s``); returns their names. A live writer's is kept."""
    path = Path(path)
    removed = []
    prefix = f".{path.name}."
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(".tmp")]
    except OSError:
        return removed
    for p in candidates:
        pid = p.name[len(prefix) :].partition("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        try:
            if time.time() - p.stat().st_mtime >= min_age_s:
                p.unlink()
                removed.append(p.name)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename is durable only once its directory is); a no-op where the
    platform cannot."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EROFS):
            raise
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def first_sentence(error: BaseException) -> str:
    """The first line of an exception's message, cut at its first sentence: library messages can run to a page."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    head, dot, _ = text.partition(". ")
    return (head + dot.strip()) if dot else text


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """Refuse, before any work, a folder that ``what`` cannot be written into (a read-only file system, no
    permission): ``OSError`` naming the folder."""
    folder = Path(folder)
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        raise OSError(errno.EACCES, f"not writable, so {what} could not be written there (nothing was done)",
                      str(folder))  # fmt: skip


def check_npz_output(path: str | os.PathLike, flag: str, overwrite: bool) -> Path:
    """Refuse, before any work, an output file that could not be written or would replace a file without
    ``overwrite`` (``FileExistsError``; ``ValueError`` naming ``flag`` otherwise)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: {flag} takes a .npz file name")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it (nothing was written)")
    if not path.parent.is_dir():
        raise ValueError(f"{path}: the folder {path.parent} of {flag} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: the folder {path.parent} of {flag} is not writable")
    return path
