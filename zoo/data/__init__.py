"""Datasets as uint8 tensors with 0/1 attribute labels, from CelebA, synthetic faces or MNIST.

``load_data`` loads a split of a source (``resolve_source``: --data, $ZOO_DATA, ./data/celeba or
the synthetic faces; resolve once per command and pass the `Source` on), preparing (once) a
memory-mapped cache, and returns an ``ImageData`` whose batches are float images in [0, 1].
``checkpoint_data`` answers "the data this checkpoint was trained on, or --data, at its
preprocessing" for the latent tools and the benchmarks. The submodules are leaves; this
module assembles them.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torchvision.io import ImageReadMode

from zoo.data import cache, celeba, mnist, synth
from zoo.data.preprocess import Preprocess
from zoo.errors import ZooError
from zoo.files import cache_dir
from zoo.settings import IMAGE_SIZE, MNIST_IMAGE_SIZE, SPLITS

if TYPE_CHECKING:
    from zoo.metadata import CheckpointInfo

__all__ = [
    "ImageData",
    "Preprocess",
    "held_out_split",
    "load_data",
    "load_image_file",
    "resolve_source",
]

logger = logging.getLogger(__name__)

DEFAULT_CELEBA = Path("data") / "celeba"
SYNTHETIC_COUNT = 12_000
SYNTHETIC_SIZE = 64


@dataclass
class ImageData:
    """A split of a dataset as tensors; batches are gathered by index, no per-item Python."""

    images: torch.Tensor = field(repr=False)  # uint8 N x C x H x W, maybe memory-mapped
    attrs: torch.Tensor = field(repr=False)  # float32 N x A, exactly 0.0 / 1.0
    attr_names: list[str]
    filenames: list[str] = field(repr=False)
    name: str
    root: str
    split: str
    fingerprint: str
    preprocess: Preprocess

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(
        self,
        index: torch.Tensor,
        device: torch.device | str | None = None,
        flip: bool | torch.Tensor = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images in [0, 1] and attributes for ``index``.

        ``flip=True`` mirrors each image with probability 0.5 using torch's global RNG, so
        training stays reproducible under ``torch.manual_seed``; a bool tensor (one per index)
        names the images to mirror instead. Conversion to float happens after the transfer, so
        a GPU receives a quarter of the bytes.
        """
        images = self.images[index]
        if flip is True:
            flip = torch.rand(images.shape[0]) < 0.5
        if isinstance(flip, torch.Tensor):
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        attrs = self.attrs[index]
        if device is not None:
            if torch.device(device).type == "cuda":  # page-locked: the copy runs asynchronously
                images, attrs = images.pin_memory(), attrs.pin_memory()
            images = images.to(device, non_blocking=True)
            attrs = attrs.to(device, non_blocking=True)
        return images.float().div_(255), attrs

    @property
    def source(self) -> Source:
        """Where this data came from, to load another split without resolving again."""
        return Source("mnist" if self.name == "mnist" else "celeba", Path(self.root))

    def labels(self, names: list[str]) -> torch.Tensor:
        """The attributes ``names`` in that order (a model's, which may be a subset): how a
        conditional model is fed labels of data that holds more attributes, in any order."""
        missing = [name for name in names if name not in self.attr_names]
        if missing:
            raise ZooError(
                f"data at {self.root} lacks attributes the model was trained with: "
                f"{', '.join(missing[:5])}; use the data the model was trained on (--data)"
            )
        return self.attrs[:, [self.attr_names.index(name) for name in names]]

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable identity of the data, for run configs and benchmark reports."""
        return {
            "name": self.name,
            "root": self.root,
            "split": self.split,
            "fingerprint": self.fingerprint,
            "n": len(self),
            "attr_names": list(self.attr_names),
            "preprocess": self.preprocess.to_dict(),
        }


class Source(NamedTuple):
    """A resolved data source: a CelebA-layout folder or a folder of MNIST IDX files."""

    kind: str  # celeba | mnist
    root: Path

    @property
    def default_image_size(self) -> int:
        return MNIST_IMAGE_SIZE if self.kind == "mnist" else IMAGE_SIZE


def resolve_source(spec: str | Source | None, *, progress: bool = True) -> Source:
    """Where the data lives: ``spec`` (--data), else $ZOO_DATA, else ./data/celeba, else the
    built-in synthetic faces (generated once into the cache dir, with a one-line notice).

    ``mnist:DIR`` is MNIST; any other folder must have the CelebA layout. A folder named
    explicitly that is not usable is a ZooError, never a silent fallback. Resolve once per
    command and pass the `Source` on: it is also a valid ``spec``.
    """
    if isinstance(spec, Source):
        return spec
    given = spec or os.environ.get("ZOO_DATA") or None
    if given is not None:
        if given.startswith("mnist:"):
            if given == "mnist:":
                raise ZooError("--data mnist: needs a folder, e.g. --data mnist:data/mnist")
            folder = Path(given.removeprefix("mnist:")).expanduser().resolve()
            mnist.require_folder(folder)
            return Source("mnist", folder)
        folder = Path(given).expanduser().resolve()
        celeba.require_layout(folder)
        return Source("celeba", folder)

    default = DEFAULT_CELEBA.resolve()
    missing = celeba.missing_parts(default)
    if not missing:
        return Source("celeba", default)
    return Source("celeba", _synthetic_fallback(default, missing, progress=progress))


def checkpoint_source(
    info: CheckpointInfo, override: str | None, *, progress: bool = True
) -> Source:
    """Where the data a checkpoint was trained on is now: ``override`` (--data) wins, then the
    folder the checkpoint records if it still exists, then the usual resolution (a benchmark
    says when the data it measured is not the recorded data)."""
    root = info.data.get("root")
    if override or not root or not Path(root).exists():
        return resolve_source(override, progress=progress)
    return resolve_source(f"mnist:{root}" if info.data.get("name") == "mnist" else root)


def checkpoint_data(
    info: CheckpointInfo,
    split: str,
    override: str | None = None,
    *,
    source: Source | None = None,
    progress: bool = True,
) -> ImageData:
    """One split of the data a checkpoint was trained on (or ``override``), preprocessed as the
    model was trained. Pass ``source`` (from `checkpoint_source`) to resolve once for several
    splits."""
    source = source or checkpoint_source(info, override, progress=progress)
    image_size = Preprocess.from_dict(info.preprocess).image_size
    return load_data(source, split, image_size, progress=progress)


def load_data(
    spec: str | Source | None = None,
    split: str = "train",
    image_size: int = 64,
    *,
    attributes: list[str] | None = None,
    strict: bool = False,
    progress: bool = True,
) -> ImageData:
    """Load one split of the resolved source at ``image_size``, optionally a subset of
    attributes. CelebA-layout sources go through the prepared cache (built on first use)."""
    if split not in SPLITS:
        raise ZooError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    kind, root = resolve_source(spec, progress=progress)
    if kind == "mnist":
        return _load_mnist(root, split, image_size, attributes)

    preprocess = Preprocess(image_size, celeba.CELEBA_CROP, 3)
    prepared_dir = cache.prepare(root, preprocess, strict=strict, progress=progress)
    prepared = cache.load_prepared(prepared_dir)
    start, stop = prepared.splits[split]
    if start == stop:
        _raise_empty_split(root, split, prepared.splits)
    attrs, attr_names = _select_attributes(
        prepared.attrs[start:stop], prepared.attr_names, attributes, root
    )
    return ImageData(
        images=prepared.images[start:stop],
        attrs=attrs,
        attr_names=attr_names,
        filenames=prepared.filenames[start:stop],
        name=prepared.name,
        root=str(root),
        split=split,
        fingerprint=prepared.fingerprint,
        preprocess=preprocess,
    )


def held_out_split(source: Source, image_size: int, *, progress: bool = True) -> str:
    """``test`` when the source has test images, else ``valid``: what the benchmarks score by
    default, so no number is measured on images anything was tuned on when it can be avoided."""
    if source.kind == "mnist":
        return "test"
    preprocess = Preprocess(image_size, celeba.CELEBA_CROP, 3)
    prepared = cache.load_prepared(cache.prepare(source.root, preprocess, progress=progress))
    start, stop = prepared.splits["test"]
    return "test" if stop > start else "valid"


def load_image_file(path: str | Path, preprocess: Preprocess) -> torch.Tensor:
    """A user's JPEG or PNG as float C x S x S in [0, 1], preprocessed like the training data."""
    path = Path(path).expanduser()
    try:
        data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    except OSError as error:
        raise ZooError(f"cannot read image {path}: {error.strerror}; check the path") from None
    mode = ImageReadMode.RGB if preprocess.channels == 3 else ImageReadMode.GRAY
    try:
        image = cache.decode_file_bytes(data, mode)
    except RuntimeError as error:
        raise ZooError(
            f"{path} is not a readable image ({cache.error_text(error)}); use a JPEG or PNG file"
        ) from None
    return preprocess.apply(image).float().div_(255)


