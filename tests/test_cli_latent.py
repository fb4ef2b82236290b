"""`zoo generate / interpolate / edit / concept / grid` write real, readable PNGs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from benchmarks import edits
from benchmarks.edits import bench_concept
from benchmarks.metric import BenchContext, BenchSettings
from cli import app
from zoo import load as zoo_load
from zoo.data import checkpoint_data
from zoo.files import read_tensors_file, write_tensors_file
from zoo.grids import LINE_HEIGHT, PADDING
from zoo.latent import (
    CONCEPT_KIND,
    concept_path,
    faces_from_files,
    load_concept,
)
from zoo.train import Trainer, TrainSettings

runner = CliRunner()
CELL = 128 + PADDING  # 16 px images are enlarged 8x


def zoo(*args):
    return runner.invoke(app, [str(a) for a in args])


def trained(model: str, faces: str, tmp_path, **config) -> str:
    settings = TrainSettings(
        model=model,
        model_config={"base_channels": 4, "max_channels": 8, "latent_dim": 4, **config},
        data=faces,
        image_size=16,
        max_steps=2,
        batch_size=16,
        out=str(tmp_path / "runs"),
        device="cpu",
    )
    return str(Trainer(settings, progress=False).run().run_dir / "model.safetensors")


@pytest.fixture
def cvae(synthetic_faces, tmp_path):
    return trained("cvae", synthetic_faces, tmp_path)


@pytest.fixture
def vae(synthetic_faces, tmp_path):
    return trained("vae", synthetic_faces, tmp_path)


def png(path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image


def rows_height(rows: int, columns_captioned: bool = False) -> int:
    return LINE_HEIGHT + PADDING + (LINE_HEIGHT if columns_captioned else 0) + rows * CELL + PADDING


def test_generate_with_attributes(cvae, tmp_path):
    out = tmp_path / "gen.png"
    result = zoo(
        "generate",
        cvae,
        "-n",
        12,
        "--attr",
        "Smiling=1",
        "--attr",
        "Eyeglasses=1",
        "--seed",
        3,
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    image = png(out)
    assert image.mode == "RGB" and image.height == rows_height(2)
    sweep = tmp_path / "sweep.png"
    assert zoo("generate", cvae, "-n", 4, "--sweep", "Smiling", "--out", sweep).exit_code == 0
    assert png(sweep).height == rows_height(2)


def test_generate_is_deterministic_under_seed(cvae, tmp_path):
    for name in ("a.png", "b.png"):
        assert zoo("generate", cvae, "-n", 4, "--seed", 7, "--out", tmp_path / name).exit_code == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_interpolate_between_indices_and_files(cvae, tmp_path):
    out = tmp_path / "interp.png"
    result = zoo(
        "interpolate",
        cvae,
        "--from-index",
        0,
        "--to-index",
        1,
        "--from-index",
        2,
        "--to-index",
        3,
        "--steps",
        5,
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    assert png(out).height == rows_height(2, columns_captioned=True)
    files = []
    for i, colour in enumerate((40, 200)):
        path = tmp_path / f"face{i}.png"
        Image.new("RGB", (30, 40), (colour,) * 3).save(path)
        files.append(path)
    result = zoo(
        "interpolate",
        cvae,
        "--from",
        files[0],
        "--to",
        files[1],
        "--slerp",
        "--attr",
        "Smiling=1",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output


def test_edit_labels_and_concepts(cvae, tmp_path):
    assert zoo("concept", cvae, "--attr", "Smiling", "--split", "all").exit_code == 0
    out = tmp_path / "edit.png"
    result = zoo(
        "edit",
        cvae,
        "--set",
        "Smiling=1",
        "--set",
        "Male=0",
        "--concept",
        "Smiling",
        "--split",
        "valid",
        "-n",
        4,
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    assert png(out).height == rows_height(5, columns_captioned=True)


def test_unconditional_edit_goes_through_the_concept_vector(vae, tmp_path):
    refused = zoo("edit", vae, "--set", "Smiling=1", "--out", tmp_path / "x.png")
    assert refused.exit_code == 1 and "zoo concept" in refused.output
    assert not (tmp_path / "x.png").exists()
    result = zoo("concept", vae, "--attr", "Smiling", "--split", "all")
    assert result.exit_code == 0 and "concepts/Smiling.safetensors" in result.output
    assert zoo("edit", vae, "--set", "Smiling=1", "--out", tmp_path / "x.png").exit_code == 0
    assert (
        zoo("generate", vae, "--attr", "Smiling=1", "-n", 3, "--out", tmp_path / "g.png").exit_code
        == 0
    )


def test_bench_uses_only_concept_vectors_of_the_training_split(vae, caplog, monkeypatch):
    model = zoo_load(vae)
    info = model.checkpoint_info
    context = BenchContext(
        model,
        Path(vae),
        info,
        checkpoint_data(info, "valid"),
        BenchSettings(progress=False),
        torch.device("cpu"),
    )
    path = concept_path(Path(vae), "Smiling")
    train_size = len(checkpoint_data(info, "train"))

    assert zoo("concept", vae, "--attr", "Smiling", "--split", "all").exit_code == 0
    made_on_all = path.read_bytes()
    with caplog.at_level(logging.WARNING):
        concept = bench_concept(context, "Smiling")
    assert concept.split == "train" and concept.count_with + concept.count_without == train_size
    assert "computed on the all split" in caplog.text and "train split instead" in caplog.text
    assert path.read_bytes() == made_on_all  # the user's vector stays for zoo edit

    tensors, metadata = read_tensors_file(path, CONCEPT_KIND)
    del metadata["split"]  # a file that does not record its split: unknown, so not reused
    write_tensors_file(path, CONCEPT_KIND, tensors, metadata)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert bench_concept(context, "Smiling").split == "train"
    assert "records no split" in caplog.text

    assert zoo("concept", vae, "--attr", "Smiling", "--split", "train").exit_code == 0
    stored = load_concept(Path(vae), "Smiling", model)
    monkeypatch.setattr(edits, "compute_concept", lambda *args: pytest.fail("recomputed"))
    reused = bench_concept(context, "Smiling")
    assert reused.split == "train" and torch.equal(reused.vector, stored.vector)


def test_grid_on_a_two_dimensional_latent(synthetic_faces, tmp_path):
    model = trained("vae", synthetic_faces, tmp_path, latent_dim=2)
    out = tmp_path / "grid.png"
    assert zoo("grid", model, "--n", 6, "--out", out).exit_code == 0
    assert png(out).height == rows_height(6, columns_captioned=True)


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", "{cvae}", "--attr", "Smiling=2"], "must be 0 or 1"),
        (["generate", "{cvae}", "--attr", "Smilin=1"], "unknown attribute 'Smilin'"),
        (["generate", "{vae}", "--attr", "Smiling=1"], "no concept vector for Smiling"),
        (["grid", "{cvae}"], "needs a model with a 2-d latent"),
        (["edit", "{cvae}", "--set", "Smiling=1", "--images", "{bad}"], "not a readable image"),
        (["edit", "{cvae}", "--set", "Smiling=1", "--images", "{missing}"], "cannot read image"),
        (["interpolate", "{cvae}", "--from-index", "0"], "give pairs of endpoints"),
        (
            ["interpolate", "{cvae}", "--from-index", "0", "--to-index", "999"],
            "outside the valid split",
        ),
        (["concept", "{cvae}", "--attr", "Heavy_Makeup"], "unknown attribute 'Heavy_Makeup'"),
        (["edit", "{cvae}"], "nothing to edit"),
    ],
)
def test_bad_input_is_one_line(args, message, cvae, vae, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    values = {"cvae": cvae, "vae": vae, "bad": bad, "missing": tmp_path / "missing.jpg"}
    extra = [] if args[0] == "concept" else ["--out", tmp_path / "out.png"]
    result = zoo(*[arg.format(**values) for arg in args], *extra)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output and not (tmp_path / "out.png").exists()


def test_image_files_get_the_crop_and_resize_of_the_training_data(cvae, synthetic_faces):
    info = zoo_load(cvae).checkpoint_info
    data = checkpoint_data(info, "train")
    path = Path(synthetic_faces) / "img_align_celeba" / data.filenames[0]
    from_file = faces_from_files([path], info).images[0]
    from_cache = data.batch(torch.tensor([0]))[0][0]
    assert from_file.shape == from_cache.shape == (3, 16, 16)
    torch.testing.assert_close(from_file, from_cache, atol=1 / 255, rtol=0)
