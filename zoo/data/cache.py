"""The prepared cache: every image of a source decoded once into one memory-mapped uint8 file.

Training and benchmarks index this tensor directly, so an epoch decodes no JPEG. A cache
directory is keyed by the source fingerprint (image names, sizes and mtimes, label file bytes;
see `celeba.fingerprint`), image size and crop; it is built in a temp dir and renamed into
place, so a crash never leaves a half-written cache that looks complete. Processes that want
the same cache at once take turns on a file lock: one builds, the others wait and reuse it,
and a complete cache is never removed, since another process may be reading it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
from torchvision.transforms.v2.functional import to_dtype

from zoo.data import celeba
from zoo.errors import ZooError
from zoo.files import cache_dir
from zoo.progress import image_progress

if TYPE_CHECKING:
    from zoo.data.preprocess import Preprocess

try:
    import fcntl
except ImportError:  # Windows: builds stay safe without the lock, but may be done twice
    fcntl = None

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DECODE_BATCH = 256
IMAGES_FILE = "images.u8"
LABELS_FILE = "labels.safetensors"
INDEX_FILE = "index.json"
LOCK_DIR = "locks"


@dataclass
class Prepared:
    """A loaded cache: rows ordered train, valid, test so each split is a zero-copy slice."""

    name: str  # "celeba" | "synthetic-faces"
    fingerprint: str  # of the source folder: image names, sizes, mtimes and the label files
    images: torch.Tensor  # uint8 N x C x S x S, memory-mapped
    attrs: torch.Tensor  # int8 N x A, 0 / 1
    filenames: list[str]
    attr_names: list[str]
    splits: dict[str, tuple[int, int]]  # split -> [start, stop) rows


def prepare(
    root: str | Path, preprocess: Preprocess, *, strict: bool = False, progress: bool = True
) -> Path:
    """Decode every image of the CelebA-layout folder ``root`` once; return the cache dir.

    Returns at once when a complete cache for this content and preprocessing exists. Images
    that are missing or undecodable are left out and reported in one warning, or with
    ``strict`` the first one is a ZooError.
    """
    root = Path(root).resolve()
    celeba.require_layout(root)
    image_stats = celeba.scan_images(root)
    source_fingerprint = celeba.fingerprint(root, image_stats)
    name = celeba.dataset_name(root)
    target = (
        cache_dir() / "prepared" / f"{name}-{source_fingerprint[:16]}-{preprocess.image_size}px"
        f"-c{preprocess.crop_fraction:.4f}"
    )
    index = _complete_index(target, source_fingerprint, preprocess)
    if index is None:
        with build_lock(target.name) as locked:
            # another process may have published it while this one waited for the lock
            index = _complete_index(target, source_fingerprint, preprocess)
            if index is None:
                if locked:
                    _remove_killed_builds(target)
                index = _build(
                    root,
                    name,
                    image_stats,
                    source_fingerprint,
                    preprocess,
                    target,
                    strict=strict,
                    progress=progress,
                )
    _report_skipped(root, index, strict=strict)
    return target


def load_prepared(path: Path) -> Prepared:
    """Open a cache made by ``prepare``; the image tensor is memory-mapped, not read."""
    index = json.loads((path / INDEX_FILE).read_text())
    shape = index["shape"]
    count = int(np.prod(shape))
    images = (
        torch.from_file(str(path / IMAGES_FILE), shared=False, size=count, dtype=torch.uint8)
        if count
        else torch.empty(0, dtype=torch.uint8)
    ).view(*shape)
    labels = load_file(path / LABELS_FILE)
    return Prepared(
        name=index["name"],
        fingerprint=index["fingerprint"],
        images=images,
        attrs=labels["attrs"],
        filenames=index["filenames"],
        attr_names=index["attr_names"],
        splits={split: (start, stop) for split, (start, stop) in index["splits"].items()},
    )


def decode_file_bytes(data: torch.Tensor, mode: ImageReadMode) -> torch.Tensor:
    """Decode one JPEG/PNG (any content, whatever the extension) to uint8 C x H x W."""
    with quiet_image_io():
        image = decode_image(data, mode=mode, apply_exif_orientation=True)
    return image if image.dtype == torch.uint8 else to_dtype(image, torch.uint8, scale=True)


def error_text(error: Exception) -> str:
    """The useful part of a torchvision I/O error: first line, no C++ source location."""
    first_line = next(iter(str(error).splitlines()), type(error).__name__)
    return re.sub(r"^.*?\.cpp:\d+, ", "", first_line)


@contextmanager
def quiet_image_io() -> Iterator[None]:
    """Silence torchvision 0.29's per-call deprecation warning for its image codecs."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="The image decoding and encoding", category=DeprecationWarning
        )
        yield


