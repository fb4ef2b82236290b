"""IWAE (Burda et al. 2016, "Importance Weighted Autoencoders") and its conditional form.

The same networks as the VAE / CVAE, trained on the K-sample importance-weighted
bound log (1/K) sum_k p(x, z_k) / q(z_k | x), which is tighter than the ELBO for
K > 1 and gives the encoder room for posteriors a single sample would punish.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from zoo.model import GenerativeModel, ModelConfig
from zoo.models.cvae import CVAE
from zoo.models.vae import VAE
from zoo.registry import register_model


@dataclass
class IWAEConfig(ModelConfig):
    num_samples: int = 5  # K importance samples per image; K = 1 is the plain VAE bound


class ImportanceWeightedLoss(GenerativeModel):
    """The IWAE objective, shared by the unconditional and conditional forms.

    ``beta`` scales log p(z) - log q(z|x) inside each weight, so beta = 1 is the IWAE bound.
    """

    config_class = IWAEConfig

    def loss(
        self, x: torch.Tensor, y: torch.Tensor | None = None, *, kl_weight: float = 1.0
    ) -> dict[str, torch.Tensor]:
        samples = max(1, self.config.num_samples)
        posterior = self.encode(x, y)
        batch = x.shape[0]
        # randn_like, not randn of the shape: torch.compile traces it at any batch size
        noise = torch.randn_like(posterior.mean.expand(samples, *posterior.mean.shape))
        z = posterior.mean + posterior.std * noise  # K x B x D
        y_repeated = y.repeat(samples, 1) if y is not None else None
        logits = self.decode_logits(z.flatten(0, 1), y_repeated)
        nll = self.reconstruction_nll(logits, x.repeat(samples, 1, 1, 1)).view(samples, batch)
        log_pz = self.log_prior(z)
        log_qz = posterior.log_prob(z)
        log_weights = -nll + self.config.beta * kl_weight * (log_pz - log_qz)
        bound = torch.logsumexp(log_weights, dim=0) - math.log(samples)
        return {"loss": -bound.mean(), "recon": nll.mean(), "kl": posterior.kl().mean()}


@register_model("iwae")
class IWAE(ImportanceWeightedLoss, VAE):
    """Importance-weighted autoencoder: a VAE trained on the K-sample bound (default K 5)."""

    family = "IWAE"
    paper = "Burda et al. 2016, Importance Weighted Autoencoders"


@register_model("ciwae")
class CIWAE(ImportanceWeightedLoss, CVAE):
    """Conditional IWAE: the CVAE's networks trained on the K-sample bound."""

    family = "IWAE"
    paper = "Burda et al. 2016, Importance Weighted Autoencoders"
