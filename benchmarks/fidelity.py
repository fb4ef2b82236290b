"""KID and precision / recall / density / coverage: fidelity and diversity apart, in FID's
feature spaces.

FID folds fidelity and diversity into one number and is biased at small n. These read the
same features as FID (the option ``fid.features``, alias ``--fid-features``: Inception, or
the attribute classifier's), of the benchmark split's first ``--n`` images and as many
images generated from the prior (with the real images' labels, for a conditional model), each
set extracted once per model and shared by both metrics:

- **KID** (Bińkowski et al. 2018, "Demystifying MMD GANs"): the unbiased estimate of the
  squared MMD with a cubic polynomial kernel, mean and standard deviation over random
  subsets; torchmetrics' `KernelInceptionDistance` computes it, on our features. 0 is the
  real distribution; lower is better.
- **Precision** and **recall** (Kynkäänniemi et al. 2019, "Improved precision and recall
  metric for assessing generative models"): the share of generated images inside the real
  images' k-nearest-neighbour manifold (fidelity), and of real images inside the generated
  images' manifold (diversity). **Density** and **coverage** (Naeem et al. 2020, "Reliable
  fidelity and diversity metrics for generative models"): how many real neighbourhoods
  contain each generated image, over k (near 1 for a matching distribution, robust to real
  outliers), and the share of real images whose neighbourhood contains a generated one.
  Higher is better for all four; k is the option ``prdc.k``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchmetrics.image.kid import KernelInceptionDistance

from benchmarks.fid import Extractor, extractor_for
from benchmarks.metric import BenchContext, Metric, option, register_metric
from zoo.errors import ZooError
from zoo.progress import image_progress


class _GivenFeatures(nn.Identity):
    """A torchmetrics feature module for features already extracted: KID's `update` takes
    them as they are."""


def kernel_inception_distance(
    real: torch.Tensor, fake: torch.Tensor, subsets: int, subset_size: int, seed: int
) -> tuple[float, float]:
    """(mean, std) of torchmetrics' unbiased KID over ``subsets`` random subsets of
    ``subset_size`` (capped at the smaller set), drawn under ``seed``."""
    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():  # that it keeps every feature: so does our caller
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(
            feature=_GivenFeatures(), subsets=subsets, subset_size=size, normalize=False
        )
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def precision_recall_density_coverage(
    real: torch.Tensor, fake: torch.Tensor, k: int
) -> dict[str, float]:
    """The four k-nearest-neighbour scores of generated features against real ones (see the
    module docstring); distances are Euclidean, in float64, each set's radii the distance to
    its k-th nearest other member."""
    if min(len(real), len(fake)) <= k:
        raise ZooError(
            f"precision and recall with k={k} need more than {k} images in each set; "
            "raise --n or lower prdc.k"
        )
    real, fake = real.double(), fake.double()
    real_radii = torch.cdist(real, real).kthvalue(k + 1, dim=1).values  # the 1st is itself
    fake_radii = torch.cdist(fake, fake).kthvalue(k + 1, dim=1).values
    distance = torch.cdist(real, fake)  # real x fake
    inside_real = distance <= real_radii[:, None]
    return {
        "precision": inside_real.any(dim=0).double().mean().item(),
        "recall": (distance <= fake_radii[None, :]).any(dim=1).double().mean().item(),
        "density": (inside_real.sum(dim=0).double().mean() / k).item(),
        "coverage": (distance.min(dim=1).values <= real_radii).double().mean().item(),
    }


def _features(extractor: Extractor, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        prepared = extractor.prepare(images).to(extractor.device)
        return extractor.metric.inception(prepared).double().cpu()


def feature_sets(context: BenchContext) -> tuple[torch.Tensor, torch.Tensor, Extractor]:
    """(real features, generated features, the extractor) for this model, each set extracted
    once per benchmark run (the real one once for all models)."""
    extractor = extractor_for(context)
    count, settings = context.count, context.settings
    if count < 2:
        raise ZooError(f"KID and precision/recall need at least 2 images; raise --n (got {count})")

    def real() -> torch.Tensor:
        parts = []
        with image_progress(f"{extractor.name} real features", count, settings.progress) as step:
            for _, images, _ in context.batches():
                parts.append(_features(extractor, images))
                step(images.shape[0])
        return torch.cat(parts)

    def fake() -> torch.Tensor:
        model, labels = context.model.eval(), context.labels
        generator = torch.Generator(context.device).manual_seed(settings.seed)
        parts = []
        with image_progress(f"{extractor.name} generated", count, settings.progress) as step:
            for start in range(0, count, settings.batch_size):
                index = torch.arange(start, min(start + settings.batch_size, count))
                y = labels[index].to(context.device) if labels is not None else None
                with torch.no_grad():
                    images = model.generate(len(index), y, generator=generator)
                parts.append(_features(extractor, images))
                step(len(index))
        return torch.cat(parts)

    data = context.data
    real_set = context.memo.get(
        "real-features", extractor.identity, data.root, data.split, count, build=real
    )
    fake_set = context.memo.get(
        "fake-features", str(context.checkpoint), extractor.identity, count, settings.seed,
        build=fake,
    )  # fmt: skip
    return real_set, fake_set, extractor


@register_metric("kid")
class KernelDistance(Metric):
    """KID of generated to real images in FID's feature space (`kernel_inception_distance`)."""

    title = "KID"

    @dataclass(frozen=True)
    class Options:
        subsets: int = option(100, "Random subsets the estimate is averaged over.", low=1)
        subset_size: int = option(1000, "Images per subset (at most --n).", low=2)

    def compute(self, context: BenchContext) -> dict[str, Any]:
        options = context.options(self)
        real, fake, extractor = feature_sets(context)
        mean, std = kernel_inception_distance(
            real, fake, options.subsets, options.subset_size, context.settings.seed
        )
        return {
            "kid": mean,
            "kid_std": std,
            "features": extractor.features,
            "subset_size": min(options.subset_size, len(real)),
            "n_real": len(real),
            "n_fake": len(fake),
        }

    def headline(self, result: dict[str, Any]) -> dict[str, str]:
        return {"KID": f"{result['kid']:.4f}"}


@register_metric("prdc")
class PrecisionRecall(Metric):
    """Precision, recall, density and coverage (`precision_recall_density_coverage`)."""

    title = "Precision / recall / density / coverage"

    @dataclass(frozen=True)
    class Options:
        k: int = option(5, "Nearest neighbours that set each image's radius.", low=1)

    def compute(self, context: BenchContext) -> dict[str, Any]:
        k = context.options(self).k
        real, fake, extractor = feature_sets(context)
        scores = precision_recall_density_coverage(real, fake, k)
        return {**scores, "k": k, "features": extractor.features, "n": len(real)}

    def headline(self, result: dict[str, Any]) -> dict[str, str]:
        return {
            "precision": f"{result['precision']:.3f}",
            "recall": f"{result['recall']:.3f}",
            "density": f"{result['density']:.3f}",
            "coverage": f"{result['coverage']:.3f}",
        }
