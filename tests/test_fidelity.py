"""KID and precision / recall / density / coverage give the values their definitions predict,
and run from ``zoo bench`` in the classifier's feature space."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from benchmarks.fidelity import kernel_inception_distance, precision_recall_density_coverage
from cli import app


def blobs(n: int, centres: torch.Tensor, seed: int) -> torch.Tensor:
    """n points spread evenly over tight Gaussian blobs around ``centres``."""
    generator = torch.Generator().manual_seed(seed)
    which = torch.arange(n) % len(centres)
    return centres[which] + 0.05 * torch.randn(n, centres.shape[1], generator=generator)


ANGLES = torch.arange(10) * (2 * torch.pi / 10)
CENTRES = 5 * torch.stack([ANGLES.cos(), ANGLES.sin()], dim=1)  # ten modes, 3 apart


def test_kid_is_near_zero_for_one_distribution_and_clearly_positive_for_two():
    real = torch.randn(400, 16, generator=torch.Generator().manual_seed(0))
    same = torch.randn(400, 16, generator=torch.Generator().manual_seed(1))
    shifted = same + 1.0
    near, _ = kernel_inception_distance(real, same, subsets=20, subset_size=200, seed=0)
    far, _ = kernel_inception_distance(real, shifted, subsets=20, subset_size=200, seed=0)
    assert abs(near) < 0.05  # unbiased: about 0 (measured 0.013 +- 0.016 over subsets)
    assert far > 1 and far > 100 * abs(near)  # measured 7.6
    again, _ = kernel_inception_distance(real, shifted, subsets=20, subset_size=200, seed=0)
    assert again == far  # the subsets are seeded


def test_a_generated_set_on_half_the_modes_has_recall_one_half_and_precision_one():
    real = blobs(500, CENTRES, seed=0)
    half = blobs(500, CENTRES[:5], seed=1)
    scores = precision_recall_density_coverage(real, half, k=5)
    assert scores["precision"] > 0.9 and scores["recall"] == pytest.approx(0.5, abs=0.05)  # 0.97
    assert scores["coverage"] == pytest.approx(0.5, abs=0.05)
    everywhere = precision_recall_density_coverage(real, blobs(500, CENTRES, seed=2), k=5)
    assert min(everywhere["precision"], everywhere["recall"], everywhere["coverage"]) > 0.9  # 0.96
    assert everywhere["density"] == pytest.approx(1.0, abs=0.2)
    off = precision_recall_density_coverage(real, blobs(500, CENTRES * 2, seed=3), k=5)
    assert max(off.values()) < 0.05  # nothing generated lies near any real image


def test_precision_and_recall_by_hand_on_a_line():
    """Real at 0, 1, 2, 3 (k=1: every radius 1); fakes at 0.5 and 10. Precision: 0.5 lies within
    1 of a real point, 10 does not: 1/2. The fakes' radii are 9.5, so every real point is in
    one: recall 1. Density: 0.5 is inside 2 real balls, 10 in none: (2 + 0) / 2 / k = 1.
    Coverage: real 0 and 1 are within their radius 1 of the fake 0.5, 2 and 3 are not: 1/2."""
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    fake = torch.tensor([[0.5], [10.0]])
    scores = precision_recall_density_coverage(real, fake, k=1)
    assert scores == {"precision": 0.5, "recall": 1.0, "density": 1.0, "coverage": 0.5}


def test_prdc_with_too_few_images_for_k_is_one_line():
    with pytest.raises(Exception, match="need more than 5 images.*prdc.k"):
        precision_recall_density_coverage(torch.zeros(4, 2), torch.zeros(9, 2), k=5)


def test_zoo_bench_kid_and_prdc_in_classifier_features(tiny_vae, synthetic_faces, tmp_path):
    runs = tmp_path / "runs"
    result = CliRunner().invoke(
        app,
        [
            "train-classifier", "--data", synthetic_faces, "--image-size", "16",
            "--backbone", "test_resnet", "--epochs", "1", "--batch-size", "16",
            "--out", str(runs), "--no-progress", "--device", "cpu",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    [classifier] = runs.glob("**/classifier.safetensors")
    out = tmp_path / "results.json"
    args = ["bench", str(tiny_vae), "--metric", "kid", "--metric", "prdc", "--split", "train"]
    args += ["--fid-features", "classifier", "--classifier", str(classifier), "--option"]
    args += ["prdc.k=3", "--out", str(out), "--no-progress", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    [entry] = json.loads(out.read_text())["results"]
    kid, prdc = entry["metrics"]["kid"], entry["metrics"]["prdc"]
    assert kid["features"].startswith("classifier:") and kid["features"] == prdc["features"]
    assert prdc["k"] == 3 and 0 <= prdc["precision"] <= 1 and kid["n_real"] == kid["n_fake"]
    assert "KID" in result.output and "recall" in result.output
