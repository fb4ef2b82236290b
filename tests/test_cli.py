"""The `zoo` command through Typer's test runner: happy paths and one-line errors."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

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


# docs/reliability.md: `--data` is missing or not a CelebA folder
# docs/reliability.md: a model, metric or attribute name is unknown
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
        (["train", "cvae", "--batch-size", "0"], ["--batch-size must be in [1, 65536], got 0"]),
        (["train", "cvae", "--epochs", "0"], ["--epochs must be at least 1"]),
        (["train", "cvae", "-o", "nonsense"], ["not KEY=VALUE"]),
        (["train"], ["name a model to train"]),
    ],
)
def test_bad_train_input_is_one_line(args, fragments, synthetic_faces, tmp_path):
    if "--data" not in args:
        args = [*args, "--data", synthetic_faces]
    assert_one_line_error(zoo(*args, "--out", tmp_path / "runs", "--no-progress"), *fragments)


# docs/reliability.md: `--data` is missing or not a CelebA folder
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


# docs/reliability.md: you press Ctrl-C while zoo starts
def test_ctrl_c_while_zoo_imports_is_one_line_not_a_traceback(tmp_path):
    """Importing torch takes seconds, so a Ctrl-C often lands in an import: here in Typer's."""
    (tmp_path / "typer.py").write_text("raise KeyboardInterrupt\n")
    path = os.pathsep.join([str(tmp_path), str(Path(__file__).resolve().parents[1])])
    done = subprocess.run(
        [sys.executable, "-c", "import cli"],
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stderr == "stopped by Ctrl-C while zoo was starting; nothing was written\n"
    assert done.returncode == -signal.SIGINT  # Python ends by the signal: a shell shows 130


# docs/reliability.md: a numeric option is out of range, NaN or infinite
@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["train", "cvae", "--image-size", "0"], "--image-size must be in [8, 512], got 0"),
        (["train", "cvae", "--lr", "nan"], "--lr must be greater than 0, got nan"),
        (["train", "cvae", "--lr", "inf"], "--lr must be greater than 0, got inf"),
        (["train", "cvae", "--beta", "-1"], "--beta must be at least 0, got -1"),
        (["train", "cvae", "--latent-dim", "0"], "--latent-dim must be in [1, 16384], got 0"),
        (["train", "cvae", "--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
        (["train", "cvae", "--kl-warmup", "-5"], "--kl-warmup must be at least 0, got -5"),
        (["train", "cvae", "--max-steps", "0"], "--max-steps must be at least 1, got 0"),
        (["train", "cvae", "--save-every", "0"], "--save-every must be at least 1, got 0"),
        (["train", "cvae", "--nproc", "0"], "--nproc must be in [1, 256], got 0"),
        (["generate", "m.safetensors", "-n", "0"], "-n must be in [1, 1024], got 0"),
        (["generate", "m.safetensors", "-n", "10000000000"], "-n must be in [1, 1024]"),
        (["generate", "m.safetensors", "--temperature", "nan"], "--temperature must be at"),
        (["generate", "m.safetensors", "--strength", "inf"], "--strength must be a finite"),
        (["edit", "m.safetensors", "--intensity", "nan"], "--intensity must be a finite number"),
        (["edit", "m.safetensors", "-n", "0"], "-n must be in [1, 256], got 0"),
        (["interpolate", "m.safetensors", "--steps", "1"], "--steps must be in [2, 100], got 1"),
        (["interpolate", "m.safetensors", "--from-index", "-1"], "--from-index must be at least 0"),
        (["grid", "m.safetensors", "--n", "1"], "--n must be in [2, 50], got 1"),
        (["bench", "m.safetensors", "--n", "0"], "--n must be at least 1, got 0"),
        (["bench", "m.safetensors", "--batch-size", "0"], "--batch-size must be in [1, 65536]"),
        (["bench", "m.safetensors", "--throughput-batch-size", "0"], "--throughput-batch-size"),
        (["bench", "m.safetensors", "--edit-intensity", "nan"], "--edit-intensity must be a"),
        (["data", "prepare", "--size", "0"], "--size must be in [8, 512], got 0"),
        (["data", "synth", "--out", "faces", "-n", "0"], "-n must be in [1, 1000000], got 0"),
        (["train-classifier", "--image-size", "0"], "--image-size must be in [8, 512], got 0"),
        (["train-classifier", "--shift", "0.5"], "--shift must be in [0, 0.5), got 0.5"),
        (["train-classifier", "--weight-decay", "nan"], "--weight-decay must be at least 0"),
    ],
)
def test_numeric_options_are_checked_in_one_line_naming_the_range(args, fragment, tmp_path):
    """Checked before anything runs: the checkpoint m.safetensors and the data do not exist
    (so a command that skipped the check fails at once, with another line)."""
    if args[0] in ("train", "train-classifier") or args[:2] == ["data", "prepare"]:
        args = [*args, "--data", str(tmp_path / "no-data")]
    assert_one_line_error(zoo(*args), fragment)


