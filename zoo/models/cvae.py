"""Conditional VAE (Sohn et al. 2015) and beta-CVAE, as in the seed CelebA design.

The attribute vector enters the encoder as an extra image channel (a learned
linear map from the A labels to one H x W plane) and the decoder concatenated
to z. Editing a face is then: encode with its labels, change the labels, decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from zoo.model import GenerativeModel, ModelConfig, Posterior
from zoo.nets import ConvDecoder, ConvEncoder
from zoo.registry import register_model


@register_model("cvae")
class CVAE(GenerativeModel):
    """Conditional VAE: labels as an extra encoder channel and beside z in the decoder."""

    family = "CVAE"
    paper = (
        "Sohn et al. 2015, Learning Structured Output Representation using Deep Conditional "
        "Generative Models"
    )
    conditional = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        c = self.config
        self.label_plane = nn.Linear(c.num_attributes, c.image_size * c.image_size)
        self.encoder = ConvEncoder(c.channels + 1, c.image_size, c.base_channels, c.max_channels)
        self.to_posterior = nn.Linear(self.encoder.out_features, 2 * c.latent_dim)
        self.decoder = self.conv_decoder()

    def conv_decoder(self, cond_features: int = 0) -> ConvDecoder:
        """The decoder of z beside y; with ``cond_features`` y also drives its norms (FiLM)."""
        c = self.config
        return ConvDecoder(
            c.latent_dim + c.num_attributes,
            c.channels,
            c.image_size,
            c.base_channels,
            c.max_channels,
            cond_features=cond_features,
            tail=c.decoder_tail,
        )

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> Posterior:
        y = self.check_attributes(y, x.shape[0])
        size = self.config.image_size
        plane = self.label_plane(y).view(-1, 1, size, size).to(x.dtype)
        features = self.encoder(torch.cat([x, plane], dim=1))
        mean, logvar = self.to_posterior(features).chunk(2, dim=1)
        return Posterior(mean, logvar)

    def decode_logits(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        y = self.check_attributes(y, z.shape[0])
        return self.decoder(torch.cat([z, y.to(z.dtype)], dim=1))


@dataclass
class BetaCVAEConfig(ModelConfig):
    beta: float = 4.0


@register_model("beta-cvae")
class BetaCVAE(CVAE):
    """Conditional VAE with a heavier KL term (default beta 4)."""

    config_class = BetaCVAEConfig
