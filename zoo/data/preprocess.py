"""How a raw image becomes a model input: channels, centre crop, size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms.v2.functional import resize, rgb_to_grayscale

from zoo.data import celeba
from zoo.errors import ZooError


@dataclass
class Preprocess:
    """How a raw image becomes a model input; stored in checkpoints so user photos get the same
    treatment as the training data."""

    image_size: int
    crop_fraction: float
    channels: int

    def __post_init__(self) -> None:
        # size 1 is no image, and torch's uint8 antialiased resize fails on 1x1 RGB output
        if self.image_size < 2 or not 0 < self.crop_fraction <= 1 or self.channels not in (1, 3):
            raise ZooError(
                f"invalid preprocessing {self.to_dict()}: need image_size >= 2, "
                "0 < crop_fraction <= 1 and channels 1 or 3"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "crop_fraction": self.crop_fraction,
            "channels": self.channels,
        }

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> Preprocess:
        """Rebuild from ``to_dict`` output (e.g. checkpoint metadata); ZooError if malformed."""
        try:
            return cls(
                image_size=int(settings["image_size"]),
                crop_fraction=float(settings["crop_fraction"]),
                channels=int(settings["channels"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ZooError(
                f"preprocessing settings {settings!r} are malformed ({error!r}); "
                "the checkpoint or cache was not written by this version of zoo"
            ) from None

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (..., C, H, W) -> uint8 (..., channels, S, S): fix channels, centre-crop, resize.

        Alpha is dropped, gray is repeated to RGB, RGB becomes luminance for 1-channel models.
        """
        if image.shape[-3] in (2, 4):
            image = image[..., : image.shape[-3] - 1, :, :]
        if image.shape[-3] == 1 and self.channels == 3:
            image = image.expand(*image.shape[:-3], 3, *image.shape[-2:])
        elif image.shape[-3] == 3 and self.channels == 1:
            image = rgb_to_grayscale(image)
        height, width = image.shape[-2:]
        top, left, side = celeba.crop_box(height, width, self.crop_fraction)
        image = image[..., top : top + side, left : left + side]
        if side != self.image_size:
            image = resize(image, [self.image_size, self.image_size], antialias=True)
        return image.contiguous()
