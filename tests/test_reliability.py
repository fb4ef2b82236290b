"""Faults: kill -9 mid-training, then --resume, gives exactly the uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
STEPS = 400


def command(faces: str, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "cli", "train", "cvae", "--data", faces, "--image-size", "16",
        "--batch-size", "16", "--max-steps", str(STEPS), "--epochs", "1000", "--save-every", "25",
        "--sample-every", "100000", "--precision", "fp32", "--deterministic", "--no-progress",
        "--latent-dim", "4", "-o", "base_channels=4", "-o", "max_channels=8", "--out", str(out),
    ]  # fmt: skip


def saved_step(run: Path) -> int:
    try:
        with safe_open(str(run / "train_state.safetensors"), framework="pt") as handle:
            return int(handle.metadata()["step"])
    except Exception:  # not written yet, or being replaced right now
        return 0


def records(run: Path) -> list[tuple[int, float]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(record["step"], record["loss"]) for record in map(json.loads, lines)]


def test_kill_9_then_resume_equals_the_uninterrupted_run(synthetic_faces, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ZOO_CACHE_DIR": str(tmp_path / "cache")}
    straight = subprocess.run(
        command(synthetic_faces, tmp_path / "straight"),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert straight.returncode == 0, straight.stderr

    victim = subprocess.Popen(
        command(synthetic_faces, tmp_path / "killed"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    run = None
    while time.monotonic() < deadline and victim.poll() is None:
        runs = list((tmp_path / "killed").glob("cvae-*"))
        if runs and saved_step(runs[0]) >= 100:
            run = runs[0]
            break
        time.sleep(0.02)
    assert run is not None and victim.poll() is None, "training ended before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    killed_at = saved_step(run)
    assert 100 <= killed_at < STEPS

    resumed = subprocess.run(
        [sys.executable, "-m", "cli", "train", "--resume", str(run), "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"steps {killed_at}->{STEPS}" in resumed.stdout
    [reference] = (tmp_path / "straight").glob("cvae-*")
    assert records(run) == records(reference)  # same steps, bit-identical losses
    assert saved_step(run) == STEPS
