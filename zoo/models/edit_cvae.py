"""CVAEs that obey their labels: the mechanisms the literature uses to make a label swap edit.

A plain CVAE (`cvae`) sees the attributes twice, in x and in y, and learns to read them from
x: the encoder keeps them in z and the decoder hardly looks at y, so changing y barely
changes the face. Each mechanism below attacks one side of that, and each is a config field,
so any combination is one ``-o`` away:

- ``film`` (FiLM, Perez et al. 2018; conditional normalisation as in de Vries et al. 2017):
  y scales and shifts every decoder GroupNorm, so it reaches every resolution instead of
  being 40 of the 168 numbers the first layer reads.
- ``adversary_weight`` (Fader Networks, Lample et al. 2017): a small discriminator learns to
  predict y from the posterior mean, and the encoder is penalised, with a weight ramped up
  over ``adversary_warmup`` steps, for every guess that is not 1/2. Fader's own target,
  1 - y, lets the encoder win by storing the attributes inverted, so the game flips back and
  forth; the confusion target (Tzeng et al. 2015) has its minimum where the discriminator
  cannot tell. With the attributes hidden from z, the decoder must take them from y.
- ``attr_weight`` (AttGAN's attribute classification constraint, He et al. 2019): an
  attribute head learns the labels from real images; each step also decodes z with randomly
  flipped labels, and the head's disagreement with those labels is the decoder's loss.
  Without AttGAN's image discriminator the decoder soon fools a plain head with faint
  textures no other classifier reads; ``head_noise`` adds Gaussian noise to everything the
  head sees (as randomized smoothing does, Cohen et al. 2019), so only changes larger than
  the noise move it, and those are the ones an independent classifier reads too.
  ``head_shift`` and ``head_blur`` show the head every image (real and decoded) shifted by
  up to that fraction of its side, mirrored half the time, and blurred with a Gaussian of
  random std up to ``head_blur`` pixels. The rulers that score edits train on shifted faces
  and are of other families: a decoder that must move the head at every shift and blur
  cannot do it with a texture aligned to its own pixel grid, only with the face's features.
  ``attr_step_min`` below 1 decodes each swapped sample with only a random fraction in
  [``attr_step_min``, 1] of its label change while the head must still read the whole
  change: the decoder learns to make an edit visible within part of the label step, so
  the full step of a real edit is no longer the bare minimum the head accepts.
  ``attr_keep_weight`` below 1 weighs the head's disagreement on the labels a swap keeps
  less than on the ones it flips. Kept labels that come with a flipped one in the data
  (Wearing_Lipstick and Heavy_Makeup with Male = 0) otherwise ask the head for a
  contradiction, a man wearing lipstick, and the decoder settles for a half-made edit.
- ``realism_weight`` (AttGAN's image adversary, aimed at edits only): a critic learns to
  tell decodes with flipped labels from ordinary reconstructions, and the decoder is
  penalised when it can. Reconstructions, not real photographs, are its "real" class, so
  it does not fight the VAE's blur; it can only learn what an edit adds that no
  reconstruction has, which is the blotches an attribute loss alone paints.
  ``critic_patch`` = k > 0 makes it judge patches instead (PatchGAN, Isola et al. 2017): k
  stride-2 stages (all of them on an image too small for k) and a 1 x 1 convolution, one
  verdict per cell of the map, each cell seeing 10, 22 or 46 pixels for k = 2, 3, 4.
  Blotches are local, so it still sees them, but a whole-image critic also learns that no
  reconstruction is a man with lipstick and fights exactly the edits that break the data's
  correlations.

The discriminator, the head and the critic are parameters of the model, so they are saved
and resumed with it, but `encode`, `decode` and `generate` never call them. Each trains only
on its own loss: the model's other losses reach them through detached copies of their
weights, which keeps one optimizer and one backward pass per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from zoo.augment import random_blur, random_shift
from zoo.errors import ZooError
from zoo.model import ModelConfig, Posterior
from zoo.models.cvae import CVAE
from zoo.nets import ConvEncoder, stage_channels
from zoo.registry import register_model


@dataclass
class EditCVAEConfig(ModelConfig):
    """The CVAE's fields plus one switch or weight per mechanism (all off: the plain CVAE)."""

    film: bool = False
    adversary_weight: float = 0.0
    adversary_warmup: int = 500
    adversary_hidden: int = 256
    attr_weight: float = 0.0
    attr_flip_prob: float = 0.1
    attr_step_min: float = 1.0
    attr_keep_weight: float = 1.0
    head_noise: float = 0.0
    head_shift: float = 0.0
    head_blur: float = 0.0
    realism_weight: float = 0.0
    critic_patch: int = 0
    # the editors keep the old tail until a seeded study shows the new one edits as well
    decoder_tail: str = "deconv"

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.film, bool):
            raise ZooError(f"film must be true or false, got {self.film!r}")
        if min(self.adversary_weight, self.attr_weight, self.realism_weight) < 0:
            raise ZooError("adversary_weight, attr_weight and realism_weight must be >= 0")
        if self.adversary_warmup < 0 or self.adversary_hidden < 1:
            raise ZooError("adversary_warmup must be >= 0 and adversary_hidden >= 1")
        if min(self.head_noise, self.head_blur) < 0:
            raise ZooError("head_noise and head_blur must be non-negative")
        if not 0 <= self.head_shift < 0.5:
            raise ZooError(f"head_shift must be in [0, 0.5), got {self.head_shift}")
        if not 0 < self.attr_flip_prob <= 1:
            raise ZooError(f"attr_flip_prob must be in (0, 1], got {self.attr_flip_prob}")
        if not 0 <= self.attr_keep_weight <= 1:
            raise ZooError(f"attr_keep_weight must be in [0, 1], got {self.attr_keep_weight}")
        if not 0 < self.attr_step_min <= 1:
            raise ZooError(f"attr_step_min must be in (0, 1], got {self.attr_step_min}")
        if self.critic_patch < 0:
            raise ZooError(f"critic_patch must be 0 (whole image) or more, got {self.critic_patch}")


