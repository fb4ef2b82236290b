"""Writing files: atomically, with one line when the disk refuses, and under a lock where
several processes update one file.

Every file zoo writes goes to ``.NAME.tmp-PID`` beside it, is fsynced and renamed over the
old one, so a reader (or a crash) only ever sees the old or the new file. A write the system
refuses (disk full, read-only mount, permission denied) raises `WriteFailed`, a `ZooError`
naming the file and what the system said; the temporary file is removed and the old file
stays. Callers that know what is still safe (the trainer's last save) add that to the line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from zoo.errors import ZooError

try:
    import fcntl
except ImportError:  # Windows: see `exclusive_lock`
    fcntl = None

TEMPORARY_NAME = re.compile(r"\..+\.tmp-\d+")


class WriteFailed(ZooError):
    """The system refused a write; ``str()`` is one line naming the file and the reason."""

    def __init__(self, path: Path, error: OSError) -> None:
        self.path = Path(path)
        self.errno = error.errno
        reason = error.strerror or str(error) or type(error).__name__
        code = errno.errorcode.get(error.errno or 0)
        super().__init__(f"cannot write {path}: {reason}" + (f" ({code})" if code else ""))

    def advice(self) -> str:
        """What to do about it, by the system's reason."""
        if self.errno in (errno.ENOSPC, errno.EDQUOT):
            return "free some disk space"
        if self.errno == errno.EROFS:
            return "the file system is read-only; remount it writable or copy the folder"
        if self.errno in (errno.EACCES, errno.EPERM):
            return f"make {self.path.parent} writable"
        return "fix the cause above"


def temporary_path(path: Path) -> Path:
    """Where a write goes before its rename: ``.NAME.tmp-PID`` beside the file."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete the ``.NAME.tmp-PID`` files that killed writes left in ``folder`` (nothing else)."""
    stale = [p for p in folder.iterdir() if p.is_file() and TEMPORARY_NAME.fullmatch(p.name)]
    for path in stale:
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            raise WriteFailed(path, error) from None
    return stale


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` so that readers only ever see the old or the new content."""
    path = Path(path)
    temporary = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        raise WriteFailed(path, error) from None
    finally:
        with contextlib.suppress(OSError):  # a read-only folder holds no temporary file
            temporary.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def append_text(path: Path, text: str) -> None:
    """Append to a log (``metrics.jsonl``) and flush it; `WriteFailed` when refused. The line
    is written in one call, so a kill leaves whole lines (a cut line is skipped on reading)."""
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as error:
        raise WriteFailed(Path(path), error) from None


def _lock_file(path: Path) -> BinaryIO:
    """``path`` opened (created if missing) to hold a lock on; a refusal is a `WriteFailed`."""
    try:
        return open(path, "a+b")  # the caller closes it to release the lock
    except OSError as error:
        raise WriteFailed(Path(path), error) from None


def hold_lock(path: Path) -> BinaryIO | None:
    """Take an exclusive lock on ``path`` (created if missing) without waiting: the open file
    that holds it (closing it, or the process ending however it ends, releases it), or None
    while another process holds it. Without fcntl (Windows) the file is returned unlocked."""
    handle = _lock_file(path)
    if fcntl is not None:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        except OSError:  # a file system without locks: nothing to coordinate with
            pass
    return handle


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) while the block runs, so that
    processes updating one file take turns (read, change, write). The kernel drops the lock
    when its process dies, so a killed process blocks no one. Windows locks the first byte."""
    handle = _lock_file(path)
    try:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        else:  # pragma: no cover (Windows)
            import msvcrt

            msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
        yield
    finally:
        handle.close()  # closing releases the lock
