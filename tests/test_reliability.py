"""Faults: kill -9 or Ctrl-C mid-training, then --resume, gives exactly the uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
STEPS = 240  # a kill after the save at step 100 still leaves most of the run to resume


def command(faces: str, out: Path, steps: int = STEPS, save_every: int = 25) -> list[str]:
    return [
        sys.executable, "-m", "cli", "train", "cvae", "--data", faces, "--image-size", "16",
        "--batch-size", "16", "--max-steps", str(steps), "--epochs", "1000",
        "--save-every", str(save_every), "--sample-every", "100000", "--precision", "fp32",
        "--deterministic", "--no-progress", "--latent-dim", "4", "-o", "base_channels=4",
        "-o", "max_channels=8", "--out", str(out),
    ]  # fmt: skip


def saved_step(run: Path) -> int:
    try:
        with safe_open(str(run / "train_state.safetensors"), framework="pt") as handle:
            return int(handle.metadata()["step"])
    except Exception:  # not written yet, or being replaced right now
        return 0


def untimed_records(run: Path) -> list[dict]:
    """Every metrics record of a run without its timings: what a resumed run must repeat."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(line).items() if k not in ("img_per_s", "wall_time_s")}
        for line in lines
    ]


def records(run: Path) -> list[tuple[int, float]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(record["step"], record["loss"]) for record in map(json.loads, lines)]


