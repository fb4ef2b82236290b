"""Fréchet distance between generated and real images: FID, or FD-attr in classifier features.

Real images are the first ``--n`` images of the benchmark split; as many fakes are drawn from
the prior with a seeded generator. A conditional model gets the labels of those real images, so
the score measures conditional generation on the real label distribution. Features come from
one of two extractors (``--fid-features``):

- ``inception`` (default): the 2048-d pool features of torch-fidelity's InceptionV3, the
  standard FID. The weights file is never downloaded and never unpickled: its full sha256 is
  checked before anything parses it (`read_verified_weights`; ``$ZOO_FID_WEIGHTS_SHA256``
  names another file's), and the verified bytes are read with
  ``torch.load(weights_only=True)`` (see `weights_only_inception_loading`).
- ``classifier``: the penultimate features of the zoo's attribute classifier for the data,
  reported as "FD-attr" (a Fréchet distance, not comparable with published FIDs).

The distance itself is torchmetrics' `FrechetInceptionDistance`. The real images' feature
statistics (its ``real_features_*`` states) are cached as safetensors under
``<cache dir>/fid-stats``, keyed by data, split, n, image size and the extractor's digest, so a
leaderboard of many models extracts real features once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import os
import pickle
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from benchmarks.classifier import weights_digest
from benchmarks.metric import BenchContext, Metric, register_metric
from zoo.checkpoint import FORMAT_KEY, FORMAT_VERSION, KIND_KEY, atomic_save, read_tensors_file
from zoo.data import cache_dir
from zoo.data.cache import image_progress
from zoo.errors import ZooError, error_reason

logger = logging.getLogger(__name__)

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
)
INCEPTION_HINT = f"use {INCEPTION_FILE} from {INCEPTION_URL}"
# the released file's sha256 (torch.hub names downloads by its first 8 hex digits)
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_FEATURES = "inception-v3-2048"
WEIGHTS_ENV = "ZOO_FID_WEIGHTS"
WEIGHTS_SHA256_ENV = "ZOO_FID_WEIGHTS_SHA256"  # the sha256 of a deliberately different file
FEATURE_CHOICES = ("inception", "classifier")

STATS_DIR = "fid-stats"
STATS_KIND = "fid real statistics"
STATS_VERSION = 1  # bump when the protocol or the stored states change
REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


# -- the Inception weights: where they are, and reading them without unpickling --------------------


def hub_weights_path() -> Path:
    """Where torch-fidelity (through torch.hub) keeps the InceptionV3 weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def inception_weights_path(option: str | None = None) -> Path:
    """``--fid-weights``, else ``$ZOO_FID_WEIGHTS``, else the torch hub cache; ZooError if absent.

    A path given explicitly that does not exist is an error, never a fall-through.
    """
    hub = hub_weights_path()
    for source, value in (
        ("--fid-weights", option),
        (f"${WEIGHTS_ENV}", os.environ.get(WEIGHTS_ENV)),
    ):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise ZooError(
                    f"{source} {path} is not a file; point it at {INCEPTION_FILE} "
                    f"(from {INCEPTION_URL}) or leave it unset to use {hub}"
                )
            return path
    if hub.is_file():
        return hub
    raise ZooError(missing_weights_message(hub))


def missing_weights_message(hub: Path) -> str:
    return (
        f"FID needs torch-fidelity's InceptionV3 weights {INCEPTION_FILE}, which are not at {hub}: "
        f"download {INCEPTION_URL} and put it there (or anywhere, and pass --fid-weights PATH or "
        f"set {WEIGHTS_ENV}=PATH), or use --fid-features classifier (Fréchet distance in the "
        "attribute classifier's features; nothing to download)"
    )


def expected_weights_sha256() -> str:
    """The sha256 the weights file must have: ``$ZOO_FID_WEIGHTS_SHA256`` when a different file
    is used on purpose, else that of torch-fidelity's released file."""
    value = os.environ.get(WEIGHTS_SHA256_ENV, "").strip().lower()
    if not value:
        return INCEPTION_SHA256
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ZooError(
            f"${WEIGHTS_SHA256_ENV} must be the 64 hex digits of a sha256 (as `sha256sum FILE` "
            f"prints them), got {value[:80]!r}; fix it or unset it"
        )
    return value


