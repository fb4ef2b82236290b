"""beta-TCVAE (Chen et al. 2018, "Isolating Sources of Disentanglement in VAEs").

The KL term of the ELBO splits into index-code mutual information, total
correlation (TC) and dimension-wise KL; beta-TCVAE weighs only the TC by beta,
so it buys disentanglement without starving the code of information as a
large-beta VAE does. log q(z) is estimated on the minibatch with the paper's
minibatch-weighted sampling, which needs the dataset size (taken from the data
by the trainer); under DDP the minibatch is the global batch, gathered from every
process (`zoo.distributed.gather_batch`), so N processes train as one does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from zoo.data import ImageData
from zoo.distributed import gather_batch
from zoo.model import GenerativeModel, ModelConfig, gaussian_log_density
from zoo.models.cvae import CVAE
from zoo.models.vae import VAE
from zoo.registry import register_model


@dataclass
class TCVAEConfig(ModelConfig):
    beta: float = 6.0  # weight of the total correlation; MI and dimension-wise KL keep weight 1
    dataset_size: int = 0  # N of the minibatch-weighted estimator; 0 means "the batch size"


class TotalCorrelationLoss(GenerativeModel):
    """The beta-TCVAE objective, shared by the unconditional and conditional forms."""

    config_class = TCVAEConfig

    @classmethod
    def data_config(cls, data: ImageData) -> dict[str, Any]:
        return {**super().data_config(data), "dataset_size": len(data)}

    def loss(
        self, x: torch.Tensor, y: torch.Tensor | None = None, *, kl_weight: float = 1.0
    ) -> dict[str, torch.Tensor]:
        posterior, z, recon = self.encode_and_reconstruct(x, y)
        # q(z) is estimated over the whole global batch: under DDP every rank's posteriors
        mean, logvar = gather_batch(posterior.mean), gather_batch(posterior.logvar)
        batch = mean.shape[0]
        dataset_size = max(self.config.dataset_size, batch)
        log_norm = math.log(batch * dataset_size)
        # log q(z_i | x_j) for this process's z_i, every x_j of the batch, every dimension d
        pairwise = gaussian_log_density(z[:, None, :], mean[None, :, :], logvar[None, :, :])
        log_qz = torch.logsumexp(pairwise.sum(dim=2), dim=1) - log_norm
        log_qz_product = (torch.logsumexp(pairwise, dim=1) - log_norm).sum(dim=1)
        log_qz_given_x = posterior.log_prob(z)
        log_pz = self.log_prior(z)
        mutual_information = (log_qz_given_x - log_qz).mean()
        total_correlation = (log_qz - log_qz_product).mean()
        dimension_kl = (log_qz_product - log_pz).mean()
        regulariser = mutual_information + self.config.beta * total_correlation + dimension_kl
        return {
            "loss": recon + kl_weight * regulariser,
            "recon": recon,
            "kl": posterior.kl().mean(),
            "mutual_information": mutual_information,
            "total_correlation": total_correlation,
            "dimension_kl": dimension_kl,
        }


@register_model("beta-tcvae")
class BetaTCVAE(TotalCorrelationLoss, VAE):
    """beta-TCVAE: penalises only the total correlation of the code (default beta 6)."""

    family = "beta-TCVAE"
    paper = "Chen et al. 2018, Isolating Sources of Disentanglement in Variational Autoencoders"


@register_model("beta-tc-cvae")
class BetaTCCVAE(TotalCorrelationLoss, CVAE):
    """Conditional beta-TCVAE: the CVAE's networks with the total-correlation objective."""

    family = "beta-TCVAE"
    paper = "Chen et al. 2018, Isolating Sources of Disentanglement in Variational Autoencoders"
