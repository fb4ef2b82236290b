"""The disk refuses a write (full, read-only, permission denied): one line naming the file,
what the system said, that the last save is intact and how to continue; nothing is lost."""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import zoo
from benchmarks.classifier_training import ClassifierRun, ClassifierSettings
from cli import app
from zoo import files
from zoo.checkpoint import load_train_state
from zoo.errors import ZooError
from zoo.train import Trainer, TrainSettings, resume_settings

ROOT = Path(__file__).resolve().parents[1]
TINY = {"base_channels": 4, "max_channels": 8, "latent_dim": 4}
STEPS = 12  # records every 2 steps and at epoch ends (every 5), saves every 4 and at epoch ends


def settings(faces: str, out: Path) -> TrainSettings:
    return TrainSettings(
        model="cvae", model_config=dict(TINY), data=faces, image_size=16, batch_size=16,
        max_steps=STEPS, epochs=100, save_every=4, log_every=2, out=str(out),
        precision="fp32", deterministic=True,
    )  # fmt: skip


def refuse(monkeypatch, name: str, after: int, code: int = errno.ENOSPC) -> None:
    """From the ``after + 1``-th time on, opening a file called ``name`` (or its temporary
    ``.name.tmp-PID``) for writing fails as the system would say it."""
    opened = []

    def open_or_refuse(path, mode="r", *args, **kwargs):
        target = Path(path).name
        if any(c in mode for c in "wax") and (target == name or target.startswith(f".{name}.")):
            opened.append(target)
            if len(opened) > after:
                raise OSError(code, os.strerror(code), str(path))
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(files, "open", open_or_refuse, raising=False)


def records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(line).items() if k not in ("img_per_s", "wall_time_s")}
        for line in lines
    ]


@pytest.fixture(scope="module")
def straight(synthetic_faces, tmp_path_factory) -> Path:
    return (
        Trainer(settings(synthetic_faces, tmp_path_factory.mktemp("straight")), progress=False)
        .run()
        .run_dir
    )


@pytest.mark.parametrize(
    ("name", "after", "saved"),
    [
        ("train_state.safetensors", 1, 4),  # the second save (step 5, an epoch end) fails
        ("model.safetensors", 1, 4),
        ("metrics.jsonl", 3, 5),  # records at 2, 4, 5, 7: the one at step 7 fails
    ],
)
def test_a_full_disk_during_training_is_one_line_and_the_run_resumes_exactly(
    synthetic_faces, straight, tmp_path, monkeypatch, name, after, saved
):
    trainer = Trainer(settings(synthetic_faces, tmp_path), progress=False)
    run = trainer.run_dir
    refuse(monkeypatch, name, after)
    with pytest.raises(ZooError) as caught:
        trainer.run()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"cannot write {run / name}: No space left on device (ENOSPC); ")
    assert f"nothing was lost: the last save (step {saved}, train_state.safetensors in {run})" in (
        message
    )
    assert message.endswith(f"free some disk space, then continue with: zoo train --resume {run}")
    assert load_train_state(run / "train_state.safetensors").step == saved
    zoo.load(run / "model.safetensors")  # the last weights load
    assert not [p.name for p in run.iterdir() if ".tmp-" in p.name]

    monkeypatch.undo()  # space came back
    resumed = Trainer(resume_settings(run), resume=run, progress=False)
    assert resumed.step == saved and resumed.run().step == STEPS
    assert records(run) == records(straight)  # every step in one record, identical losses


def test_a_sample_grid_the_disk_refuses_is_a_warning_and_training_goes_on(
    synthetic_faces, tmp_path, monkeypatch, caplog
):
    """Sample grids are for reading a run: a full disk there costs the picture, not the run
    (the next save that matters fails with its own line if the disk stays full)."""
    trainer = Trainer(settings(synthetic_faces, tmp_path), progress=False)
    refuse(monkeypatch, f"step_{5:07d}.png", 0)  # the epoch-end grid of step 5
    assert trainer.run().step == STEPS
    assert "sample grid step_0000005.png not written" in caplog.text
    assert "No space left on device" in caplog.text


