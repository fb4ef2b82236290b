"""Convolutional encoder and decoder backbones, sized from the image size.

Each stage halves (or doubles) the resolution until a 4 x 4 map, so the depth
follows the image size and widths grow from `base_channels` up to `max_channels`.
The decoder's last doubling is its `tail`: "pixel-shuffle" (the default of new models) is a 3x3
convolution at half resolution to four times the output channels, rearranged into the image
by `nn.PixelShuffle` (Shi et al. 2016), so nothing is computed at full resolution but the
rearrangement; "deconv" (every earlier checkpoint) is a transposed convolution to full
resolution, a norm, SiLU and a 3x3 output convolution, over a third of a training step's
time on a CPU (docs/speed.md).
GroupNorm rather than BatchNorm: outputs then do not depend on the batch, which
keeps evaluation, distributed training and checkpoints free of running statistics.
Convolutions that feed a GroupNorm have no bias: the norm removes it, and a
parameter whose gradient is rounding noise only makes runs diverge.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from zoo.errors import ZooError

MIN_IMAGE_SIZE = 8
MAX_IMAGE_SIZE = 512
FINAL_MAP = 4
DECODER_TAILS = ("pixel-shuffle", "deconv")


def stage_channels(image_size: int, base_channels: int, max_channels: int) -> list[int]:
    """Output width of each resolution-halving stage for an image of `image_size`."""
    exponent = round(math.log2(image_size)) if image_size > 0 else -1
    if 2**exponent != image_size or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ZooError(
            f"image size {image_size} cannot be built: the conv backbone needs a power of two "
            f"from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} (for example 32, 64 or 128)"
        )
    if base_channels < 1 or max_channels < base_channels:
        raise ZooError(
            f"channel widths must satisfy 1 <= base_channels <= max_channels, "
            f"got {base_channels} and {max_channels}"
        )
    num_stages = exponent - round(math.log2(FINAL_MAP))
    return [min(base_channels * 2**i, max_channels) for i in range(num_stages)]


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


class FiLMGroupNorm(nn.Module):
    """GroupNorm whose scale and shift also follow a condition vector (FiLM, Perez et al. 2018).

    ``norm(h) * (1 + gamma(c)) + beta(c)`` with gamma and beta linear in c and zero at
    initialisation, so training starts from the plain decoder and the condition has a direct
    multiplicative path into every stage instead of one slot of the first layer's input.
    """

    def __init__(self, channels: int, cond_features: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.film = nn.Linear(cond_features, 2 * channels)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(cond.to(h.dtype)).chunk(2, dim=1)
        return self.norm(h) * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]


class ConvEncoder(nn.Module):
    """Image (plus optional extra input channels) -> flat feature vector."""

    def __init__(self, in_channels: int, image_size: int, base_channels: int, max_channels: int):
        super().__init__()
        widths = stage_channels(image_size, base_channels, max_channels)
        layers: list[nn.Module] = []
        previous = in_channels
        for width in widths:
            layers += [
                nn.Conv2d(previous, width, 4, stride=2, padding=1, bias=False),
                _norm(width),
                nn.SiLU(),
            ]
            previous = width
        self.stages = nn.Sequential(*layers)
        self.out_features = previous * FINAL_MAP * FINAL_MAP

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x).flatten(1)


class ConvDecoder(nn.Module):
    """Flat vector -> image logits, mirroring `ConvEncoder`.

    With ``cond_features`` > 0 every norm is a `FiLMGroupNorm` driven by the condition passed
    to `forward`, so the condition modulates each resolution, not only the input vector.
    """

    def __init__(
        self,
        in_features: int,
        out_channels: int,
        image_size: int,
        base_channels: int,
        max_channels: int,
        cond_features: int = 0,
        tail: str = "deconv",
    ):
        super().__init__()
        if tail not in DECODER_TAILS:
            raise ZooError(f"decoder tail {tail!r} is not one of {', '.join(DECODER_TAILS)}")
        widths = stage_channels(image_size, base_channels, max_channels)[::-1]

        def norm(channels: int) -> nn.Module:
            return FiLMGroupNorm(channels, cond_features) if cond_features else _norm(channels)

        self.start_channels = widths[0]
        self.project = nn.Linear(in_features, widths[0] * FINAL_MAP * FINAL_MAP)
        layers: list[nn.Module] = [norm(widths[0]), nn.SiLU()]
        doublings = list(zip(widths, [*widths[1:], widths[-1]], strict=True))
        if tail == "pixel-shuffle":
            doublings.pop()  # the last one is the shuffle
        for width, next_width in doublings:
            layers += [
                nn.ConvTranspose2d(width, next_width, 4, stride=2, padding=1, bias=False),
                norm(next_width),
                nn.SiLU(),
            ]
        if tail == "pixel-shuffle":
            layers += [nn.Conv2d(widths[-1], 4 * out_channels, 3, padding=1), nn.PixelShuffle(2)]
        else:
            layers.append(nn.Conv2d(widths[-1], out_channels, 3, padding=1))
        self.stages = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        out = self.project(h).view(-1, self.start_channels, FINAL_MAP, FINAL_MAP)
        for layer in self.stages:
            out = layer(out, cond) if isinstance(layer, FiLMGroupNorm) else layer(out)
        return out
