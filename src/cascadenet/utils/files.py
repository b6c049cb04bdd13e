"""Writing files so that a kill or a full disk never leaves a torn one, and errors that fit on one line.

Everything is written to a temporary file in the same directory, flushed to disk and then renamed over the
target (and the directory flushed after the rename), so a kill or a power cut at any moment leaves either the
previous file or the new one, never a torn one. A writer killed mid-write leaves its temporary
(``.<name>.<pid>-<random>.tmp``); the next write of the same file removes those of dead writers, and training
removes its own when it resumes (``cascadenet.runs.lock.clean_temporaries``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

__all__ = [
    "atomic_write",
    "atomic_write_all",
    "new_folder",
    "remove_empty",
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
    atomic_write_all({path: data}, overwrite=overwrite)


def atomic_write_all(files: Mapping[str | os.PathLike, bytes], *, overwrite: bool = True) -> None:
    """Write several files as one: every file's temporary first (where a full disk or a read-only folder fails),
    then the renames. A failure leaves every old file as it was (and no temporary), never a report whose json is
    new and whose figure is old, or half of a report beside nothing.

    With ``overwrite=False`` an existing file is never replaced, even one created while writing:
    ``FileExistsError``.
    """
    written: list[tuple[Path, str]] = []
    try:
        for path, data in files.items():
            path = Path(path)
            written.append((path, _temporary(path, data)))
        for i, (path, tmp) in enumerate(written):
            if overwrite:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)  # atomic, and fails if path exists
                except FileExistsError:
                    raise FileExistsError(f"{path} exists (nothing was written)") from None
                os.unlink(tmp)
            written[i] = (path, "")
        for folder in dict.fromkeys(path.parent for path, _ in written):
            fsync_dir(folder)
        for path, _ in written:
            remove_stale_temporaries(path)
    except FileExistsError:
        _discard(written)
        raise
    except OSError as e:  # a full disk, an I/O error: nothing left behind, and the error names the target
        _discard(written)
        named = e.filename is not None and not str(e.filename).endswith(".tmp")  # _temporary's errors name the file
        raise (e if named else _named(e, _target(written))) from None
    except BaseException:
        _discard(written)
        raise


def _temporary(path: Path, data: bytes) -> str:
    """``data`` in a new temporary beside ``path``, flushed to disk; its name."""
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
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _named(e, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def _target(written: list[tuple[Path, str]]) -> Path:
    """The file an error of the renames is about (the first not yet renamed)."""
    pending = [path for path, tmp in written if tmp]
    return pending[0] if pending else written[-1][0]


def _discard(written: list[tuple[Path, str]]) -> None:
    for _, tmp in written:
        if tmp:
            Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def new_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """``folder`` made (with its missing parents) for the writes of the ``with`` block; when the block fails (a
    full disk, a refusal, Ctrl-C), the folders it made are removed again if still empty, deepest first: a command
    that fails leaves nothing new on disk, and never removes what was there before."""
    folder = Path(folder)
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", str(folder)) from None
    except OSError as e:
        raise _named(e, folder) from None
    try:
        yield folder
    except BaseException:
        remove_empty(made)
        raise


def remove_empty(folders: Sequence[str | os.PathLike]) -> None:
    """Remove each of ``folders`` (deepest first) that is empty; one that holds anything stays."""
    for folder in folders:
        with contextlib.suppress(OSError):
            os.rmdir(folder)


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
