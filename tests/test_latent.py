"""Latent experiments: generation, interpolation, label swaps, concept vectors, the 2-d grid."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import zoo
from zoo import latent
from zoo.data import ImageData, Preprocess
from zoo.errors import ZooError
from zoo.figures import edit_figure, flip_figure, generation_figure, latent_grid_figure
from zoo.latent import Faces
from zoo.metadata import CheckpointInfo
from zoo.model import GenerativeModel, ModelConfig, Posterior

ATTRS = ["Smiling", "Male", "Eyeglasses"]
TINY = {"image_size": 16, "base_channels": 4, "max_channels": 8, "latent_dim": 6}


def with_info(model: GenerativeModel, tmp_path, rates=(0.5, 0.4, 0.1)) -> GenerativeModel:
    path = tmp_path / "model.safetensors"
    zoo.save_checkpoint(
        path,
        model,
        attr_names=ATTRS,
        attr_rates=list(rates),
        preprocess={"image_size": 16, "crop_fraction": 1.0, "channels": 3},
    )
    loaded = zoo.load(path)
    return loaded


@pytest.fixture
def cvae(tmp_path):
    torch.manual_seed(0)
    return with_info(zoo.create_model("cvae", num_attributes=3, **TINY), tmp_path)


@pytest.fixture
def vae(tmp_path):
    torch.manual_seed(0)
    return with_info(zoo.create_model("vae", **TINY), tmp_path)


def faces(n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(n, 3, 16, 16, generator=generator)
    y = (torch.rand(n, 3, generator=generator) > 0.5).float()
    return x, y


class MeanColour(GenerativeModel):
    """A toy model whose latent we know: z is the mean colour, decode paints it."""

    registry_name = "mean-colour"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.unused = nn.Parameter(torch.zeros(1))

    def encode(self, x, y=None):
        return Posterior(x.mean(dim=(2, 3)), torch.zeros(x.shape[0], 3))

    def decode_logits(self, z, y=None):
        size = self.config.image_size
        return torch.logit(z.clamp(1e-4, 1 - 1e-4))[:, :, None, None].expand(-1, -1, size, size)


def colour_data(n: int = 40) -> ImageData:
    generator = torch.Generator().manual_seed(0)
    red = (torch.arange(n) % 4 == 0).float()  # a quarter of the images are "Red"
    images = torch.randint(40, 90, (n, 3, 16, 16), generator=generator, dtype=torch.uint8)
    images[:, 0] += (red * 120).to(torch.uint8)[:, None, None]
    return ImageData(
        images=images,
        attrs=red[:, None],
        attr_names=["Red"],
        filenames=[f"{i}.png" for i in range(n)],
        name="toy",
        root="/toy",
        split="train",
        fingerprint="f00",
        preprocess=Preprocess(16, 1.0, 3),
    )


# docs/reliability.md: a model, metric or attribute name is unknown
def test_parse_assignments():
    assert latent.parse_assignments(["Smiling=1", "Male=0", "Eyeglasses"], ATTRS) == {
        "Smiling": 1.0,
        "Male": 0.0,
        "Eyeglasses": 1.0,
    }
    with pytest.raises(
        ZooError, match="unknown attribute 'Smilng'.*'Smiling'.*valid names: Smiling, Male"
    ):
        latent.parse_assignments(["Smilng=1"], ATTRS)
    with pytest.raises(ZooError, match="must be 0 or 1"):
        latent.parse_assignments(["Smiling=2"], ATTRS)


def test_assignments_clear_the_attributes_that_cannot_hold_with_them():
    names = ["Black_Hair", "Blond_Hair", "Mustache", "No_Beard", "Smiling"]
    y = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0]])
    blond_with_mustache = latent.with_assignments(y, {"Blond_Hair": 1, "Mustache": 1}, names)
    assert blond_with_mustache.tolist() == [[0.0, 1.0, 1.0, 0.0, 1.0]]
    # removing an attribute clears nothing; an explicit assignment wins over the rule
    assert latent.with_assignments(y, {"Black_Hair": 0}, names).tolist() == [[0, 0, 0, 1, 1]]
    both = latent.with_assignments(y, {"Blond_Hair": 1, "Black_Hair": 1}, names)
    assert both[0, :2].tolist() == [1.0, 1.0]


def test_edit_intensity_scales_the_label_change():
    y, new_y = torch.tensor([[0.0, 1.0, 1.0]]), torch.tensor([[1.0, 0.0, 1.0]])
    assert latent.scale_edit(y, new_y, 1.0).tolist() == new_y.tolist()
    assert latent.scale_edit(y, new_y, 2.0).tolist() == [[2.0, -1.0, 1.0]]
    assert latent.scale_edit(y, new_y, 0.0).tolist() == y.tolist()


def test_conditional_generation_honours_assignments_and_seed(cvae):
    figure = generation_figure(cvae, n=10, assignments={"Smiling": 1.0}, seed=4)
    assert [row.images.shape[0] for row in figure.rows] == [8, 2]
    assert all(row.images.min() >= 0 and row.images.max() <= 1 for row in figure.rows)
    assert "Smiling=1" in figure.rows[0].label
    again = generation_figure(cvae, n=10, assignments={"Smiling": 1.0}, seed=4)
    assert torch.equal(figure.rows[0].images, again.rows[0].images)
    other = generation_figure(cvae, n=10, assignments={"Smiling": 1.0}, seed=5)
    assert not torch.equal(figure.rows[0].images, other.rows[0].images)


def test_sweep_keeps_z_and_changes_only_the_attribute(cvae, monkeypatch):
    seen = []
    original = cvae.decode
    monkeypatch.setattr(
        cvae, "decode", lambda z, y=None: seen.append((z.clone(), y.clone())) or original(z, y)
    )
    figure = generation_figure(cvae, n=4, assignments={}, sweep="Eyeglasses", base="zero")
    (z_off, y_off), (z_on, y_on) = seen
    assert torch.equal(z_off, z_on)
    assert (y_off[:, 2] == 0).all() and (y_on[:, 2] == 1).all()
    assert torch.equal(y_off[:, :2], y_on[:, :2])
    assert [row.label.split()[0] for row in figure.rows] == ["Eyeglasses=0", "Eyeglasses=1"]


def test_base_zero_and_prior_attributes(cvae):
    info = cvae.checkpoint_info
    assert torch.equal(latent.base_attributes(5, info, "zero"), torch.zeros(5, 3))
    drawn = latent.base_attributes(4000, info, "prior", torch.Generator().manual_seed(0))
    assert torch.allclose(drawn.mean(0), torch.tensor([0.5, 0.4, 0.1]), atol=0.03)


def test_interpolation_ends_are_the_reconstructions(cvae):
    x, y = faces(2)
    row = latent.interpolate(cvae, x[0], x[1], y[0], y[1], 5)
    assert row.shape == (5, 3, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(row[0], cvae.reconstruct(x[:1], y[:1])[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(row[-1], cvae.reconstruct(x[1:], y[1:])[0], atol=1e-5, rtol=0)
    spherical = latent.interpolate(cvae, x[0], x[1], y[0], y[1], 5, spherical=True)
    torch.testing.assert_close(spherical[0], row[0], atol=1e-5, rtol=0)
    assert not torch.allclose(spherical[2], row[2])


def test_slerp_keeps_the_norm_between_equal_norm_vectors():
    a, b = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    middle = latent.slerp(a, b, torch.tensor([0.5]))
    torch.testing.assert_close(middle.norm(), torch.tensor(3.0))


def test_label_swap_changes_the_output_only_through_y(cvae, monkeypatch):
    x, y = faces()
    new_y = latent.with_assignments(y, {"Smiling": 1.0}, ATTRS)
    seen = []
    original = cvae.decode
    monkeypatch.setattr(cvae, "decode", lambda z, y=None: seen.append(z.clone()) or original(z, y))
    same = latent.edit_by_labels(cvae, x, y, y)
    swapped = latent.edit_by_labels(cvae, x, y, new_y)
    assert torch.equal(seen[0], seen[1])
    with torch.inference_mode():
        torch.testing.assert_close(same, cvae.reconstruct(x, y))
    changed = y[:, 0] == 0
    assert not torch.allclose(swapped[changed], same[changed])
    assert torch.equal(swapped[~changed], same[~changed])


def test_concept_vector_arithmetic_on_a_model_whose_latent_is_known(tmp_path):
    toy = MeanColour(ModelConfig(image_size=16, latent_dim=3))
    data = colour_data()
    (tmp_path / "toy.safetensors").write_bytes(b"stand-in")
    info = CheckpointInfo(path=tmp_path / "toy.safetensors", model_name="mean-colour", config={})
    concept = latent.compute_concept(toy, data, "Red", info)
    x = data.images.float() / 255
    red = data.attrs[:, 0] > 0
    expected = x[red].mean(dim=(0, 2, 3)) - x[~red].mean(dim=(0, 2, 3))
    torch.testing.assert_close(concept.vector, expected)
    assert (concept.count_with, concept.count_without) == (10, 30)
    assert concept.vector[0] > 0.4  # the red channel moved by about 120/255
    plain = x[~red][:2]
    edited = latent.edit_by_concept(toy, plain, None, concept.vector, 1.0)
    torch.testing.assert_close(
        edited.mean(dim=(2, 3)), plain.mean(dim=(2, 3)) + expected, atol=1e-3, rtol=0
    )


def test_concept_round_trip_and_use_in_generation(vae, tmp_path):
    data = colour_data()
    data.attr_names = ["Smiling"]
    concept = latent.compute_concept(vae, data, "Smiling", vae.checkpoint_info)
    path = latent.concept_path(vae.checkpoint_info.path, "Smiling")
    latent.save_concept(path, concept)
    loaded = latent.load_concept(vae.checkpoint_info.path, "Smiling", vae)
    assert torch.equal(loaded.vector, concept.vector) and loaded.count_with == 10
    plain = generation_figure(vae, n=4, assignments={}, seed=1)
    smiling = generation_figure(vae, n=4, assignments={"Smiling": 1.0}, seed=1, strength=2.0)
    assert "concept Smiling=1" in smiling.rows[0].label
    assert not torch.allclose(plain.rows[0].images, smiling.rows[0].images)


def test_unconditional_attribute_requests_need_a_concept_vector(vae):
    with pytest.raises(ZooError, match="no concept vector for Smiling.*zoo concept"):
        generation_figure(vae, n=2, assignments={"Smiling": 1.0})
    x, _ = faces()
    with pytest.raises(ZooError, match="no concept vector for Male"):
        edit_figure(
            vae,
            Faces(x, None, ["a", "b", "c"]),
            label_edits=[("Male", 1.0)],
            concepts=[],
            strength=1,
        )


def test_concept_on_data_without_the_attribute(vae):
    with pytest.raises(ZooError, match="unknown attribute 'Smiling'.*valid names: Red"):
        latent.compute_concept(vae, colour_data(), "Smiling", vae.checkpoint_info)


def test_edit_figure_rows(cvae):
    x, y = faces()
    figure = edit_figure(
        cvae,
        Faces(x, y, ["a.jpg", "b.jpg", "c.jpg"]),
        label_edits=[("Smiling", 1.0), ("Male", 0.0), ("Smiling", 0.0)],
        concepts=[],
        strength=1.5,
    )
    assert [row.label for row in figure.rows] == [
        "original",
        "reconstruction",
        "labels Smiling=1",
        "labels Male=0",
        "labels Smiling=0",
    ]
    assert torch.equal(figure.rows[0].images, x)


def test_flip_figure_flips_one_attribute_per_column(cvae):
    x, y = faces()
    figure = flip_figure(cvae, Faces(x, y, ["a.jpg", "b.jpg", "c.jpg"]), ["Smiling", "Male"])
    assert figure.column_labels == ["original", "reconstruction", "Smiling", "Male"]
    has = [
        ", ".join(n for n, v in zip(["Smiling", "Male"], row[:2], strict=True) if v > 0.5)
        for row in y.tolist()
    ]
    assert [row.label for row in figure.rows] == [
        f"{name} has {listed or 'none of them'}"
        for name, listed in zip(["a.jpg", "b.jpg", "c.jpg"], has, strict=True)
    ]
    z = latent.encode_means(cvae, x, y)
    flipped = y.clone()
    flipped[:, 1] = 1 - flipped[:, 1]
    assert torch.allclose(
        torch.stack([row.images[3] for row in figure.rows]), latent.decode(cvae, z, flipped)
    )


def test_latent_grid_walks_the_prior_quantiles(tmp_path):
    toy = MeanColour(ModelConfig(image_size=16, latent_dim=2))
    seen = []
    toy.decode = lambda z, y=None: seen.append(z.clone()) or torch.zeros(z.shape[0], 3, 16, 16)
    images = latent.latent_grid(toy, 5)
    assert images.shape == (25, 3, 16, 16)
    z = seen[0].view(5, 5, 2)
    quantiles = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, 5))
    torch.testing.assert_close(z[0, :, 0], quantiles)  # z1 grows left to right
    torch.testing.assert_close(z[:, 0, 1], quantiles.flip(0))  # z2 falls top to bottom
    torch.testing.assert_close(quantiles[-1], torch.tensor(1.6449), atol=1e-4, rtol=0)


def test_grid_needs_a_two_dimensional_latent(vae):
    with pytest.raises(ZooError, match="2-d latent; this vae has 6"):
        latent_grid_figure(vae, n=4, assignments={})


def test_two_dimensional_vae_grid_figure(tmp_path):
    model = with_info(zoo.create_model("vae", **{**TINY, "latent_dim": 2}), tmp_path)
    figure = latent_grid_figure(model, n=4, assignments={})
    assert len(figure.rows) == 4 and all(row.images.shape == (4, 3, 16, 16) for row in figure.rows)
    assert figure.rows[0].label == "z2=+1.64"
