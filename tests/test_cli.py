"""The `zoo` command through Typer's test runner: happy paths and one-line errors."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from cli import app

runner = CliRunner()
TINY = ["-o", "base_channels=4", "-o", "max_channels=8", "--latent-dim", "4", "--image-size", "16"]


def zoo(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_list_shows_the_builtin_models():
    result = zoo("list")
    assert result.exit_code == 0
    for name in ("vae", "beta-vae", "cvae", "beta-cvae"):
        assert re.search(rf"\b{name}\b", result.output)


def test_train_then_info_then_resume(synthetic_faces, tmp_path):
    out = tmp_path / "runs"
    result = zoo(
        "train",
        "cvae",
        "--beta",
        "2",
        "--data",
        synthetic_faces,
        "--max-steps",
        "3",
        "--batch-size",
        "16",
        "--out",
        out,
        "--no-progress",
        *TINY,
    )
    assert result.exit_code == 0, result.output
    [run] = out.iterdir()
    assert "done at step 3/3" in result.output and str(run / "model.safetensors") in result.output
    info = zoo("info", run / "model.safetensors")
    assert info.exit_code == 0, info.output
    assert "cvae" in info.output and '"beta": 2.0' in info.output and "Smiling" in info.output
    resumed = zoo("train", "--resume", run, "--max-steps", "5", "--no-progress")
    assert resumed.exit_code == 0, resumed.output
    assert "steps 3->5" in resumed.output and "done at step 5/5" in resumed.output


def test_train_on_a_fresh_machine_uses_the_synthetic_faces(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ZOO_SYNTHETIC_N", "40")
    result = zoo(
        "train",
        "vae",
        "--max-steps",
        "1",
        "--batch-size",
        "8",
        "--no-progress",
        "-o",
        "base_channels=4",
        "-o",
        "max_channels=8",
    )
    assert result.exit_code == 0, result.output
    assert "no CelebA found" in result.output and "synthetic" in result.output
    assert len(list((tmp_path / "runs").iterdir())) == 1


def test_data_synth_and_prepare(tmp_path):
    folder = tmp_path / "faces"
    assert zoo("data", "synth", "--out", folder, "-n", "20", "--size", "16").exit_code == 0
    result = zoo("data", "prepare", "--data", folder, "--size", "16")
    assert result.exit_code == 0, result.output
    assert "20 images of 3x16x16" in result.output


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["train", "cvea"], ["unknown model 'cvea'", "'cvae'"]),
        (["train", "cvae", "--data", "/nonexistent/celeba"], ["/nonexistent/celeba"]),
        (["train", "cvae", "--image-size", "48"], ["image size 48 cannot be built"]),
        (
            ["train", "cvae", "--attributes", "Smilling"],
            ["unknown attribute 'Smilling'", "'Smiling'"],
        ),
        (["train", "cvae", "--batch-size", "0"], ["--batch-size must be at least 1"]),
        (["train", "cvae", "--epochs", "0"], ["--epochs must be at least 1"]),
        (["train", "cvae", "-o", "nonsense"], ["not KEY=VALUE"]),
        (["train"], ["name a model to train"]),
    ],
)
def test_bad_train_input_is_one_line(args, fragments, synthetic_faces, tmp_path):
    if "--data" not in args:
        args = [*args, "--data", synthetic_faces]
    assert_one_line_error(zoo(*args, "--out", tmp_path / "runs", "--no-progress"), *fragments)


def test_missing_celeba_file_is_named(tmp_path):
    (tmp_path / "celeba" / "img_align_celeba").mkdir(parents=True)
    result = zoo("train", "cvae", "--data", tmp_path / "celeba", "--no-progress")
    assert_one_line_error(result, "list_attr_celeba.txt")


def test_info_on_files_that_are_not_zoo_checkpoints(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(1)}, str(foreign))
    assert_one_line_error(zoo("info", foreign), "not a zoo model")
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    assert_one_line_error(zoo("info", text), "not a readable safetensors file")
    assert_one_line_error(zoo("info", tmp_path / "missing.safetensors"), "does not exist")


@pytest.mark.skipif(shutil.which("zoo") is None, reason="the zoo console script is not installed")
def test_installed_console_script_reports_errors_in_one_line():
    result = subprocess.run(["zoo", "train", "nope"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: unknown model 'nope'")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
