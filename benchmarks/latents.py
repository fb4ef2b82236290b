"""Posterior means of a split, and the scikit-learn estimators fitted on them.

The disentanglement and leakage metrics all read z the same way: the posterior mean of each
image (given its labels, for a conditional model; `zoo.latent.encode_means`), computed once
per model, split and count and shared through the benchmark's memo. Their probes and
importance estimators are scikit-learn's (the ``metrics`` extra): well-kept, deterministic
under a seed, and what the reference implementation (disentanglement_lib) uses, so nothing
is written by hand that a library already does.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import torch

from benchmarks.metric import BenchContext
from zoo.data import ImageData, checkpoint_data
from zoo.errors import ZooError
from zoo.latent import encode_means
from zoo.progress import image_progress


def require_sklearn() -> ModuleType:
    """scikit-learn, or one line naming the extra that installs it."""
    try:
        import sklearn
    except ImportError:
        raise ZooError(
            "the disentanglement and leakage metrics need scikit-learn: "
            "pip install 'zoo[metrics]' (or pip install scikit-learn)"
        ) from None
    return sklearn


def split_means(context: BenchContext, data: ImageData, count: int) -> np.ndarray:
    """Posterior means of the first ``count`` images of ``data``, computed once per model."""

    def build() -> np.ndarray:
        model = context.model.eval()
        labels = data.labels(context.info.attr_names) if model.conditional else None
        means = []
        batch = context.settings.batch_size
        with image_progress(f"encoding {data.split}", count, context.settings.progress) as advance:
            for start in range(0, count, batch):
                index = torch.arange(start, min(start + batch, count))
                images, _ = data.batch(index, context.device)
                y = labels[index].to(context.device) if labels is not None else None
                means.append(encode_means(model, images, y).double().numpy())
                advance(len(index))
        return np.concatenate(means)

    key = (str(context.checkpoint), data.root, data.split, count)
    return context.memo.get("posterior-means", *key, build=build)


def train_split(context: BenchContext) -> ImageData:
    """The model's train split, loaded once per model (shared with the edit benchmark)."""
    return context.memo.get(
        "train-split",
        str(context.checkpoint),
        build=lambda: checkpoint_data(context.info, "train", source=context.data.source),
    )
