"""Every built-in model: interface shapes, ranges, the conditional contract, a loss that falls."""

from __future__ import annotations

import pytest
import torch

import zoo
from zoo.errors import ZooError
from zoo.nets import stage_channels

TINY = {"image_size": 16, "base_channels": 4, "max_channels": 8, "latent_dim": 6}
NUM_ATTRS = 5


def tiny_model(name: str, **overrides) -> zoo.GenerativeModel:
    config = {**TINY, **overrides}
    if zoo.registry.get_model_class(name).conditional:
        config.setdefault("num_attributes", NUM_ATTRS)
    return zoo.create_model(name, **config)


def batch(n: int = 4, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth coloured gradients: structured enough that a tiny model can fit them quickly."""
    generator = torch.Generator().manual_seed(0)
    colour = torch.rand(n, 3, 1, 1, generator=generator)
    ramp = torch.linspace(0, 1, size).view(1, 1, 1, size)
    x = (0.2 + 0.6 * colour * ramp).expand(n, 3, size, size).contiguous()
    y = (torch.rand(n, NUM_ATTRS, generator=generator) > 0.5).float()
    return x, y


BUILTINS = zoo.list_models()


@pytest.mark.parametrize("name", BUILTINS)
def test_interface_shapes_and_ranges(name):
    torch.manual_seed(0)
    model = tiny_model(name)
    x, y = batch()
    posterior = model.encode(x, y)
    assert posterior.mean.shape == posterior.logvar.shape == (4, 6)
    assert posterior.sample().shape == (4, 6)
    assert posterior.kl().shape == (4,) and (posterior.kl() >= 0).all()
    for images in (model.decode(posterior.mean, y), model.generate(4, y), model.reconstruct(x, y)):
        assert images.shape == x.shape and images.dtype == torch.float32
        assert images.min() >= 0 and images.max() <= 1
    losses = model.loss(x, y)
    assert {"loss", "recon", "kl"} <= set(losses)
    assert all(value.dim() == 0 and torch.isfinite(value) for value in losses.values())
    if type(model).loss is zoo.GenerativeModel.loss:  # the plain (beta-)ELBO
        expected = losses["recon"] + model.config.beta * losses["kl"]
        torch.testing.assert_close(losses["loss"], expected)


@pytest.mark.parametrize("name", BUILTINS)
def test_loss_falls_on_a_tiny_batch(name):
    torch.manual_seed(0)
    model = tiny_model(name)
    x, y = batch(8)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = model.loss(x, y)["loss"].item()
    for _ in range(60):
        loss = model.loss(x, y)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model.loss(x, y)["loss"].item() < 0.5 * first


def test_conditional_models_require_and_use_y():
    torch.manual_seed(0)
    model = tiny_model("cvae").eval()
    x, y = batch()
    with pytest.raises(ZooError, match="conditional: pass attributes"):
        model.encode(x)
    with pytest.raises(ZooError, match=r"expects attributes of shape \(4, 5\)"):
        model.decode(torch.zeros(4, 6), y[:, :2])
    z = torch.zeros(4, 6)
    assert not torch.allclose(model.decode(z, y), model.decode(z, 1 - y))


def test_unconditional_models_ignore_y():
    torch.manual_seed(0)
    model = tiny_model("vae").eval()
    x, y = batch()
    torch.testing.assert_close(model.reconstruct(x, y), model.reconstruct(x))


def test_beta_weighs_the_kl_term():
    torch.manual_seed(0)
    model = tiny_model("vae", beta=3.0)
    x, _ = batch()
    torch.manual_seed(1)
    losses = model.loss(x)
    torch.testing.assert_close(losses["loss"], losses["recon"] + 3.0 * losses["kl"])
    torch.manual_seed(1)
    warm = model.loss(x, kl_weight=0.5)
    torch.testing.assert_close(warm["loss"], warm["recon"] + 1.5 * warm["kl"])


def test_bernoulli_likelihood_is_binary_cross_entropy():
    model = tiny_model("vae", likelihood="bernoulli")
    x = torch.rand(2, 3, 16, 16)
    logits = torch.randn(2, 3, 16, 16)
    expected = torch.nn.functional.binary_cross_entropy(torch.sigmoid(logits), x, reduction="sum")
    torch.testing.assert_close(
        model.reconstruction_nll(logits, x).sum(), expected, rtol=1e-4, atol=1e-3
    )


@pytest.mark.parametrize("size,stages", [(32, 3), (64, 4), (128, 5)])
def test_backbone_depth_follows_image_size(size, stages):
    assert len(stage_channels(size, 32, 256)) == stages
    model = zoo.create_model("vae", image_size=size, base_channels=2, max_channels=4, latent_dim=3)
    assert model.generate(1).shape == (1, 3, size, size)


@pytest.mark.parametrize("size", [0, 28, 100, 1024])
def test_unbuildable_image_size_is_a_clear_error(size):
    with pytest.raises(ZooError, match=f"image size {size} cannot be built"):
        zoo.create_model("vae", image_size=size)


def test_cvae_without_attributes_is_a_clear_error():
    with pytest.raises(ZooError, match="conditional and needs num_attributes"):
        zoo.create_model("cvae")


def test_total_correlation_terms_add_up_to_the_sampled_kl():
    """With N = batch size the MI + TC + dimension-wise KL telescope to log q(z|x) - log p(z)."""
    model = tiny_model("beta-tcvae", beta=1.0)
    x, _ = batch(6)
    torch.manual_seed(3)
    losses = model.loss(x)
    torch.manual_seed(3)
    posterior = model.encode(x)
    z = posterior.sample()
    sampled_kl = (
        (
            torch.distributions.Normal(posterior.mean, posterior.std).log_prob(z)
            - torch.distributions.Normal(0.0, 1.0).log_prob(z)
        )
        .sum(dim=1)
        .mean()
    )
    parts = losses["mutual_information"] + losses["total_correlation"] + losses["dimension_kl"]
    torch.testing.assert_close(parts, sampled_kl, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(losses["loss"], losses["recon"] + parts, rtol=1e-5, atol=1e-2)


def test_tcvae_takes_the_dataset_size_from_the_data(synthetic_faces):
    from zoo.data import load_data
    from zoo.registry import get_model_class

    data = load_data(synthetic_faces, "train", 16, progress=False)
    assert get_model_class("beta-tcvae").data_config(data)["dataset_size"] == len(data)
    assert "dataset_size" not in get_model_class("vae").data_config(data)


def test_iwae_bound_tightens_with_more_samples():
    torch.manual_seed(0)
    model = tiny_model("iwae")
    x, _ = batch(8)
    with torch.no_grad():
        one = torch.stack([tiny_loss(model, x, 1) for _ in range(30)]).mean()
        many = torch.stack([tiny_loss(model, x, 20) for _ in range(30)]).mean()
    assert many < one  # -log of a tighter lower bound


def tiny_loss(model, x, samples):
    model.config.num_samples = samples
    return model.loss(x)["loss"]


def test_cvae_feeds_labels_as_an_extra_encoder_channel():
    model = tiny_model("cvae")
    first_conv = model.encoder.stages[0]
    assert first_conv.in_channels == 4
    assert model.decoder.project.in_features == 6 + NUM_ATTRS