def read_verified_weights(path: Path) -> tuple[bytes, str]:
    """The weights file's bytes and sha256, refused unless the sha256 is the expected one.

    The hash is of the very bytes that are then loaded, so a file swapped on disk after the
    check is never read, and a file of unknown origin never reaches a parser.
    """
    expected = expected_weights_sha256()
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ZooError(f"cannot read {path} ({error_reason(error)}); {INCEPTION_HINT}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        wanted = (
            f"that of torch-fidelity's released {INCEPTION_FILE}"
            if expected == INCEPTION_SHA256
            else f"the {expected} that ${WEIGHTS_SHA256_ENV} asks for"
        )
        raise ZooError(
            f"refusing {path}: its sha256 is not {wanted}, so it is not loaded; "
            f"{INCEPTION_HINT}, or, to use this file deliberately, set "
            f"{WEIGHTS_SHA256_ENV}={digest}"
        )
    return data, digest


def load_weights_only(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    """The state dict in ``data`` (the bytes of ``path``, named in errors), read with
    ``weights_only=True``: tensors and plain containers, never code."""
    try:
        with warnings.catch_warnings():
            # the weights-only unpickler warns about pickle protocols it was not written for
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported (global: GLOBAL [\w.]+|operand \d+)", str(error))
        reason = f"unsupported {found.group(1)}" if found else "objects other than tensors"
        raise ZooError(
            f"refusing {path}: it is not a plain tensor file ({reason}); zoo only loads weights "
            f"with weights_only=True and never runs code from a file; {INCEPTION_HINT}"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        reason = error_reason(error)
        raise ZooError(
            f"{path} is not a readable PyTorch weights file ({reason}); {INCEPTION_HINT}"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(value, torch.Tensor) for value in state.values()
    ):
        raise ZooError(
            f"{path} holds a {type(state).__name__}, not a state dict of tensors; {INCEPTION_HINT}"
        )
    return state


class _WeightsOnlyTorch:
    """Stands in for the name ``torch`` inside torch-fidelity's InceptionV3 module: everything is
    the real torch except ``load``, which reads the verified bytes through `load_weights_only`
    and records the path it was asked for."""

    def __init__(self, path: Path, data: bytes) -> None:
        self.path, self.data = path, data
        self.loaded: list[Path] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def load(self, f: Any, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        # whatever torch-fidelity asks for (it passes weights_only=False), read tensors only
        self.loaded.append(Path(f))
        return load_weights_only(self.path, self.data)


def _refuse_download(*args: Any, **kwargs: Any) -> None:
    raise ZooError(
        f"zoo never downloads the FID weights; put {INCEPTION_FILE} at {hub_weights_path()} "
        f"or pass --fid-weights PATH"
    )


_PATCH_LOCK = threading.Lock()


@contextmanager
def weights_only_inception_loading(path: Path, data: bytes) -> Iterator[_WeightsOnlyTorch]:
    """Make torch-fidelity's InceptionV3 read ``data`` (the verified bytes of ``path``) with
    ``weights_only=True``.

    ``FeatureExtractorInceptionV3.__init__`` (which torchmetrics' ``NoTrainInceptionV3``
    inherits) unpickles its weights file (``weights_only=False``): a crafted file would run code.
    For the duration of the block, that module's global ``torch`` is a `_WeightsOnlyTorch`
    proxy whose ``load`` reads tensors only, and its ``load_state_dict_from_url`` refuses to
    download. Only that module's globals change (under a lock, restored on exit); torch.load
    elsewhere in the process is untouched. The proxy records its calls so the caller can check
    the weights really went through it (tests/test_fid.py proves a pickle bomb stays inert).
    """
    import torch_fidelity.feature_extractor_inceptionv3 as inception_module

    # Check before anything is read that the constructor still loads through the module-level
    # names replaced below (``torch.load``, ``load_state_dict_from_url``).
    names = ("torch", "load_state_dict_from_url")
    used = set(inception_module.FeatureExtractorInceptionV3.__init__.__code__.co_names)
    if not {*names, "load"} <= used:  # pragma: no cover - a torch-fidelity we do not know
        raise RuntimeError(
            "torch-fidelity's InceptionV3 no longer loads its weights through torch.load; "
            "benchmarks/fid.py's weights-only guard must be updated before it can be used"
        )
    proxy = _WeightsOnlyTorch(path, data)
    with _PATCH_LOCK:
        saved = [getattr(inception_module, name) for name in names]
        inception_module.torch = proxy
        inception_module.load_state_dict_from_url = _refuse_download
        try:
            yield proxy
        finally:
            for name, value in zip(names, saved, strict=True):
                setattr(inception_module, name, value)


def inception_fid(weights: Path) -> tuple[FrechetInceptionDistance, str]:
    """torchmetrics' standard FID (2048-d pool features) on the weights at ``weights``, and
    their sha256, checked (`read_verified_weights`) before anything parses the file.

    It takes uint8 images (``normalize=False``; see `to_uint8_rgb`) and keeps its real
    statistics across ``reset()`` so they can be restored from the cache.
    """
    data, digest = read_verified_weights(weights)
    with weights_only_inception_loading(weights, data) as guard:
        try:
            metric = FrechetInceptionDistance(
                feature=2048,
                feature_extractor_weights_path=str(weights),
                normalize=False,
                reset_real_features=False,
            )
        except RuntimeError as error:  # load_state_dict: missing, unexpected or misshapen keys
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            detail = lines[1] if len(lines) > 1 else (lines[0] if lines else "")
            raise ZooError(
                f"{weights} does not hold torch-fidelity's InceptionV3 weights "
                f"({detail[:160]}); {INCEPTION_HINT}"
            ) from None
    if guard.loaded != [Path(weights)]:  # pragma: no cover - torch-fidelity changed its loading
        raise RuntimeError(
            f"InceptionV3 weights were not read through the weights-only guard: {guard.loaded}"
        )
    return metric, digest


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """Float [0, 1] N x C x H x W -> the uint8 RGB Inception takes; gray becomes RGB.

    Rounds to the nearest level: torchmetrics' ``normalize=True`` truncates, which is exact for
    the real images (k / 255) but darkens generated ones by half a level on average.
    """
    images = images.float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


# -- the attribute classifier's features -----------------------------------------------------------


class ClassifierFeatures(nn.Module):
    """An attribute classifier as a torchmetrics feature module: float [0, 1] images in,
    ``classifier.features(x)`` (N x num_features) out. ``num_features`` is set, so torchmetrics
    does not probe it with a dummy image; with ``normalize=True`` it passes our float images
    through unchanged (for custom modules ``normalize`` only picks the dtype of that probe).

    The classifier is shared with other metrics, so it is held outside the module tree: moving
    the metric (see `metric_device`) never moves it. Images go to the classifier's device and
    features come back to the images' device.
    """

    def __init__(self, classifier: Any, device: torch.device) -> None:
        super().__init__()
        self._classifier = (classifier,)  # a tuple: not registered as a submodule
        self._device = device
        self.num_features = int(classifier.num_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self._classifier[0].features(images.to(self._device))
        return features.float().to(images.device)


def classifier_fid(features: nn.Module) -> FrechetInceptionDistance:
    """torchmetrics' Fréchet distance on a custom feature module taking float [0, 1] images."""
    return FrechetInceptionDistance(feature=features, normalize=True, reset_real_features=False)


def _classifier(context: BenchContext) -> tuple[Any, Any, str]:
    """(the attribute classifier for the data, its file's info, its identity
    ``classifier:<backbone>:<digest>``).

    ``context.classifier()`` finds it (``--classifier``, else by data fingerprint and image
    size under the runs folder) and raises the ZooError that says how to train one.
    """
    classifier, info = context.classifier()
    backbone = getattr(info, "backbone", None) or getattr(classifier, "backbone", None)
    path = getattr(info, "path", None)
    if path is not None and Path(path).is_file():
        digest = file_sha256(Path(path))[:16]
    else:  # identify by the weights themselves
        digest = weights_digest(classifier)[:16]
    return classifier, info, f"classifier:{backbone or type(classifier).__name__}:{digest}"


# -- the protocol ----------------------------------------------------------------------------------


@dataclass
class Extractor:
    """A ready FID metric with what identifies its features."""

    name: str  # "FID" or "FD-attr"
    features: str  # reported: "inception-v3-2048" or "classifier:<backbone>:<digest>"
    identity: str  # cache key part: changes whenever the features would
    metric: FrechetInceptionDistance
    prepare: Callable[[torch.Tensor], torch.Tensor]  # float [0, 1] images -> metric input
    device: torch.device  # where the metric's statistics live (`metric_device`)
    details: dict[str, Any] = field(default_factory=dict)  # extra result fields


def metric_device(device: torch.device) -> torch.device:
    """The metric keeps float64 statistics, which Apple's MPS lacks: there it runs on the CPU."""
    return torch.device("cpu") if device.type == "mps" else device


def extractor_for(context: BenchContext, choice: str | None = None) -> Extractor:
    """The extractor ``--fid-features`` (or `choice`) asks for, built once per benchmark run."""
    choice = choice or context.settings.fid_features
    if choice == "inception":
        if importlib.util.find_spec("torch_fidelity") is None:
            raise ZooError(
                "the standard FID needs torch-fidelity's InceptionV3; install the inception "
                "extra: pip install 'zoo[inception]', or use --fid-features classifier"
            )
        weights = inception_weights_path(context.settings.fid_weights).resolve()
        stat = weights.stat()
        key = f"fid:inception:{weights}:{stat.st_size}:{stat.st_mtime_ns}"
        return context.shared(
            key, lambda: _inception_extractor(weights, metric_device(context.device))
        )
    if choice == "classifier":
        classifier, info, features = _classifier(context)  # it resizes images to its size
        device = metric_device(context.device)
        return context.shared(
            f"fid:{features}",
            lambda: Extractor(
                name="FD-attr",
                features=features,
                identity=features,
                metric=classifier_fid(ClassifierFeatures(classifier, context.device)).to(device),
                prepare=lambda images: images.float(),
                device=device,
                details={"classifier_image_size": getattr(info, "image_size", None)},
            ),
        )
    raise ZooError(f"unknown --fid-features {choice!r}; use one of {', '.join(FEATURE_CHOICES)}")


def _inception_extractor(weights: Path, device: torch.device) -> Extractor:
    metric, digest = inception_fid(weights)
    metric = metric.to(device)
    if digest != INCEPTION_SHA256:  # accepted through $ZOO_FID_WEIGHTS_SHA256
        logger.warning(
            "%s is not torch-fidelity's released InceptionV3 file (%s accepts it); its FID "
            "values are not comparable with published ones",
            weights,
            WEIGHTS_SHA256_ENV,
        )
    return Extractor(
        name="FID",
        features=INCEPTION_FEATURES,
        identity=f"{INCEPTION_FEATURES}:{digest}",
        metric=metric,
        prepare=to_uint8_rgb,
        device=device,
        details={"weights_sha256": digest},
    )


def real_stats(metric: FrechetInceptionDistance) -> dict[str, torch.Tensor]:
    return {name: getattr(metric, name).detach().clone() for name in REAL_STATES}


def set_real_stats(metric: FrechetInceptionDistance, stats: dict[str, torch.Tensor]) -> None:
    """Put real statistics into a metric, as ``reset_real_features=False`` keeps them."""
    for name in REAL_STATES:
        current = getattr(metric, name)
        setattr(metric, name, stats[name].to(device=current.device, dtype=current.dtype))


def stats_key(context: BenchContext, extractor: Extractor, count: int) -> dict[str, Any]:
    data = context.data
    return {
        "version": STATS_VERSION,
        "features": extractor.identity,
        "data": data.name,
        "fingerprint": data.fingerprint,
        "split": data.split,
        "n": count,
        "preprocess": data.preprocess.to_dict(),
    }


def stats_path(key: dict[str, Any]) -> Path:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir() / STATS_DIR / f"{name}.safetensors"


def load_stats(path: Path, key: dict[str, Any], metric: FrechetInceptionDistance) -> dict | None:
    """Cached real statistics for ``key``, or None if absent, damaged or not for this key."""
    if not path.is_file():
        return None
    try:
        tensors, metadata = read_tensors_file(path, STATS_KIND)
    except ZooError as error:
        logger.warning("ignoring damaged FID statistics cache (%s); recomputing", error)
        return None
    usable = (
        metadata.get("zoo.fid.key") == json.dumps(key, sort_keys=True)
        and set(tensors) == set(REAL_STATES)
        and all(tensors[name].shape == getattr(metric, name).shape for name in REAL_STATES)
        and int(tensors["real_features_num_samples"]) == key["n"]
    )
    return tensors if usable else None


def save_stats(path: Path, key: dict[str, Any], stats: dict[str, torch.Tensor]) -> None:
    metadata = {
        FORMAT_KEY: FORMAT_VERSION,
        KIND_KEY: STATS_KIND,
        "zoo.fid.key": json.dumps(key, sort_keys=True),
    }
    try:
        atomic_save(path, stats, metadata)
    except OSError as error:  # a read-only cache costs time, not the result
        logger.warning("could not cache FID real statistics at %s: %s", path, error)


def extract_real(context: BenchContext, extractor: Extractor, count: int) -> None:
    """Accumulate the real statistics of the first ``count`` images of the split."""
    metric = extractor.metric
    set_real_stats(metric, {name: torch.zeros_like(getattr(metric, name)) for name in REAL_STATES})
    description = f"{extractor.name} real features"
    with image_progress(description, count, context.settings.progress) as advance:
        for _, images, _ in context.batches():
            with torch.no_grad():  # the classifier's parameters would otherwise record a graph
                metric.update(extractor.prepare(images).to(extractor.device), real=True)
            advance(images.shape[0])


def extract_fake(context: BenchContext, extractor: Extractor, count: int) -> None:
    """Generate ``count`` images (with the real images' labels if conditional) and accumulate."""
    settings, device = context.settings, context.device
    model = context.model.eval()
    labels = context.labels
    generator = torch.Generator(device).manual_seed(settings.seed)
    description = f"{extractor.name} generated images"
    with image_progress(description, count, settings.progress) as advance:
        for start in range(0, count, settings.batch_size):
            index = torch.arange(start, min(start + settings.batch_size, count))
            y = labels[index].to(device) if labels is not None else None
            with torch.no_grad():
                images = model.generate(len(index), y, generator=generator)
                extractor.metric.update(extractor.prepare(images).to(extractor.device), real=False)
            advance(len(index))


@register_metric("fid")
class FrechetDistance(Metric):
    """Fréchet distance of generated to real images: FID (Inception) or FD-attr (classifier)."""

    title = "FID"

    def compute(self, context: BenchContext) -> dict[str, Any]:
        started = time.perf_counter()
        count = context.count
        if count < 2:
            raise ZooError(
                f"a Fréchet distance needs at least 2 images; the {context.data.split} split of "
                f"{context.data.root} gives {count}; raise --n or use a larger split"
            )
        extractor = extractor_for(context)
        metric = extractor.metric
        metric.reset()  # fake statistics only; the real ones are set below
        key = stats_key(context, extractor, count)
        path = stats_path(key)
        cached = load_stats(path, key, metric)
        real_started = time.perf_counter()
        if cached is not None:
            set_real_stats(metric, cached)
        else:
            extract_real(context, extractor, count)
            save_stats(path, key, real_stats(metric))
        fake_started = time.perf_counter()
        extract_fake(context, extractor, count)
        fake_seconds = time.perf_counter() - fake_started
        value = float(metric.compute())
        return {
            "name": extractor.name,
            "value": value,
            "n_real": count,
            "n_fake": int(metric.fake_features_num_samples),
            "features": extractor.features,
            "conditioned_on_real_labels": bool(context.model.conditional),
            "real_stats_cached": cached is not None,
            "real_features_img_per_s": None if cached else count / (fake_started - real_started),
            "generate_and_features_img_per_s": count / fake_seconds,
            "seconds": time.perf_counter() - started,
            **extractor.details,
        }

    def card_values(self, result: dict[str, Any]) -> dict[str, float]:
        return {result["name"]: result["value"]}

    def headline(self, result: dict[str, Any]) -> dict[str, str]:
        return {result["name"]: f"{result['value']:.2f}"}
