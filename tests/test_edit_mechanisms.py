"""The edit mechanisms each do their job, on a task small enough to train in seconds.

Attribute 0 of the task is a white square in the top-left corner, over smooth coloured
backgrounds; attribute 1 is noise the images do not show. An exact ruler reads the square
from the pixels, so "did the edit work" needs no trained classifier. Each test compares a
model with the mechanism on to the same model with it off, so it fails if the mechanism is
switched off or stops working; the last checks that a patch critic does no harm.

Training is numerically chaotic: another CPU (its kernels round differently), thread count
or precision is another run, as another seed is. So every threshold lies at least 0.15 from
everything measured, and the comments give the range measured over 8 runs on an AMD EPYC
Zen 4 (avx512f, avx512_bf16, no AMX), 2 threads: seeds 0-3 in fp32, 0-2 in bf16, and seed 0
with AVX2 kernels (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2). Check another run with
``ZOO_MECHANISM_SEED=3 ZOO_MECHANISM_PRECISION=bf16 pytest tests/test_edit_mechanisms.py``.
A claim that held for some runs only is not asserted.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

import zoo
from zoo.errors import ZooError
from zoo.latent import edit_by_labels, encode_means
from zoo.nets import FiLMGroupNorm

SIZE = 16
SQUARE = (slice(1, 7), slice(1, 7))
TINY = {
    "image_size": SIZE,
    "base_channels": 16,
    "max_channels": 32,
    "latent_dim": 8,
    "num_attributes": 2,
}
SEED = int(os.environ.get("ZOO_MECHANISM_SEED", "0"))  # initial weights and batch order
PRECISION = os.environ.get("ZOO_MECHANISM_PRECISION", "fp32")  # or bf16 (CPU autocast)


def square_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with a white square exactly where attribute 0 is 1; attribute 1 is invisible."""
    generator = torch.Generator().manual_seed(seed)
    colour = torch.rand(n, 3, 1, 1, generator=generator)
    mix = torch.rand(n, 1, 1, 1, generator=generator)
    ramp = torch.linspace(0, 1, SIZE)
    x = 0.1 + 0.5 * colour * (mix * ramp.view(1, 1, 1, -1) + (1 - mix) * ramp.view(1, 1, -1, 1))
    y = (torch.rand(n, 2, generator=generator) > 0.5).float()
    x[y[:, 0] > 0.5, :, SQUARE[0], SQUARE[1]] = 1.0
    return x.contiguous(), y