Losses = dict[str, torch.Tensor]


def _frozen(module: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """Call ``module`` with detached weights: gradients reach the inputs, never the module."""
    weights = {name: p.detach() for name, p in module.named_parameters()}
    return functional_call(module, weights, inputs)


def _bce(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Binary cross-entropy summed over attributes, averaged over the batch (like recon/KL)."""
    return F.binary_cross_entropy_with_logits(
        logits.float(), target, weight, reduction="sum"
    ) / len(target)


@register_model("edit-cvae")
class EditCVAE(CVAE):
    """CVAE with FiLM, a Fader latent adversary, an AttGAN attribute loss and an edit critic."""

    family = "CVAE + edit mechanisms"
    config_class = EditCVAEConfig

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        c = self.config
        if c.film:  # replaces the plain decoder the CVAE built
            self.decoder = self.conv_decoder(cond_features=c.num_attributes)
        self.discriminator = None
        if c.adversary_weight > 0:
            self.discriminator = nn.Sequential(
                nn.Linear(c.latent_dim, c.adversary_hidden),
                nn.LeakyReLU(0.2),
                nn.Linear(c.adversary_hidden, c.adversary_hidden),
                nn.LeakyReLU(0.2),
                nn.Linear(c.adversary_hidden, c.num_attributes),
            )
            # the ramp's clock lives in the state dict, so a resumed run continues it
            self.register_buffer("adversary_step", torch.zeros((), dtype=torch.long))
        self.attribute_head = None
        if c.attr_weight > 0:
            encoder = ConvEncoder(c.channels, c.image_size, c.base_channels, c.max_channels)
            self.attribute_head = nn.Sequential(
                encoder, nn.Linear(encoder.out_features, c.num_attributes)
            )

        self.critic = None
        if c.realism_weight > 0:
            encoder = ConvEncoder(c.channels, c.image_size, c.base_channels, c.max_channels)
            if c.critic_patch:  # an image too small for that many stages uses all it has
                widths = stage_channels(c.image_size, c.base_channels, c.max_channels)
                stages = min(c.critic_patch, len(widths))
                self.critic = nn.Sequential(
                    *encoder.stages[: 3 * stages], nn.Conv2d(widths[stages - 1], 1, 1)
                )
            else:
                self.critic = nn.Sequential(encoder, nn.Linear(encoder.out_features, 1))

    def decode_logits(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        y = self.check_attributes(y, z.shape[0]).to(z.dtype)
        return self.decoder(torch.cat([z, y], dim=1), y if self.config.film else None)

    def flipped_labels(self, y: torch.Tensor) -> torch.Tensor:
        """Labels with each attribute flipped with probability ``attr_flip_prob``."""
        flips = torch.rand_like(y) < self.config.attr_flip_prob
        return torch.where(flips, 1.0 - y, y)

    def partial_step(self, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Labels a random fraction in [``attr_step_min``, 1] of the way from y to target."""
        if self.config.attr_step_min == 1:
            return target
        step = torch.empty(len(y), 1, device=y.device).uniform_(self.config.attr_step_min, 1)
        return y + step * (target - y)

    def head_view(self, images: torch.Tensor) -> torch.Tensor:
        """Images as the head sees them: shifted and mirrored (``head_shift``), blurred
        (``head_blur``) and with Gaussian noise of std ``head_noise``, each only if set."""
        c = self.config
        if c.head_shift:
            mirrored = torch.rand(len(images), 1, 1, 1, device=images.device) < 0.5
            images = random_shift(torch.where(mirrored, images.flip(3), images), c.head_shift)
        if c.head_blur:
            images = random_blur(images, c.head_blur)
        if c.head_noise:
            images = images + c.head_noise * torch.randn_like(images)
        return images

    def loss(
        self, x: torch.Tensor, y: torch.Tensor | None = None, *, kl_weight: float = 1.0
    ) -> dict[str, torch.Tensor]:
        y = self.check_attributes(y, x.shape[0])
        posterior: Posterior = self.encode(x, y)
        z = posterior.sample()
        logits = self.decode_logits(z, y)
        recon = self.reconstruction_nll(logits, x).mean()
        kl = posterior.kl().mean()
        total = recon + self.config.beta * kl_weight * kl
        losses = {"recon": recon, "kl": kl}
        if self.discriminator is not None:
            total = self.latent_adversary(posterior, y, total, losses)
        if self.attribute_head is not None or self.critic is not None:
            total = self.swapped_decodes(x, y, z, logits, total, losses)
        return {"loss": total, **losses}

    def latent_adversary(
        self, posterior: Posterior, y: torch.Tensor, total: torch.Tensor, losses: Losses
    ) -> torch.Tensor:
        """Fader: the discriminator learns y from z; the encoder is pushed to confuse it.
        Adds its terms to ``losses`` and returns ``total`` plus their weighted sum."""
        c = self.config
        guess = self.discriminator(posterior.mean.detach())
        disc = _bce(guess, y)
        confused = torch.full_like(y, 0.5)
        adversary = _bce(_frozen(self.discriminator, posterior.mean), confused)
        ramp = (self.adversary_step.float() / max(c.adversary_warmup, 1)).clamp(max=1.0)
        if self.training:
            self.adversary_step += 1
        accuracy = ((guess.detach() > 0).float() == y).float().mean()
        losses |= {"disc": disc, "adversary": adversary, "disc_acc": accuracy}
        return total + disc + c.adversary_weight * ramp * adversary

    def swapped_decodes(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        z: torch.Tensor,
        logits: torch.Tensor,
        total: torch.Tensor,
        losses: Losses,
    ) -> torch.Tensor:
        """Decode z with flipped labels; the head must read the new labels, the critic must
        not tell the result from an ordinary reconstruction."""
        c = self.config
        head = self.attribute_head
        head_reading = None if head is None else head(self.head_view(x))
        target = self.flipped_labels(y)
        edited = torch.sigmoid(self.decode_logits(z, self.partial_step(y, target)))
        if head is not None:
            head_loss = _bce(head_reading, y)
            label_weight = torch.where(target == y, c.attr_keep_weight, 1.0)
            attr = _bce(_frozen(head, self.head_view(edited)), target, label_weight)
            total = total + head_loss + c.attr_weight * attr
            losses |= {"head": head_loss, "attr": attr}
        if self.critic is not None:
            # reconstructions are "real": the critic can only learn what edits add (artefacts)
            real = self.critic(torch.sigmoid(logits).detach())
            fake = self.critic(edited.detach())
            critic = F.softplus(-real).mean() + F.softplus(fake).mean()
            realism = F.softplus(-_frozen(self.critic, edited)).mean()
            total = total + critic + c.realism_weight * realism
            losses |= {"critic": critic, "realism": realism}
        return total


@dataclass
class FiLMCVAEConfig(EditCVAEConfig):
    film: bool = True


@register_model("film-cvae")
class FiLMCVAE(EditCVAE):
    """CVAE whose labels scale and shift every decoder stage (FiLM)."""

    family = "CVAE + FiLM"
    paper = "Perez et al. 2018, FiLM: Visual Reasoning with a General Conditioning Layer"
    config_class = FiLMCVAEConfig


@dataclass
class FaderCVAEConfig(EditCVAEConfig):
    adversary_weight: float = 10.0


@register_model("fader-cvae")
class FaderCVAE(EditCVAE):
    """CVAE whose encoder is trained to hide the labels from a latent discriminator (Fader)."""

    family = "CVAE + Fader adversary"
    paper = "Lample et al. 2017, Fader Networks: Manipulating Images by Sliding Attributes"
    config_class = FaderCVAEConfig


@dataclass
class AttrCVAEConfig(EditCVAEConfig):
    attr_weight: float = 100.0
    head_noise: float = 0.3


@register_model("attr-cvae")
class AttrCVAE(EditCVAE):
    """CVAE trained so an attribute head reads the labels it was decoded with (AttGAN)."""

    family = "CVAE + AttGAN loss"
    paper = "He et al. 2019, AttGAN: Facial Attribute Editing by Only Changing What You Want"
    config_class = AttrCVAEConfig


@dataclass
class FiLMAttrCVAEConfig(AttrCVAEConfig):
    film: bool = True


@register_model("film-attr-cvae")
class FiLMAttrCVAE(EditCVAE):
    """FiLM decoder trained against a noise-smoothed attribute head."""

    family = "CVAE + FiLM + AttGAN loss"
    paper = "Perez et al. 2018 (FiLM); He et al. 2019 (AttGAN)"
    config_class = FiLMAttrCVAEConfig


@dataclass
class FiLMAttrCriticCVAEConfig(FiLMAttrCVAEConfig):
    realism_weight: float = 300.0
    critic_patch: int = 3
    attr_step_min: float = 0.5
    attr_keep_weight: float = 0.25


@register_model("film-attr-critic-cvae")
class FiLMAttrCriticCVAE(EditCVAE):
    """The recommended editor: FiLM, the smoothed attribute loss on partial label steps with
    kept labels weighed lightly, and a patch critic."""

    family = "CVAE + FiLM + AttGAN loss + patch critic"
    paper = "Perez et al. 2018 (FiLM); He et al. 2019 (AttGAN); Isola et al. 2017 (PatchGAN)"
    config_class = FiLMAttrCriticCVAEConfig
