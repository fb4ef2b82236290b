"""The VampPrior (Tomczak and Welling 2018): a prior made of the encoder's own posteriors.

p(z) = (1/K) sum_k q(z | u_k), where the u_k are K learned pseudo-inputs (images),
pushed through the same encoder as the data. The KL term has no closed form, so
the loss uses the single-sample estimate log q(z|x) - log p(z).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from zoo import ModelConfig, Posterior
from zoo.model import gaussian_log_density
from zoo.models.cvae import CVAE
from zoo.models.vae import VAE


@dataclass
class VampPriorConfig(ModelConfig):
    num_pseudo_inputs: int = 50


class VampPriorMixin:
    """Pseudo-inputs, the mixture prior, its sampler and the loss; mixed into VAE or CVAE."""

    config: VampPriorConfig
    conditional: bool

    def _init_pseudo_inputs(self) -> None:
        c = self.config
        count = max(1, c.num_pseudo_inputs)
        # stored as logits so the pseudo-images stay inside [0, 1] like real images
        self.pseudo_logits = nn.Parameter(
            0.1 * torch.randn(count, c.channels, c.image_size, c.image_size)
        )
        if self.conditional:
            self.pseudo_label_logits = nn.Parameter(torch.zeros(count, c.num_attributes))

    def prior_components(self) -> Posterior:
        """q(z | u_k) for every pseudo-input: the K components of the mixture prior."""
        pseudo_inputs = torch.sigmoid(self.pseudo_logits)
        labels = torch.sigmoid(self.pseudo_label_logits) if self.conditional else None
        return self.encode(pseudo_inputs, labels)

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        components = self.prior_components()
        pairwise = gaussian_log_density(
            z[:, None, :], components.mean[None], components.logvar[None]
        ).sum(dim=-1)
        return torch.logsumexp(pairwise, dim=1) - math.log(components.mean.shape[0])

    def sample_prior(
        self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0
    ) -> torch.Tensor:
        components = self.prior_components()
        device = generator.device if generator is not None else components.mean.device
        choice = torch.randint(components.mean.shape[0], (n,), generator=generator, device=device)
        noise = torch.randn(n, self.config.latent_dim, generator=generator, device=device)
        choice, noise = choice.to(components.mean.device), noise.to(components.mean.device)
        return components.mean[choice] + temperature * components.std[choice] * noise

    def loss(
        self, x: torch.Tensor, y: torch.Tensor | None = None, *, kl_weight: float = 1.0
    ) -> dict[str, torch.Tensor]:
        posterior, z, recon = self.encode_and_reconstruct(x, y)
        kl = (posterior.log_prob(z) - self.log_prior(z)).mean()
        return {"loss": recon + self.config.beta * kl_weight * kl, "recon": recon, "kl": kl}


class VampPriorVAE(VampPriorMixin, VAE):
    """VAE whose prior is a mixture of posteriors at learned pseudo-inputs (VampPrior)."""

    family = "VampPrior"
    paper = "Tomczak and Welling 2018, VAE with a VampPrior"
    config_class = VampPriorConfig

    def __init__(self, config: VampPriorConfig) -> None:
        super().__init__(config)
        self._init_pseudo_inputs()


class VampPriorCVAE(VampPriorMixin, CVAE):
    """Conditional VAE (labels in encoder and decoder) with a VampPrior on z."""

    family = "VampPrior"
    paper = "Tomczak and Welling 2018, VAE with a VampPrior"
    config_class = VampPriorConfig

    def __init__(self, config: VampPriorConfig) -> None:
        super().__init__(config)
        self._init_pseudo_inputs()
