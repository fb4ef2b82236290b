"""The VampPrior plugin: registered from outside, honours the zoo contract, and is a VampPrior."""

from __future__ import annotations

import math

import pytest
import torch

import zoo
from zoo.conformance import check_model
from zoo.registry import MODELS

TINY = {"image_size": 16, "base_channels": 4, "max_channels": 8, "latent_dim": 3}


def build(name: str, **config) -> zoo.GenerativeModel:
    torch.manual_seed(0)
    if MODELS.get(name).conditional:
        config.setdefault("num_attributes", 2)
    return zoo.create_model(name, **TINY, **config)


@pytest.mark.parametrize("name", ["vampprior", "vampprior-cvae"])
def test_registered_through_the_entry_point_and_conformant(name):
    sources = {entry.name: entry.source for entry in MODELS.all_entries()}
    assert sources[name] == "zoo-vampprior"
    failures = [(r.name, r.detail) for r in check_model(name) if not r.passed]
    assert failures == []


def test_one_pseudo_input_makes_the_prior_that_posterior():
    model = build("vampprior", num_pseudo_inputs=1)
    z = torch.randn(4, 3)
    component = model.prior_components()
    expected = torch.distributions.Normal(component.mean, component.std).log_prob(z).sum(dim=1)
    torch.testing.assert_close(model.log_prior(z), expected, rtol=1e-5, atol=1e-5)


def test_prior_is_a_uniform_mixture():
    model = build("vampprior", num_pseudo_inputs=3)
    z = torch.randn(5, 3)
    components = model.prior_components()
    each = torch.distributions.Normal(components.mean[None], components.std[None]).log_prob(
        z[:, None]
    )
    expected = torch.logsumexp(each.sum(dim=2), dim=1) - math.log(3)
    torch.testing.assert_close(model.log_prior(z), expected, rtol=1e-5, atol=1e-5)


def test_samples_at_zero_temperature_are_component_means():
    model = build("vampprior-cvae", num_pseudo_inputs=4)
    z = model.sample_prior(20, generator=torch.Generator().manual_seed(0), temperature=0.0)
    means = model.prior_components().mean
    distances = torch.cdist(z, means).min(dim=1).values
    assert torch.allclose(distances, torch.zeros(20), atol=1e-5)


def test_loss_falls():
    model = build("vampprior-cvae")
    x = torch.linspace(0.2, 0.8, 16).expand(4, 3, 16, 16).contiguous()
    y = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = model.loss(x, y)["loss"].item()
    for _ in range(40):
        optimizer.zero_grad()
        model.loss(x, y)["loss"].backward()
        optimizer.step()
    assert model.loss(x, y)["loss"].item() < 0.5 * first
