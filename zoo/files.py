"""zoo's files: written atomically, with one line when the disk refuses, under a lock where
several processes update one file; safetensors read without ever unpickling; the cache
folder; the one file hasher.

Every file zoo writes goes to ``.NAME.tmp-PID`` beside it, is fsynced and renamed over the
old one, so a reader (or a crash) only ever sees the old or the new file. A write the system
refuses (disk full, read-only mount, permission denied) raises `WriteFailed`, a `ZooError`
naming the file and what the system said; the temporary file is removed and the old file
stays. Callers that know what is still safe (the trainer's last save) add that to the line.

Every zoo tensor file (model, training state, concept vector, classifier, FID statistics) is
written by `write_tensors_file` and read by `read_header` / `read_tensors_file`: a safetensors
file whose header names the zoo format and the file's kind. Nothing here unpickles: every
safetensors file zoo reads is opened by `open_safetensors`, which names a pickle as such and
never loads it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from zoo.errors import ZooError, error_reason
from zoo.metadata import FORMAT_KEY, FORMAT_VERSION, KIND_KEY

try:
    import fcntl
except ImportError:  # Windows: see `exclusive_lock`
    fcntl = None

TEMPORARY_NAME = re.compile(r"\..+\.tmp-\d+")
PICKLE_PROTO = 0x80  # the first byte of every pickle of protocol 2 or later


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


def cache_dir() -> Path:
    """$ZOO_CACHE_DIR, else $XDG_CACHE_HOME/zoo, else ~/.cache/zoo; a ZooError if a file
    stands where that folder (or one of its parents) has to be."""
    if os.environ.get("ZOO_CACHE_DIR"):
        folder, origin = Path(os.environ["ZOO_CACHE_DIR"]).expanduser().resolve(), "ZOO_CACHE_DIR"
    elif os.environ.get("XDG_CACHE_HOME"):
        folder = Path(os.environ["XDG_CACHE_HOME"]).expanduser().resolve() / "zoo"
        origin = "XDG_CACHE_HOME"
    else:
        folder, origin = Path.home() / ".cache" / "zoo", "the home folder"
    blocker = next((path for path in (folder, *folder.parents) if path.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ZooError(
            f"the cache folder {folder} (from {origin}) cannot be used: {blocker} is a file, not "
            "a folder; set ZOO_CACHE_DIR to a folder"
        )
    return folder


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in chunks (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- zoo tensor files -----------------------------------------------------------------------------


def write_tensors_file(
    path: Path, kind: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Write a zoo tensor file of `kind` atomically: the tensors (moved to the CPU) and the
    header strings, with the format and kind keys that `read_header` checks."""
    cpu = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    header = {FORMAT_KEY: FORMAT_VERSION, KIND_KEY: kind, **metadata}
    atomic_write_bytes(Path(path), save(cpu, metadata=header))


def is_pickle(path: Path) -> bool:
    """Whether a file is a pickle, judged from its bytes without loading it: a pickle stream
    (first byte 0x80, the PROTO opcode of protocols 2-5) or torch.save's zip (a ``data.pkl``)."""
    try:
        with open(path, "rb") as handle:
            if handle.read(1) == bytes([PICKLE_PROTO]):
                return True
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            return any(name.rsplit("/", 1)[-1] == "data.pkl" for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


@contextmanager
def open_safetensors(path: Path, advice: str, what: str = "") -> Iterator[Any]:
    """`safe_open` for every safetensors file zoo reads, with one-line errors ending in `advice`:
    a missing file, a pickle (named as one: zoo never unpickles) or a file that is not
    safetensors. The pickle test runs only on files safetensors refused, so a valid file whose
    header length happens to start with 0x80 is never mistaken for one. `what` ("model file ")
    names the file in the missing-file message."""
    path = Path(path)
    if not path.is_file():
        state = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ZooError(f"{what}{path} {state}{advice}")
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as error:
        if is_pickle(path):
            raise ZooError(
                f"{path} is a pickle, not a safetensors file; zoo never unpickles{advice}"
            ) from None
        reason = error_reason(error)
        raise ZooError(f"{path} is not a readable safetensors file ({reason}){advice}") from None
    with handle:
        yield handle


def read_header(path: Path, kind: str, hint: str) -> dict[str, str]:
    """The metadata of a zoo safetensors file of the given kind, or a one-line error.

    `hint` ends every message with what to do instead (for example which command writes
    such a file).
    """
    path = Path(path)
    with open_safetensors(path, f"; {hint}", what=f"{kind} file ") as handle:
        metadata = handle.metadata() or {}
    version = metadata.get(FORMAT_KEY)
    if version is None:
        raise ZooError(
            f"{path} is a safetensors file but not a zoo {kind} (no {FORMAT_KEY} metadata); {hint}"
        )
    if version != FORMAT_VERSION:
        raise ZooError(
            f"{path} has zoo format {version!r}, this zoo reads format {FORMAT_VERSION!r}; "
            f"use the zoo version that wrote it"
        )
    found = metadata.get(KIND_KEY, "model")
    if found != kind:
        raise ZooError(f"{path} is a zoo {found} file, expected a zoo {kind} file; {hint}")
    return metadata


def header_shapes(path: Path, advice: str = "") -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, read from the safetensors header alone."""
    with open_safetensors(path, advice) as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118


def read_tensors(path: Path, advice: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; one-line errors end with `advice` (", do this")."""
    with open_safetensors(path, advice) as handle:
        try:
            return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            reason = error_reason(error)
            raise ZooError(
                f"{path}: cannot read tensors ({reason}); the file is truncated or damaged{advice}"
            ) from None


def read_tensors_file(path: Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a zoo file of the given kind (concept vector, ...), checked."""
    metadata = read_header(Path(path), kind, f"use a {kind} file written by zoo")
    return read_tensors(Path(path)), metadata


def shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape by name, to compare a file with what a module expects."""
    return {name: tuple(tensor.shape) for name, tensor in tensors.items()}


def check_shapes(
    expected: dict[str, tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
    path: Path,
    expected_as: str,
    advice: str = "",
) -> None:
    """Refuse a file whose tensor names or shapes differ from what `expected_as` builds."""
    problems = [
        f"{label}: {', '.join(names[:3])}"
        for label, names in (
            ("missing", [name for name in expected if name not in found]),
            ("unexpected", [name for name in found if name not in expected]),
            (
                "wrong shape",
                [name for name, shape in expected.items() if found.get(name, shape) != shape],
            ),
        )
        if names
    ]
    if problems:
        raise ZooError(
            f"{path}: tensors do not match {expected_as} ({'; '.join(problems)}); "
            f"the file is damaged or was edited{advice}"
        )


def load_matching_weights(
    module: torch.nn.Module, path: Path, expected_as: str, advice: str = ""
) -> None:
    """Load `path`'s tensors into `module`, refusing names or shapes that differ.

    `expected_as` names what the file should match ("the cvae config"); `advice`, appended
    to every error, says what to do instead.
    """
    tensors = read_tensors(path, advice)
    check_shapes(shapes(module.state_dict()), shapes(tensors), path, expected_as, advice)
    module.load_state_dict(tensors)