def kill_9_then_resume(
    train: list[str], resume: list[str], out: Path, prefix: str, kill_after: int, env: dict
) -> tuple[Path, int, subprocess.CompletedProcess]:
    """Run ``train``, kill -9 it once its run in ``out`` has saved step ``kill_after`` or later,
    then run ``resume`` on that run: the run folder, the step it was killed at, the resume."""
    victim = subprocess.Popen(train, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    run = None
    while time.monotonic() < deadline and victim.poll() is None:
        runs = list(out.glob(f"{prefix}-*"))
        if runs and saved_step(runs[0]) >= kill_after:
            run = runs[0]
            break
        time.sleep(0.01)
    assert run is not None and victim.poll() is None, "training ended before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    killed_at = saved_step(run)
    resumed = subprocess.run(
        [*resume, str(run), "--no-progress"], env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    return run, killed_at, resumed


def finished(command: list[str], env: dict) -> None:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr


# README "What happens when": the process is killed (`kill -9`, power loss)
def test_kill_9_then_resume_equals_the_uninterrupted_run(synthetic_faces, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ZOO_CACHE_DIR": str(tmp_path / "cache")}
    finished(command(synthetic_faces, tmp_path / "straight"), env)
    run, killed_at, resumed = kill_9_then_resume(
        command(synthetic_faces, tmp_path / "killed"),
        [sys.executable, "-m", "cli", "train", "--resume"],
        tmp_path / "killed",
        "cvae",
        100,
        env,
    )
    assert 100 <= killed_at < STEPS
    assert f"steps {killed_at}->{STEPS}" in resumed.stdout
    [reference] = (tmp_path / "straight").glob("cvae-*")
    assert records(run) == records(reference)  # same steps, bit-identical losses
    assert saved_step(run) == STEPS


CHAIN_STEPS = 60


def last_record_step(run: Path) -> int:
    """The step of the last complete line of the metrics log (0 before there is one)."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError):
        return 0


def stop_at_random(process: subprocess.Popen, out: Path, after_step: int, rng, how) -> str:
    """Send ``how`` to a training process at a random moment once it logged past ``after_step``;
    its stdout. The moment falls anywhere in a step: forward, backward, optimizer, log or save."""
    target = after_step + rng.randint(1, 10)
    # its first line comes once it has trimmed the log of the run it resumes, whose last
    # records may already be past the target
    first_line = process.stdout.readline()
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        runs = list(out.glob("cvae-*"))
        if runs and last_record_step(runs[0]) >= target:
            time.sleep(rng.uniform(0, 0.05))
            break
        time.sleep(0.005)
    assert process.poll() is None, "training ended before it could be stopped"
    os.kill(process.pid, how)
    stdout, _ = process.communicate(timeout=120)
    return first_line + stdout


def resume_command(stdout: str) -> list[str]:
    """The printed `zoo train --resume RUN` command, as an argument list for `python -m cli`."""
    [printed] = re.findall(r"^continue with: zoo (train --resume .+)$", stdout, re.MULTILINE)
    return [sys.executable, "-m", "cli", *shlex.split(printed)]


# README "What happens when": you press Ctrl-C during training
# README "What happens when": the process is killed (`kill -9`, power loss)
def test_ctrl_c_and_kill_at_random_moments_then_resume_equal_the_uninterrupted_run(
    synthetic_faces, tmp_path
):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ZOO_CACHE_DIR": str(tmp_path / "cache")}
    # saves every 7 steps fall inside the logging windows (records at epoch ends, every 5)
    straight = subprocess.Popen(
        command(synthetic_faces, tmp_path / "straight", CHAIN_STEPS, save_every=7),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rng = random.Random(12)
    out = tmp_path / "chain"
    piped = {"env": env, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    process = subprocess.Popen(command(synthetic_faces, out, CHAIN_STEPS, save_every=7), **piped)
    stdout = stop_at_random(process, out, 0, rng, signal.SIGINT)
    assert process.returncode == 130, stdout
    resume = resume_command(stdout)
    [run] = out.glob("cvae-*")
    for how, code in ((signal.SIGKILL, -signal.SIGKILL), (signal.SIGINT, 130)):
        process = subprocess.Popen(resume, **piped)
        stdout = stop_at_random(process, out, saved_step(run), rng, how)
        assert process.returncode == code, stdout
        if how == signal.SIGINT:
            assert resume_command(stdout) == resume
    finished = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert straight.wait(timeout=600) == 0

    [reference] = (tmp_path / "straight").glob("cvae-*")
    lines = [untimed_records(run), untimed_records(reference)]
    assert lines[0] == lines[1]  # every step in one record, with bit-identical losses
    assert saved_step(run) == CHAIN_STEPS
    assert [p.name for p in run.iterdir() if ".tmp-" in p.name] == []


CLASSIFIER_STEPS = 40


def classifier_command(faces: str, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "cli", "train-classifier", "--data", faces, "--image-size", "16",
        "--backbone", "test_resnet", "--batch-size", "16", "--max-steps", str(CLASSIFIER_STEPS),
        "--epochs", "1000", "--save-every", "10", "--precision", "fp32", "--no-progress",
        "--out", str(out),
    ]  # fmt: skip


# README "What happens when": the process is killed (`kill -9`), for the classifier trainer
def test_kill_9_of_the_classifier_trainer_then_resume_equals_the_uninterrupted_run(
    synthetic_faces, tmp_path
):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ZOO_CACHE_DIR": str(tmp_path / "cache")}
    finished(classifier_command(synthetic_faces, tmp_path / "straight"), env)
    run, killed_at, _ = kill_9_then_resume(
        classifier_command(synthetic_faces, tmp_path / "killed"),
        [sys.executable, "-m", "cli", "train-classifier", "--resume"],
        tmp_path / "killed",
        "classifier",
        15,
        env,
    )
    assert 15 <= killed_at < CLASSIFIER_STEPS
    [reference] = (tmp_path / "straight").glob("classifier-*")
    lines = [untimed_records(run), untimed_records(reference)]
    assert lines[0] == lines[1]  # same steps, bit-identical losses, evaluations and rates
    assert saved_step(run) == CLASSIFIER_STEPS
    with (
        safe_open(str(run / "classifier.safetensors"), framework="pt") as mine,
        safe_open(str(reference / "classifier.safetensors"), framework="pt") as theirs,
    ):
        assert all(mine.get_tensor(k).equal(theirs.get_tensor(k)) for k in theirs.keys())  # noqa: SIM118