def correlated_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The square task, with attribute 1 a label that comes with the square in 90 % of images
    (as CelebA's Wearing_Lipstick comes with Male = 0): it has no pixels of its own."""
    x, y = square_task(n, seed)
    generator = torch.Generator().manual_seed(seed + 100)
    agree = torch.rand(n, generator=generator) < 0.9
    y[:, 1] = torch.where(agree, y[:, 0], 1 - y[:, 0])
    return x, y


CORNER = (slice(9, 15), slice(9, 15))


def nested_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The square task, with attribute 1 a second square in the opposite corner that only
    ever appears beside the first (as CelebA's Mustache only appears on men)."""
    x, y = square_task(n, seed)
    generator = torch.Generator().manual_seed(seed + 200)
    y[:, 1] = y[:, 0] * (torch.rand(n, generator=generator) < 0.5).float()
    x[y[:, 1] > 0.5, :, CORNER[0], CORNER[1]] = 1.0
    return x, y


TASKS = {"square": square_task, "correlated": correlated_task, "nested": nested_task}


def ruler(images: torch.Tensor) -> torch.Tensor:
    """1 where the square is there (its pixels are far brighter than any background)."""
    return (images[:, :, SQUARE[0], SQUARE[1]].mean(dim=(1, 2, 3)) > 0.8).float()


def trained(name: str, steps: int = 300, task: str = "square", **config) -> zoo.GenerativeModel:
    """The model trained on a task (`TASKS`); tests asking for the same one share it."""
    return _trained(name, steps, task, SEED, PRECISION, tuple(sorted(config.items())))


@functools.cache
def _trained(
    name: str,
    steps: int,
    task: str,
    seed: int,
    precision: str,
    config: tuple[tuple[str, object], ...],
) -> zoo.GenerativeModel:
    """`seed` sets the initial weights and the batch order; the data is the same for all."""
    torch.manual_seed(seed)
    model = zoo.create_model(name, **TINY, **dict(config))
    x, y = TASKS[task](512, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed + 1)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(x), (64,), generator=generator)
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            loss = model.loss(x[index], y[index])["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.float().backward()
        optimizer.step()
    return model.eval()


def edit_accuracy(model: zoo.GenerativeModel) -> float:
    """How often flipping attribute 0 alone adds or removes the square, by the exact ruler."""
    x, y = square_task(256, seed=3)
    flipped = y.clone()
    flipped[:, 0] = 1 - flipped[:, 0]
    return (ruler(edit_by_labels(model, x, y, flipped)) == flipped[:, 0]).float().mean().item()


def test_the_ruler_reads_the_task_exactly():
    x, y = square_task(256, seed=4)
    assert torch.equal(ruler(x), y[:, 0])


def test_the_latent_adversary_makes_the_decoder_draw_the_label():
    plain = trained("cvae")
    fader = trained("fader-cvae", adversary_weight=20.0, adversary_warmup=50)
    assert edit_accuracy(plain) < 0.3  # 0.00: z keeps the square, the decoder follows z
    assert edit_accuracy(fader) > 0.7  # 0.99-1.00: z hides it, so the decoder reads y


def square_leakage(model: zoo.GenerativeModel) -> float:
    """Label leakage of the square: a probe on z alone, fitted on the training images and
    scored on others by balanced accuracy (0.5: z says nothing of it)."""
    from benchmarks.leakage import probe_balanced_accuracy

    fit_x, fit_y = square_task(512, seed=0)
    x, y = square_task(256, seed=3)
    fit_z, z = encode_means(model, fit_x, fit_y).numpy(), encode_means(model, x, y).numpy()
    return probe_balanced_accuracy(fit_z, fit_y[:, :1].numpy(), z, y[:, :1].numpy())[0]


def test_a_cvae_leaks_the_square_into_z_and_an_image_blind_code_does_not():
    assert square_leakage(trained("cvae")) > 0.9  # 1.00: z holds the square
    # a VAE's z cannot hold attribute 1, which no image shows: the probe is at chance
    from benchmarks.leakage import probe_balanced_accuracy

    vae = trained("vae")
    fit_x, fit_y = square_task(512, seed=0)
    x, y = square_task(256, seed=3)
    invisible = probe_balanced_accuracy(
        encode_means(vae, fit_x, None).numpy(), fit_y[:, 1:].numpy(),
        encode_means(vae, x, None).numpy(), y[:, 1:].numpy(),
    )[0]  # fmt: skip
    assert abs(invisible - 0.5) < 0.15  # 0.45-0.55


def test_the_latent_adversary_fools_its_discriminator_but_not_a_fresh_probe():
    """Fader's adversary makes the decoder read y, yet z still holds the square: its own
    discriminator, trained along, reads it poorly, while a probe fitted afresh on the final z
    reads it (as Elazar & Goldberg 2018 found for adversarial removal in text). Leakage is
    that fresh probe, so it reports what the adversary left. Runs measured: seeds 0-3 in fp32
    and 0-1 in bf16."""
    fader = trained("fader-cvae", adversary_weight=20.0, adversary_warmup=50)
    x, y = square_task(256, seed=3)
    with torch.no_grad():
        guess = fader.discriminator(fader.encode(x, y).mean)[:, 0] > 0
    assert (guess.float() == y[:, 0]).float().mean() < 0.95  # 0.47-0.80 over 6 runs
    assert edit_accuracy(fader) > 0.7  # 0.99-1.00
    assert square_leakage(fader) > 0.85  # 1.00 in all 6 runs


def swapped_head_accuracy(model: zoo.GenerativeModel) -> float:
    """How often the model's own attribute head reads the flipped square on swapped decodes."""
    x, y = square_task(256, seed=3)
    flipped = y.clone()
    flipped[:, 0] = 1 - flipped[:, 0]
    with torch.no_grad():
        guess = model.attribute_head(edit_by_labels(model, x, y, flipped))[:, 0] > 0
    return (guess.float() == flipped[:, 0]).float().mean().item()


def test_the_attribute_loss_makes_swapped_decodes_obey_the_head():
    """Weight 1e-6 keeps the head (trained on real images) but takes away its pull."""
    off = trained("attr-cvae", attr_weight=1e-6, head_noise=0.0)
    on = trained("attr-cvae", attr_weight=100.0, head_noise=0.0)
    assert swapped_head_accuracy(off) < 0.3  # 0.00
    assert swapped_head_accuracy(on) > 0.7  # 0.97-1.00


@pytest.mark.long
def test_head_noise_or_a_patch_critic_turns_faint_squares_into_squares():
    """A plain head is fooled by a faint square the exact ruler rejects, so the plain
    attribute loss settles for one. Two remedies: a smoothed head (noise of std 1 here: the
    faint square is a large change on these 16 px images), or a critic of 10 px patches
    (two stages, as `film-attr-critic-cvae` judges 22 px of 64), which sees the faint square
    no reconstruction has. One test, so the plain model they both fail without (the first)
    is trained once whichever worker runs it."""
    plain_head = trained("attr-cvae", steps=600, attr_weight=100.0, head_noise=0.0)
    smoothed = trained("attr-cvae", steps=600, attr_weight=100.0, head_noise=1.0)
    critic = trained(
        "attr-cvae",
        steps=600,
        attr_weight=100.0,
        head_noise=0.0,
        realism_weight=100.0,
        critic_patch=2,
    )
    assert edit_accuracy(plain_head) < 0.7  # 0.53: squares are removed, never added
    assert edit_accuracy(smoothed) > 0.8  # 0.98-1.00
    assert edit_accuracy(critic) > 0.8  # 0.97-0.99 (a whole-image critic: 0.87-1.00)


def test_film_conditions_every_decoder_stage():
    """With FiLM the labels reach the decoder even where its input ignores them."""
    torch.manual_seed(0)
    z = torch.randn(4, TINY["latent_dim"])
    y = torch.tensor([[1.0, 0.0]]).expand(4, 2)
    for name, uses_film in (("film-cvae", True), ("cvae", False), ("edit-cvae", False)):
        model = zoo.create_model(name, **TINY).eval()
        with torch.no_grad():
            model.decoder.project.weight[:, TINY["latent_dim"] :] = 0  # y's input columns
            for module in model.modules():
                if isinstance(module, FiLMGroupNorm):
                    module.film.weight.normal_()
            depends = not torch.allclose(model.decode(z, y), model.decode(z, 1 - y))
        assert depends == uses_film, name


@pytest.mark.parametrize(
    ("name", "config", "auxiliary"),
    [
        ("fader-cvae", {}, "discriminator"),
        ("attr-cvae", {}, "attribute_head"),
        ("edit-cvae", {"realism_weight": 1.0}, "critic"),
    ],
)
def test_auxiliary_networks_are_saved_but_not_needed_to_decode(name, config, auxiliary, tmp_path):
    model = zoo.create_model(name, **TINY, **config).eval()
    path = tmp_path / "model.safetensors"
    zoo.save_checkpoint(path, model)
    loaded = zoo.load(path)
    assert any(key.startswith(auxiliary) for key in loaded.state_dict())
    setattr(loaded, auxiliary, None)  # encode / decode / generate must not touch it
    x, y = square_task(4, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded.reconstruct(x, y), model.reconstruct(x, y))
        loaded.generate(4, y)


def part_step_accuracy(model: zoo.GenerativeModel, part: float = 0.6) -> float:
    """How often part of attribute 0's label change already adds or removes the square."""
    x, y = square_task(256, seed=3)
    partway = y.clone()
    partway[:, 0] = y[:, 0] + part * (1 - 2 * y[:, 0])
    return (ruler(edit_by_labels(model, x, y, partway)) == 1 - y[:, 0]).float().mean().item()


@pytest.mark.long
def test_partial_steps_make_the_decoder_edit_within_part_of_the_label_change():
    """Trained on full flips, 0.6 of a label step draws a faint square the ruler rejects."""
    config = {"steps": 600, "attr_weight": 100.0, "head_noise": 1.0}
    full = trained("attr-cvae", **config)
    partial = trained("attr-cvae", attr_step_min=0.5, **config)
    assert part_step_accuracy(full) < 0.45  # 0.10-0.21
    assert part_step_accuracy(partial) > 0.65  # 0.85-0.98


@pytest.mark.long
def test_a_lighter_loss_on_kept_labels_lets_an_edit_break_a_correlation():
    """Adding the square while keeping its companion label asks the head for a contradiction;
    with every label weighted alike the decoder settles for a square the ruler rejects."""
    x, y = correlated_task(256, seed=3)
    flipped = y.clone()
    flipped[:, 0] = 1 - y[:, 0]
    accuracy = {}
    for keep in (1.0, 0.1):
        model = trained(
            "attr-cvae",
            steps=600,
            attr_weight=100.0,
            head_noise=1.0,
            attr_keep_weight=keep,
            task="correlated",
        )
        edited = ruler(edit_by_labels(model, x, y, flipped))
        accuracy[keep] = (edited == flipped[:, 0]).float().mean().item()
    assert accuracy[1.0] < 0.7, accuracy  # 0.53-0.55
    assert accuracy[0.1] > 0.8, accuracy  # 0.96-1.00


@pytest.mark.long
def test_a_patch_critic_lets_an_edit_draw_a_combination_no_image_has():
    """Adding the corner square to a face without the first one makes an image no
    reconstruction looks like, but every 4 px patch of it looks like some reconstruction's.
    A critic of such patches must not fight the edit; one that sees more of the image may:
    a whole-image critic let 0.00 to 1.00 of these edits through, by the seed (0.00 in 4 of
    the 8 runs), so that is not asserted. (With no critic at all: 1.00.)"""
    x, y = nested_task(512, seed=3)
    alone = y[:, 0] == 0
    x, y = x[alone][:256], y[alone][:256]
    flipped = y.clone()
    flipped[:, 1] = 1.0
    model = trained(
        "attr-cvae",
        steps=600,
        attr_weight=100.0,
        head_noise=1.0,
        realism_weight=300.0,
        critic_patch=1,
        task="nested",
    )
    corner = edit_by_labels(model, x, y, flipped)[:, :, CORNER[0], CORNER[1]]
    assert (corner.mean(dim=(1, 2, 3)) > 0.8).float().mean().item() > 0.8  # 1.00


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("attr_keep_weight", -0.1),
        ("attr_keep_weight", 1.5),
        ("attr_step_min", 0.0),
        ("attr_flip_prob", 0.0),
        ("head_noise", -1.0),
        ("head_blur", -1.0),
        ("head_shift", 0.5),
        ("attr_weight", -1.0),
        ("critic_patch", -1),
    ],
)
def test_an_edit_field_out_of_range_is_one_line_naming_it(field, value):
    with pytest.raises(ZooError, match=field):
        zoo.create_model("edit-cvae", **TINY, **{field: value})