def _complete_index(target: Path, source_fingerprint: str, preprocess: Preprocess) -> dict | None:
    """The index of a usable cache at ``target``, or None if absent, stale or damaged."""
    try:
        index = json.loads((target / INDEX_FILE).read_text())
        size = (target / IMAGES_FILE).stat().st_size
        usable = (
            index["format"] == FORMAT_VERSION
            and index["fingerprint"] == source_fingerprint
            and index["preprocess"] == preprocess.to_dict()
            and size == int(np.prod(index["shape"]))
            and (target / LABELS_FILE).is_file()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return index if usable else None


def _build(
    root: Path,
    name: str,
    image_stats: dict[str, tuple[int, int]],
    source_fingerprint: str,
    preprocess: Preprocess,
    target: Path,
    *,
    strict: bool,
    progress: bool,
) -> dict:
    """Decode, crop and resize every listed image into a fresh cache dir; return its index."""
    labels = celeba.read_labels(root)
    order = np.argsort(labels.partition, kind="stable")  # train, valid, test: contiguous splits
    skipped: list[dict[str, str]] = []
    present: list[int] = []
    for row in order.tolist():
        filename = labels.filenames[row]
        if filename in image_stats:
            present.append(row)
            continue
        if strict:
            raise ZooError(
                f"{root / celeba.IMAGE_DIR / filename} is listed in {celeba.ATTR_FILE} but "
                "missing; restore it, or load without strict to skip bad images"
            )
        skipped.append({"file": filename, "reason": "missing", "detail": "no such file"})

    target.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        kept = _decode_all(
            root,
            labels.filenames,
            present,
            preprocess,
            workdir / IMAGES_FILE,
            skipped,
            strict=strict,
            progress=progress,
        )
        kept_codes = labels.partition[kept]
        bounds = np.searchsorted(kept_codes, [0, 1, 2, 3]).tolist()
        index = {
            "format": FORMAT_VERSION,
            "name": name,
            "source": str(root),
            "fingerprint": source_fingerprint,
            "preprocess": preprocess.to_dict(),
            "shape": [len(kept), preprocess.channels, preprocess.image_size, preprocess.image_size],
            "attr_names": labels.attr_names,
            "filenames": [labels.filenames[row] for row in kept],
            "splits": {
                split: [bounds[code], bounds[code + 1]]
                for split, code in celeba.SPLIT_CODES.items()
            }
            | {"all": [0, len(kept)]},
            "skipped": skipped,
        }
        attrs = torch.from_numpy((labels.signs[kept] > 0).astype(np.int8))
        save_file(
            {"attrs": attrs, "partition": torch.from_numpy(kept_codes)}, workdir / LABELS_FILE
        )
        (workdir / INDEX_FILE).write_text(json.dumps(index))
        index = _publish(workdir, target, index, preprocess)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    logger.info("prepared %d images of %s into %s", len(kept), root, target)
    return index


def _decode_all(
    root: Path,
    filenames: list[str],
    rows: list[int],
    preprocess: Preprocess,
    out_path: Path,
    skipped: list[dict[str, str]],
    *,
    strict: bool,
    progress: bool,
) -> list[int]:
    """Stream decoded, preprocessed batches into ``out_path``; return the rows that made it."""
    kept: list[int] = []
    with (
        out_path.open("wb") as out,
        image_progress(
            f"preparing {root.name} at {preprocess.image_size}px", len(rows), progress
        ) as advance,
    ):
        for start in range(0, len(rows), DECODE_BATCH):
            batch_rows = rows[start : start + DECODE_BATCH]
            paths = [root / celeba.IMAGE_DIR / filenames[row] for row in batch_rows]
            images: list[torch.Tensor] = []
            for row, path, result in zip(batch_rows, paths, _decode_batch(paths), strict=True):
                if isinstance(result, torch.Tensor):
                    kept.append(row)
                    images.append(result)
                elif strict:
                    raise ZooError(
                        f"{path} cannot be decoded ({result}); replace it, "
                        "or load without strict to skip bad images"
                    )
                else:
                    skipped.append(
                        {"file": filenames[row], "reason": "undecodable", "detail": result}
                    )
            if images:
                out.write(_preprocess_many(images, preprocess).numpy().tobytes())
            advance(len(batch_rows))
    return kept


def _decode_batch(paths: list[Path]) -> list[torch.Tensor | str]:
    """Decode JPEGs as one list call; if any file is odd, retry one by one with any format."""
    with quiet_image_io():
        datas = [_read_or_empty(path) for path in paths]
        try:
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB))
        except RuntimeError:
            pass  # at least one file is not a plain JPEG: find which, decode the rest
        results: list[torch.Tensor | str] = []
        for data in datas:
            try:
                results.append(decode_file_bytes(data, ImageReadMode.RGB))
            except RuntimeError as error:
                results.append(error_text(error) if data.numel() else "empty or unreadable file")
        return results


