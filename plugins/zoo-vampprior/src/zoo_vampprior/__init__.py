"""VampPrior VAE and CVAE as a zoo model plugin."""

from zoo_vampprior.vampprior import VampPriorConfig, VampPriorCVAE, VampPriorVAE

__all__ = ["VampPriorCVAE", "VampPriorConfig", "VampPriorVAE"]