def test_the_cli_says_it_in_one_line_and_exits_1(synthetic_faces, tmp_path, monkeypatch):
    refuse(monkeypatch, "train_state.safetensors", 0, errno.EACCES)
    done = CliRunner().invoke(app, [
        "train", "cvae", "--data", synthetic_faces, "--image-size", "16", "--max-steps", "3",
        "--latent-dim", "4", "-o", "base_channels=4", "-o", "max_channels=8", "--no-progress",
        "--out", str(tmp_path / "runs"),
    ])  # fmt: skip
    assert done.exit_code == 1 and "Traceback" not in done.output
    [run] = (tmp_path / "runs").iterdir()
    assert f"error: cannot write {run / 'train_state.safetensors'}: Permission denied" in (
        done.output.replace("\n", "")
    )
    assert "nothing was saved yet; make" in done.output and "start the run again" in done.output


def test_a_read_only_run_folder_on_resume_changes_nothing(
    synthetic_faces, straight, tmp_path, monkeypatch
):
    run = Path(shutil.copytree(straight, tmp_path / straight.name))
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    refuse(monkeypatch, "metrics.jsonl", 0, errno.EROFS)  # the resume trims the log first
    with pytest.raises(ZooError) as caught:
        Trainer(resume_settings(run, max_steps=STEPS + 4), resume=run, progress=False)
    message = str(caught.value)
    assert "Read-only file system (EROFS)" in message and "is intact" in message
    assert "the file system is read-only; remount it writable or copy the folder" in message
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()} == before


def test_the_classifier_trainer_says_the_same(synthetic_faces, tmp_path, monkeypatch):
    options = {"image_size": 16, "backbone": "test_resnet", "batch_size": 16, "max_steps": 6}
    options |= {"save_every": 2, "precision": "fp32", "out": str(tmp_path), "progress": False}
    run = ClassifierRun(ClassifierSettings(data=synthetic_faces, **options))
    refuse(monkeypatch, "classifier.safetensors", 1)
    with pytest.raises(ZooError, match=r"the last save \(step 2, .*zoo train-classifier --resume"):
        run.run()


FILLER = "filler.bin"


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs of our own (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root (the fault-injection tests cover it)")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, text=True)  # fmt: skip
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path) -> None:
    """Write a file until the file system is full."""
    with open(folder / FILLER, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC


def test_a_real_full_disk_then_space_again(synthetic_faces, small_disk, tmp_path):
    """On a real, small file system, filled once the run has saved: training stops with one
    line; once space comes back, the printed command finishes the run."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ZOO_CACHE_DIR": str(tmp_path / "cache")}
    command = [sys.executable, str(ROOT / "cli.py"), "train", "cvae", "--data", synthetic_faces,
               "--image-size", "16", "--batch-size", "16", "--max-steps", "20", "--epochs",
               "1000", "--save-every", "4", "--latent-dim", "4", "-o", "base_channels=4",
               "-o", "max_channels=8", "--precision", "fp32", "--no-progress",
               "--out", str(small_disk / "runs")]  # fmt: skip
    training = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
    while training.poll() is None and not list(small_disk.glob("runs/*/train_state.safetensors")):
        time.sleep(0.01)
    fill(small_disk)
    _, stderr = training.communicate(timeout=300)
    assert training.returncode == 1 and "Traceback" not in stderr, stderr
    [error] = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert "No space left on device (ENOSPC)" in error and "free some disk space" in error
    resume = error.split("continue with: zoo ")[1].split()
    (small_disk / FILLER).unlink()
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), *resume, "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    [run] = (small_disk / "runs").iterdir()
    steps = [record["step"] for record in records(run)]
    assert steps == sorted(set(steps)) and steps[-1] == 20
