"""VAE (Kingma and Welling 2014) and beta-VAE (Higgins et al. 2017).

The same network; beta-VAE only changes the default weight of the KL term, so
`zoo train vae --beta 4` and `zoo train beta-vae` train the same model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from zoo.model import GenerativeModel, ModelConfig, Posterior
from zoo.nets import ConvDecoder, ConvEncoder
from zoo.registry import register_model


@register_model("vae")
class VAE(GenerativeModel):
    """Unconditional convolutional VAE with a diagonal Gaussian posterior."""

    family = "VAE"
    paper = "Kingma and Welling 2014, Auto-Encoding Variational Bayes"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        c = self.config
        self.encoder = ConvEncoder(c.channels, c.image_size, c.base_channels, c.max_channels)
        self.to_posterior = nn.Linear(self.encoder.out_features, 2 * c.latent_dim)
        self.decoder = ConvDecoder(
            c.latent_dim,
            c.channels,
            c.image_size,
            c.base_channels,
            c.max_channels,
            tail=c.decoder_tail,
        )

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> Posterior:
        mean, logvar = self.to_posterior(self.encoder(x)).chunk(2, dim=1)
        return Posterior(mean, logvar)

    def decode_logits(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder(z)


@dataclass
class BetaVAEConfig(ModelConfig):
    beta: float = 4.0


@register_model("beta-vae")
class BetaVAE(VAE):
    """VAE with a heavier KL term (default beta 4) for more disentangled latents."""

    paper = (
        "Higgins et al. 2017, beta-VAE: Learning Basic Visual Concepts with a Constrained "
        "Variational Framework"
    )

    config_class = BetaVAEConfig