def _synthetic_fallback(default: Path, missing: list[str], *, progress: bool) -> Path:
    """Generate (once) and announce the built-in synthetic faces."""
    count_text = os.environ.get("ZOO_SYNTHETIC_N", str(SYNTHETIC_COUNT))
    if not count_text.isdigit() or int(count_text) < 10:
        raise ZooError(f"ZOO_SYNTHETIC_N={count_text!r} must be a whole number >= 10")
    count = int(count_text)
    folder = cache_dir() / f"synthetic-faces-v{synth.VERSION}-n{count}-s{SYNTHETIC_SIZE}-seed0"
    with cache.build_lock(folder.name):  # commands started at once draw the faces once
        synth.write_synthetic(folder, count, SYNTHETIC_SIZE, 0, progress=progress)
    reason = "does not exist" if not default.exists() else f"has no {missing[0]}"
    logger.warning(
        "no CelebA found (%s %s): using %d built-in synthetic faces from %s; "
        "pass --data DIR or set ZOO_DATA to a CelebA folder for real faces",
        default,
        reason,
        count,
        folder,
    )
    return folder


def _load_mnist(root: Path, split: str, image_size: int, attributes: list[str] | None) -> ImageData:
    """MNIST in memory (small), resized once; labels as one-hot attributes "0".."9"."""
    digits = mnist.load(root, split)
    preprocess = Preprocess(image_size, 1.0, 1)
    attrs, attr_names = _select_attributes(
        torch.nn.functional.one_hot(digits.labels, 10).to(torch.int8),
        [str(digit) for digit in range(10)],
        attributes,
        root,
    )
    return ImageData(
        images=preprocess.apply(digits.images),
        attrs=attrs,
        attr_names=attr_names,
        filenames=digits.filenames,
        name="mnist",
        root=str(root),
        split=split,
        fingerprint=digits.fingerprint,
        preprocess=preprocess,
    )


def _select_attributes(
    attrs: torch.Tensor, names: list[str], wanted: list[str] | None, root: Path
) -> tuple[torch.Tensor, list[str]]:
    """float 0/1 attributes restricted to ``wanted`` (in that order); ZooError on unknown names."""
    if wanted is None:
        return attrs.float(), list(names)
    columns = []
    for attribute in wanted:
        if attribute not in names:
            close = difflib.get_close_matches(attribute, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ZooError(
                f"unknown attribute {attribute!r} in {root}{hint}; valid names: " + ", ".join(names)
            )
        columns.append(names.index(attribute))
    if len(set(columns)) != len(columns):
        raise ZooError(f"attributes {wanted} name one attribute twice; list each once")
    return attrs[:, columns].float(), list(wanted)


def _raise_empty_split(root: Path, split: str, splits: dict[str, tuple[int, int]]) -> None:
    available = [
        f"{name} ({stop - start})"
        for name, (start, stop) in splits.items()
        if name != "all" and stop > start
    ]
    raise ZooError(
        f"the {split} split of {root} is empty; splits with images: "
        + (", ".join(available) or "none (every image was skipped)")
    )
