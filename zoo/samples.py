"""PNG grids of images: what a person looks at to judge a model."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import save_image

from zoo.model import GenerativeModel


@torch.inference_mode()
def training_grid(
    model: GenerativeModel, images: torch.Tensor, attrs: torch.Tensor, path: Path, *, seed: int
) -> None:
    """Originals, their reconstructions, then two rows of prior samples.

    Conditional samples reuse the attribute vectors of the shown images, so each
    column of samples should share the labels of the face above it.
    """
    count = images.shape[0]
    y = attrs if model.conditional else None
    generator = torch.Generator(device=images.device).manual_seed(seed)
    samples = [model.generate(count, y, generator=generator) for _ in range(2)]
    rows = torch.cat([images, model.reconstruct(images, y), *samples]).float().clamp(0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(rows, path, nrow=count, padding=2, pad_value=1.0)