# docs/reliability.md: --out is a file where a folder is wanted, or the reverse
def test_output_paths_of_the_wrong_kind_are_one_line(tmp_path):
    folder, file = tmp_path / "folder", tmp_path / "file.txt"
    folder.mkdir()
    file.write_text("x")
    for command in (["generate"], ["edit"], ["interpolate"], ["grid"]):
        result = zoo(*command, "m.safetensors", "--out", folder)
        assert_one_line_error(result, f"--out {folder} is a folder, not a file")
    assert_one_line_error(zoo("bench", "--out", folder), f"--out {folder} is a folder")
    no_data = ["--data", str(tmp_path / "no-data")]
    assert_one_line_error(zoo("train", "cvae", "--out", file, *no_data), f"--out {file} is a")
    assert_one_line_error(zoo("train-classifier", "--out", file, *no_data), f"--out {file} is")
    assert_one_line_error(zoo("data", "synth", "--out", file), f"--out {file} is a file")
    inside_a_file = file / "g.png"
    assert_one_line_error(
        zoo("generate", "m.safetensors", "--out", inside_a_file), f"{file} is a file"
    )


def _pickle(path, marker) -> None:
    """A pickle whose unpickling would write `marker` (it is never unpickled)."""

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    path.write_bytes(pickle.dumps(Payload(), protocol=4))


# docs/reliability.md: a file zoo reads is a pickle, whatever its name
def test_every_file_zoo_reads_says_so_in_one_line_when_it_is_a_pickle(synthetic_faces, tmp_path):
    out = tmp_path / "runs"
    trained = zoo(
        "train", "cvae", "--data", synthetic_faces, "--max-steps", "2", "--batch-size", "16",
        "--out", out, "--no-progress", *TINY,
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    [run] = out.iterdir()
    marker, evil = tmp_path / "UNPICKLED", tmp_path / "evil.safetensors"
    _pickle(evil, marker)
    said = "is a pickle, not a safetensors file; zoo never unpickles"
    assert_one_line_error(zoo("info", evil), str(evil), said)
    assert_one_line_error(zoo("generate", evil, "--out", tmp_path / "g.png"), said)
    checkpoint = run / "model.safetensors"
    bench = ["bench", checkpoint, "--n", "4", "--no-progress", "--out", tmp_path / "r.json"]
    result = zoo(*bench, "--metric", "edit", "--classifier", evil)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"not computed: cvae edit: {evil} {said}" in " ".join(result.output.split())
    result = zoo(*bench, "--metric", "fid", "--fid-weights", evil)  # a .pth is a pickle by design
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "not computed: cvae fid: refusing" in result.output
    _pickle(run / "train_state.safetensors", marker)
    resumed = zoo("train", "--resume", run, "--max-steps", "3", "--no-progress")
    assert_one_line_error(resumed, str(run / "train_state.safetensors"), said)
    assert not marker.exists()
