"""One slower end-to-end run on real CelebA images: train a small CVAE through the CLI."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

import zoo
from cli import app


@pytest.mark.slow
def test_cvae_trains_on_the_real_celeba_sample(celeba_sample, tmp_path):
    out = tmp_path / "runs"
    args = [
        "train",
        "cvae",
        "--beta",
        "2",
        "--data",
        str(celeba_sample),
        "--image-size",
        "32",
        "--max-steps",
        "40",
        "--batch-size",
        "32",
        "--sample-every",
        "20",
        "--out",
        str(out),
        "--no-progress",
        "-o",
        "base_channels=16",
        "-o",
        "max_channels=64",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    [run] = out.iterdir()

    model = zoo.load(run / "model.safetensors")
    info = model.checkpoint_info
    assert model.conditional and model.config.beta == 2.0 and model.config.latent_dim == 128
    assert len(info.attr_names) == 40 and "Smiling" in info.attr_names
    assert info.data["n"] == 4560 and info.data["split"] == "train"
    assert 0.3 < info.attr_rates[info.attr_names.index("Smiling")] < 0.6

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 40
    assert records[-1]["recon"] < 0.8 * records[0]["recon"]

    grids = sorted((run / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["step_0000020.png", "step_0000040.png"]
    with Image.open(grids[-1]) as grid:  # 4 rows x 8 columns of 32 px with 2 px padding
        assert grid.size == (8 * 34 + 2, 4 * 34 + 2) and grid.mode == "RGB"