def _read_or_empty(path: Path) -> torch.Tensor:
    """The file's bytes, or an empty tensor if it vanished or is unreadable (then skipped)."""
    try:
        return read_file(str(path))
    except RuntimeError as error:
        logger.debug("cannot read %s: %s", path, error)
        return torch.empty(0, dtype=torch.uint8)


def _preprocess_many(images: list[torch.Tensor], preprocess: Preprocess) -> torch.Tensor:
    """Crop and resize a batch, stacking same-sized images so each size is one resize call."""
    size = preprocess.image_size
    out = torch.empty(len(images), preprocess.channels, size, size, dtype=torch.uint8)
    groups: dict[tuple[int, ...], list[int]] = {}
    for position, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(position)
    for positions in groups.values():
        out[positions] = preprocess.apply(torch.stack([images[i] for i in positions]))
    return out


@contextmanager
def build_lock(name: str) -> Iterator[bool]:
    """Hold the lock of the cache entry ``name``, so that processes wanting it at once wait
    for one build instead of each doing it; yields whether the lock is held.

    Safety never depends on it (builds are published by an atomic rename): without fcntl
    (Windows) or on a file system that refuses locks it yields False and a build may be done
    twice. The kernel drops the lock when its process dies, so a killed build blocks no one.
    """
    with ExitStack() as stack:
        locked = False
        if fcntl is not None:
            try:
                folder = cache_dir() / LOCK_DIR
                folder.mkdir(parents=True, exist_ok=True)
                handle = stack.enter_context((folder / f"{name}.lock").open("a"))
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    logger.info("another process is preparing %s; waiting for it", name)
                    fcntl.flock(handle, fcntl.LOCK_EX)
                locked = True
            except OSError as error:
                logger.debug("preparing %s without a lock: %s", name, error)
        yield locked


def _remove_killed_builds(target: Path) -> None:
    """Delete the temp dirs of builds of ``target`` that were killed. Only call it holding the
    target's lock: every live build holds it, so no live build owns one of these."""
    for leftover in target.parent.glob(f".{target.name}.*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _publish(workdir: Path, target: Path, index: dict, preprocess: Preprocess) -> dict:
    """Rename the finished build ``workdir`` to ``target``; return the index now in place.

    A usable cache already there was published by another process (one that built without
    the lock) and may be in use: it is kept and this build dropped. An unusable one (damaged,
    or of another format) is moved aside first, as a folder cannot replace a non-empty one.
    """
    try:
        os.replace(workdir, target)
        return index
    except OSError:
        if not target.is_dir():
            raise
    existing = _complete_index(target, index["fingerprint"], preprocess)
    if existing is not None:
        logger.debug("another process prepared %s first", target)
        return existing
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.replace(target, aside / "unusable")
    os.replace(workdir, target)
    shutil.rmtree(aside, ignore_errors=True)
    return index


def _report_skipped(root: Path, index: dict, *, strict: bool) -> None:
    """One warning for all images left out (or, when strict, a ZooError for the first)."""
    skipped = index["skipped"]
    if not skipped:
        return
    first = skipped[0]
    if strict:
        raise ZooError(
            f"{root / celeba.IMAGE_DIR / first['file']} is {first['reason']} "
            f"({first['detail']}); restore it, or load without strict to skip bad images"
        )
    missing = sum(entry["reason"] == "missing" for entry in skipped)
    total = len(skipped) + index["shape"][0]
    logger.warning(
        "skipped %d of %d images in %s: %d missing, %d undecodable (first: %s: %s)",
        len(skipped),
        total,
        root / celeba.IMAGE_DIR,
        missing,
        len(skipped) - missing,
        first["file"],
        first["detail"],
    )
