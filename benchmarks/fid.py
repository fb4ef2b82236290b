"""Fréchet distance between generated and real images: FID, or FD-attr in classifier features.

Real images are the first ``--n`` images of the benchmark split; as many fakes are drawn from
the prior with a seeded generator. A conditional model gets the labels of those real images, so
the score measures conditional generation on the real label distribution. Features come from
one of two extractors (the option ``fid.features``; ``--fid-features`` is its alias):

- ``inception`` (default): the 2048-d pool features of torch-fidelity's InceptionV3, the
  standard FID, on weights that are never downloaded and never unpickled
  (`benchmarks.inception`).
- ``classifier``: the penultimate features of the zoo's attribute classifier for the data,
  reported as "FD-attr" (a Fréchet distance, not comparable with published FIDs).

The distance itself is torchmetrics' `FrechetInceptionDistance`. The real images' feature
statistics (its ``real_features_*`` states) are cached as safetensors under
``<cache dir>/fid-stats``, keyed by data, split, n, image size and the extractor's digest, so a
leaderboard of many models extracts real features once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from benchmarks.classifier import weights_digest
from benchmarks.inception import (
    INCEPTION_FILE,
    INCEPTION_SHA256,
    WEIGHTS_ENV,
    WEIGHTS_SHA256_ENV,
    inception_fid,
    inception_weights_path,
    require_torch_fidelity,
)
from benchmarks.metric import BenchContext, Metric, option, register_metric
from zoo.errors import ZooError
from zoo.files import (
    WriteFailed,
    cache_dir,
    file_sha256,
    read_tensors_file,
    write_tensors_file,
)
from zoo.progress import image_progress

logger = logging.getLogger(__name__)

INCEPTION_FEATURES = "inception-v3-2048"
FEATURE_CHOICES = ("inception", "classifier")

STATS_DIR = "fid-stats"
STATS_KIND = "fid real statistics"
STATS_VERSION = 1  # bump when the protocol or the stored states change
REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


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
    """The extractor option ``fid.features`` (or `choice`) asks for, built once per benchmark
    run."""
    options = context.options(FrechetDistance)
    choice = choice or options.features
    if choice == "inception":
        require_torch_fidelity()
        weights = inception_weights_path(options.weights).resolve()
        stat = weights.stat()
        return context.memo.get(
            "fid-extractor",
            "inception",
            str(weights),
            stat.st_size,
            stat.st_mtime_ns,
            build=lambda: _inception_extractor(weights, metric_device(context.device)),
        )
    if choice == "classifier":
        classifier, info, features = _classifier(context)  # it resizes images to its size
        device = metric_device(context.device)
        return context.memo.get(
            "fid-extractor",
            features,
            build=lambda: Extractor(
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
    metadata = {"zoo.fid.key": json.dumps(key, sort_keys=True)}
    try:
        write_tensors_file(path, STATS_KIND, stats, metadata)
    except (OSError, WriteFailed) as error:  # a full or read-only cache costs time, not the result
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

    @dataclass(frozen=True)
    class Options:
        features: str = option(
            "inception",
            "Features the distance is measured in: inception (the standard FID; the inception "
            "extra and its weights file) or classifier (FD-attr; offline).",
            choices=FEATURE_CHOICES,
        )
        weights: str | None = option(
            None,
            f"Path of {INCEPTION_FILE} (none: ${WEIGHTS_ENV}, else the torch hub cache).",
        )

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
