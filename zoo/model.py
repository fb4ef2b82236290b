"""The common interface every zoo model speaks.

Images are float N x C x H x W in [0, 1] at every public boundary; attributes are
float N x A in {0, 1}. A model is an `nn.Module` whose config dataclass fully
rebuilds it, which is what lets a checkpoint be a plain safetensors file.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from zoo.errors import ZooError
from zoo.nets import DECODER_TAILS

if TYPE_CHECKING:
    from zoo.data import ImageData
    from zoo.metadata import CheckpointInfo

LIKELIHOODS = ("gaussian", "bernoulli")
LOG_2PI = math.log(2 * math.pi)


def gaussian_log_density(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, exp(logvar)) per dimension; broadcasts, so pairwise tables are one call."""
    return -0.5 * (LOG_2PI + logvar + (z - mean).pow(2) * torch.exp(-logvar))


@dataclass
class ModelConfig:
    """Fields shared by the built-in models; plugins subclass it and add their own.

    `recon_sigma` is the fixed standard deviation of the Gaussian decoder: the
    reconstruction term is sum((x - x_hat)^2) / (2 sigma^2), the negative
    log-likelihood up to a constant, so `beta` keeps its beta-VAE meaning.
    `decoder_tail` is how the conv decoder makes its last doubling (`zoo.nets`).
    """

    image_size: int = 64
    channels: int = 3
    num_attributes: int = 0
    latent_dim: int = 128
    base_channels: int = 32
    max_channels: int = 256
    beta: float = 1.0
    likelihood: str = "gaussian"
    recon_sigma: float = 0.1
    decoder_tail: str = "pixel-shuffle"

    # fields added after checkpoints were written, with the value every config saved without
    # them was built with: a saved config lists all its fields, so a missing one is older
    SAVED_BEFORE: ClassVar[dict[str, Any]] = {"decoder_tail": "deconv"}

    @classmethod
    def from_saved(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from a config a checkpoint or run recorded; fields it predates get the value
        it was built with, so every older checkpoint loads and decodes exactly as before."""
        older = {k: v for k, v in cls.SAVED_BEFORE.items() if k in _field_names(cls)}
        return cls.from_dict({**older, **values})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from (possibly partial) values, rejecting unknown fields with their names."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ZooError(
                f"{cls.__name__} has no field(s) {', '.join(unknown)}; "
                f"valid fields: {', '.join(fields)}"
            )
        coerced = {}
        for key, value in values.items():
            if value is None:
                continue
            default = getattr(cls, key, None)
            if isinstance(default, bool) or not isinstance(default, (int, float)):
                coerced[key] = value
            else:
                try:
                    coerced[key] = type(default)(value)
                except (TypeError, ValueError):
                    raise ZooError(f"config field {key} must be a number, got {value!r}") from None
        config = cls(**coerced)
        config.validate()
        return config

    def validate(self) -> None:
        if self.likelihood not in LIKELIHOODS:
            raise ZooError(f"likelihood {self.likelihood!r} is not one of {', '.join(LIKELIHOODS)}")
        if self.latent_dim < 1:
            raise ZooError(f"latent_dim must be at least 1, got {self.latent_dim}")
        if self.beta < 0:
            raise ZooError(f"beta must be non-negative, got {self.beta}")
        if self.recon_sigma <= 0:
            raise ZooError(f"recon_sigma must be positive, got {self.recon_sigma}")
        if self.decoder_tail not in DECODER_TAILS:
            raise ZooError(
                f"decoder_tail {self.decoder_tail!r} is not one of {', '.join(DECODER_TAILS)}"
            )
        if self.channels < 1 or self.num_attributes < 0:
            raise ZooError("channels must be >= 1 and num_attributes >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _field_names(config_class: type) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class)}


@dataclass
class Posterior:
    """A diagonal Gaussian q(z|x), kept in fp32 under autocast; `logvar` is clamped so
    extreme inputs cannot overflow exp."""

    mean: torch.Tensor
    logvar: torch.Tensor

    def __post_init__(self) -> None:
        self.mean = self.mean.float()
        self.logvar = self.logvar.float().clamp(-30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A reparameterised draw. Without a generator it is ``randn_like`` (the same numbers
        as ``randn`` of the shape), which torch.compile can trace at a batch size it has not
        seen (the last, smaller batch of an epoch); ``randn`` of a symbolic shape cannot."""
        if generator is None:
            return self.mean + self.std * torch.randn_like(self.mean)
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z|x) per sample, summed over latent dimensions."""
        return gaussian_log_density(z, self.mean, self.logvar).sum(dim=-1)

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over latent dimensions."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=1)


class GenerativeModel(nn.Module):
    """Base class: a latent-variable image model with encode / decode / generate / loss.

    Subclasses implement `encode` and `decode_logits`; the base class turns those
    into images, samples and the (beta-weighted) negative ELBO. Models whose loss
    is not an ELBO of this shape override `loss`.
    """

    registry_name: ClassVar[str] = ""  # set by the registry
    family: ClassVar[str] = ""
    paper: ClassVar[str] = ""  # the method's paper, for model cards: "Authors Year, Title"
    conditional: ClassVar[bool] = False
    config_class: ClassVar[type[ModelConfig]] = ModelConfig

    checkpoint_info: CheckpointInfo | None = None
    """The file's metadata (attributes, data, preprocessing) when `zoo.load` built the model;
    None for a model built in memory, which has no training data to describe."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            config = self.config_class.from_dict(dataclasses.asdict(config))
        if self.conditional and config.num_attributes < 1:
            raise ZooError(
                f"{self.model_name} is conditional and needs "
                "num_attributes >= 1 (the trainer sets it from the data's attributes)"
            )
        self.config = config

    @classmethod
    def data_config(cls, data: ImageData) -> dict[str, Any]:
        """Config fields that follow from the training data (models may add their own)."""
        config = {"image_size": data.preprocess.image_size, "channels": data.preprocess.channels}
        if cls.conditional:
            config["num_attributes"] = len(data.attr_names)
        return config

    @classmethod
    def check_registrable(cls) -> None:
        """Refuse, at registration, a class that cannot work: it must encode and decode."""
        missing = [
            name
            for name, overridden in (
                ("encode", cls.encode is not GenerativeModel.encode),
                (
                    "decode_logits (or decode)",
                    cls.decode_logits is not GenerativeModel.decode_logits
                    or cls.decode is not GenerativeModel.decode,
                ),
            )
            if not overridden
        ]
        if missing:
            raise ZooError(f"{cls.__qualname__} does not implement {' and '.join(missing)}")

    @property
    def model_name(self) -> str:
        return self.registry_name or type(self).__name__

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- what subclasses provide -------------------------------------------------------------

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> Posterior:
        raise NotImplementedError

    def decode_logits(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    # -- the public interface -----------------------------------------------------------------

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self.decode_logits(z, y))

    def generate(
        self,
        n: int,
        y: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Decode n draws from the prior (scaled by `temperature`)."""
        z = self.sample_prior(n, generator=generator, temperature=temperature)
        return self.decode(z, self.check_attributes(y, n))

    def sample_prior(
        self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0
    ) -> torch.Tensor:
        """n latent codes from the prior N(0, I), scaled by `temperature`, on the model's device.

        Models with another prior (a mixture, a learned prior) override this; generation,
        FID and the latent tools all draw through it.
        """
        device = generator.device if generator is not None else self.device
        z = torch.randn(n, self.latent_dim, generator=generator, device=device)
        return (temperature * z).to(self.device)

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) under the prior N(0, I), summed over the last (latent) dimension.

        The density beside `sample_prior`: objectives that need log p(z) (IWAE, beta-TCVAE)
        call it, so a model with another prior overrides both.
        """
        return (-0.5 * (LOG_2PI + z.pow(2))).sum(dim=-1)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor | None = None, *, kl_weight: float = 1.0
    ) -> dict[str, torch.Tensor]:
        """Calling the model computes its training loss, so DDP and torch.compile wrap it."""
        return self.loss(x, y, kl_weight=kl_weight)

    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Decode the posterior mean: the deterministic reconstruction used by benchmarks."""
        return self.decode(self.encode(x, y).mean, y)

    def loss(
        self, x: torch.Tensor, y: torch.Tensor | None = None, *, kl_weight: float = 1.0
    ) -> dict[str, torch.Tensor]:
        """loss = recon + beta * kl_weight * KL, per-image sums averaged over the batch.

        `kl_weight` in [0, 1] is the KL warm-up factor; at 1 and beta=1 `loss` is the
        negative ELBO (up to the Gaussian likelihood's constant).
        """
        posterior, _, recon = self.encode_and_reconstruct(x, y)
        kl = posterior.kl().mean()
        return {"loss": recon + self.config.beta * kl_weight * kl, "recon": recon, "kl": kl}

    def encode_and_reconstruct(
        self, x: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[Posterior, torch.Tensor, torch.Tensor]:
        """(posterior q(z|x), one reparameterised sample z, batch-mean reconstruction NLL of x
        decoded from z): the first half of every single-sample ELBO, so an objective that
        overrides `loss` only writes its regulariser."""
        posterior = self.encode(x, y)
        z = posterior.sample()
        recon = self.reconstruction_nll(self.decode_logits(z, y), x).mean()
        return posterior, z, recon

    def reconstruction_nll(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """-log p(x|z) per image, summed over pixels, under the configured likelihood."""
        logits = logits.float()
        if self.config.likelihood == "bernoulli":
            nll = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
        else:
            nll = (torch.sigmoid(logits) - x).pow(2) / (2.0 * self.config.recon_sigma**2)
        return nll.flatten(1).sum(dim=1)

    def check_attributes(self, y: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """Conditional models need y of shape n x A; unconditional ones ignore it."""
        if not self.conditional:
            return None
        expected = (n, self.config.num_attributes)
        if y is None:
            raise ZooError(
                f"{self.model_name} is conditional: pass attributes y of shape {expected}"
            )
        if tuple(y.shape) != expected:
            raise ZooError(
                f"{self.model_name} expects attributes of shape {expected}, got {tuple(y.shape)}"
            )
        return y.to(device=self.device, dtype=torch.float32)

    def extra_repr(self) -> str:
        return f"name={self.model_name!r}, latent_dim={self.latent_dim}, beta={self.config.beta}"
