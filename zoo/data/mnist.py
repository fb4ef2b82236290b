"""MNIST from its original IDX files (gzipped or not), for the seed's 2-D latent VAE.

Small enough to read whole into memory on every load, so there is no cache. The shared copy
holds only the 10,000-image test set; asking for the training split then falls back to it with
one warning instead of failing, because that is all most machines here have.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from zoo.errors import ZooError

logger = logging.getLogger(__name__)

IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
PARTS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class Digits:
    """The raw digits of one split, before preprocessing."""

    images: torch.Tensor  # uint8 N x 1 x 28 x 28
    labels: torch.Tensor  # int64 N, 0..9
    filenames: list[str]  # "<file prefix>-<index>", e.g. "t10k-00042"
    fingerprint: str  # sha256 of the IDX files used


def find_part(root: Path, part: str) -> tuple[Path, Path] | None:
    """(images, labels) files of ``part`` ("train" / "test"), each plain or .gz, or None."""
    found = []
    for stem in PARTS[part]:
        candidates = [root / stem, root / f"{stem}.gz"]
        existing = [path for path in candidates if path.is_file()]
        if not existing:
            return None
        found.append(existing[0])
    return found[0], found[1]


def require_folder(root: Path) -> None:
    """Raise a ZooError unless ``root`` holds at least one complete pair of IDX files."""
    if not root.is_dir():
        raise ZooError(
            f"MNIST folder {root} does not exist; point --data mnist:DIR at the IDX files"
        )
    if find_part(root, "train") is None and find_part(root, "test") is None:
        raise ZooError(
            f"{root} is not an MNIST folder: {PARTS['test'][0]}[.gz] and "
            f"{PARTS['test'][1]}[.gz] (or the train-* pair) are missing; point --data mnist:DIR "
            "at a folder with the original IDX files"
        )


def load(root: Path, split: str) -> Digits:
    """Read a split: train = train-* files, test = t10k-*, all = both. No valid split exists."""
    if split == "valid":
        raise ZooError("MNIST has no valid split; use train, test or all")
    require_folder(root)
    train, test = find_part(root, "train"), find_part(root, "test")
    if split == "test" or train is None:
        if test is None:
            raise ZooError(
                f"{root / PARTS['test'][0]}[.gz] is missing; put the MNIST t10k files there"
            )
        if split != "test":
            logger.warning(
                "MNIST training files (%s[.gz], %s[.gz]) are missing in %s; using the "
                "t10k test set instead",
                *PARTS["train"],
                root,
            )
        chosen = [("t10k", test)]
    else:
        chosen = [("train", train)]
        if split == "all" and test is not None:
            chosen.append(("t10k", test))

    images, labels, filenames = [], [], []
    digest = hashlib.sha256()
    for prefix, (images_path, labels_path) in chosen:
        part_images = _read_idx(images_path, IMAGES_MAGIC)
        part_labels = _read_idx(labels_path, LABELS_MAGIC)
        digest.update(images_path.read_bytes() + labels_path.read_bytes())
        if len(part_labels) != len(part_images):
            raise ZooError(
                f"{labels_path} has {len(part_labels)} labels but {images_path} has "
                f"{len(part_images)} images; use matching MNIST files"
            )
        if part_labels.size and part_labels.max() > 9:
            raise ZooError(f"{labels_path} has label {part_labels.max()}; MNIST labels are 0-9")
        images.append(part_images)
        labels.append(part_labels)
        filenames += [f"{prefix}-{i:05d}" for i in range(len(part_images))]

    return Digits(
        images=torch.from_numpy(np.concatenate(images)).unsqueeze(1),
        labels=torch.from_numpy(np.concatenate(labels).astype(np.int64)),
        filenames=filenames,
        fingerprint=digest.hexdigest(),
    )


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """The uint8 array of an IDX file, with its magic number and size checked."""
    raw = path.read_bytes()
    kind = "image" if magic == IMAGES_MAGIC else "label"
    try:
        data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error) as error:
        raise ZooError(f"{path} is a damaged gzip file ({error}); download it again") from None
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ZooError(
            f"{path} is not an MNIST {kind} file: magic number {found} (expected {magic}); "
            "use the original IDX files"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if len(data) != header + int(np.prod(dims)):
        raise ZooError(
            f"{path} is truncated or malformed: its header says {'x'.join(map(str, dims))} "
            f"but it holds {len(data) - header} data bytes; use the original IDX files"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
