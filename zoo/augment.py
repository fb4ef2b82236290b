"""Differentiable image augmentations, shared by the classifier rulers and the editors' head.

Both need the same thing: a reader of attributes that does not depend on where a face sits
to the pixel, nor on textures finer than a face's features. Everything here is built from
differentiable ops, so a decoder trained against a head that sees augmented images gets a
gradient through the augmentation (expectation over transformation, Athalye et al. 2018).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_shift(x: torch.Tensor, max_shift: float) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` of its side in x and y (edges repeated):
    faces in the data are aligned, edited and generated faces drift by a few pixels."""
    n = x.shape[0]
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = (torch.rand(n, 2) * 2 - 1).to(x.device) * 2 * max_shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), padding_mode="border", align_corners=False)


def random_blur(x: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Blur each image with a Gaussian of its own std, uniform in [0, ``max_sigma``] pixels.

    A texture of period 2 px (a transposed convolution's grid) keeps under 1 % of its
    amplitude at sigma 1, while an eye or a lip keeps its shape, so a reader that must
    work at every sigma can only be moved by changes as large as a face's features.
    """
    n, channels, height, width = x.shape
    radius = max(1, math.ceil(2 * max_sigma))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    sigma = (torch.rand(n, 1) * max_sigma).clamp(min=1e-3).to(x.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)  # n x taps; sigma -> 0 is the identity
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(x.dtype)
    # one depthwise pass per axis, each image's channels sharing its kernel (groups = n * c)
    taps = kernel.repeat_interleave(channels, dim=0)
    flat = F.pad(x.reshape(1, n * channels, height, width), (radius,) * 4, mode="reflect")
    flat = F.conv2d(flat, taps.view(n * channels, 1, 1, -1), groups=n * channels)
    flat = F.conv2d(flat, taps.view(n * channels, 1, -1, 1), groups=n * channels)
    return flat.view(n, channels, height, width)
