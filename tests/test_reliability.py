"""Faults: kill -9 or Ctrl-C mid-training, then --resume, gives exactly the uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]


def command(faces: str, out: Path, steps: int, save_every: int) -> list[str]:
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


SERIES_STEPS = 200
SERIES_SEED = int(os.environ.get("ZOO_KILL_SERIES_SEED", random.randrange(10**6)))


# docs/reliability.md: you press Ctrl-C during training
# docs/reliability.md: the process is killed (`kill -9`, power loss)
# docs/reliability.md: a run is resumed while another process still trains it
@pytest.mark.long
def test_a_random_series_of_kills_and_ctrl_c_then_resume_equals_the_uninterrupted_run(
    synthetic_faces, tmp_path
):
    """Six stops at random moments (kill -9 or Ctrl-C, anywhere in a step: forward, backward,
    optimizer, log or save), saves every 1, 2, 3 or 7 steps; a resume started while the run
    still trains is refused. Then every step is in exactly one record of metrics.jsonl, with
    the uninterrupted run's bit-identical losses. (matplotlib is hidden from the runs, so a
    save is a few milliseconds and the stops spread over the whole step.) Replay a failure
    with ZOO_KILL_SERIES_SEED=<the seed in its message>."""
    rng = random.Random(SERIES_SEED)
    save_every = rng.choice([1, 2, 3, 7])
    hidden = tmp_path / "no-matplotlib" / "matplotlib"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('hidden by the kill series test')\n")
    path = os.pathsep.join([str(hidden.parent), str(ROOT)])
    env = {**os.environ, "PYTHONPATH": path, "ZOO_CACHE_DIR": str(tmp_path / "cache")}
    piped = {"env": env, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    straight = subprocess.Popen(
        command(synthetic_faces, tmp_path / "straight", SERIES_STEPS, save_every=25), **piped
    )
    out = tmp_path / "series"
    train = command(synthetic_faces, out, SERIES_STEPS, save_every=save_every)
    stops = []
    for index in range(6):
        process = subprocess.Popen(train, **piped)
        printed = []  # notes come first, then "training ..." once set up (its log trimmed)
        for line in process.stdout:
            printed.append(line)
            if line.startswith("training "):
                break
        time.sleep(0.05 + rng.uniform(0, 0.25))  # 50 ms: its Ctrl-C handler is in place
        if index == 2:  # a second process on the same run, while this one trains (paused)
            os.kill(process.pid, signal.SIGSTOP)
            [run] = out.glob("cvae-*")
            second = subprocess.run(
                [sys.executable, "-m", "cli", "train", "--resume", str(run)],
                env=env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            os.kill(process.pid, signal.SIGCONT)
            assert second.returncode == 1, second.stdout + second.stderr
            assert "is being trained by another process right now" in second.stderr
        how = rng.choice([signal.SIGKILL, signal.SIGINT])
        assert process.poll() is None, (
            f"seed {SERIES_SEED}: the run ended before stop {index}: {''.join(printed)}"
        )
        os.kill(process.pid, how)
        stdout, _ = process.communicate(timeout=120)
        [run] = out.glob("cvae-*")
        stops.append((how.name, saved_step(run)))
        assert process.returncode == (130 if how == signal.SIGINT else -how), (
            f"seed {SERIES_SEED}, saves every {save_every}, stops {stops}: {stdout}"
        )
        if saved_step(run) == 0:  # killed before its first save: start again, as zoo advises
            shutil.rmtree(run)
            continue
        train = [sys.executable, "-m", "cli", "train", "--resume", str(run)]
    done = subprocess.run(train, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert straight.wait(timeout=600) == 0

    [reference] = (tmp_path / "straight").glob("cvae-*")
    story = f"seed {SERIES_SEED}, saves every {save_every}, stops {stops}"
    assert untimed_records(run) == untimed_records(reference), story
    assert saved_step(run) == SERIES_STEPS, story
    assert f"steps {stops[-1][1]}->{SERIES_STEPS}" in done.stdout, story
    assert [p.name for p in run.iterdir() if ".tmp-" in p.name] == [], story


CLASSIFIER_STEPS = 40


def classifier_command(faces: str, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "cli", "train-classifier", "--data", faces, "--image-size", "16",
        "--backbone", "test_resnet", "--batch-size", "16", "--max-steps", str(CLASSIFIER_STEPS),
        "--epochs", "1000", "--save-every", "10", "--precision", "fp32", "--no-progress",
        "--out", str(out),
    ]  # fmt: skip


# docs/reliability.md: the process is killed (`kill -9`), for the classifier trainer
def test_kill_9_of_the_classifier_trainer_then_resume_equals_the_uninterrupted_run(
    synthetic_faces, tmp_path
):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ZOO_CACHE_DIR": str(tmp_path / "cache")}
    log = tmp_path / "straight.log"
    with log.open("w") as sink:  # the reference runs beside: most of either is starting up
        straight = subprocess.Popen(
            classifier_command(synthetic_faces, tmp_path / "straight"), env=env, stdout=sink,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    run, killed_at, _ = kill_9_then_resume(
        classifier_command(synthetic_faces, tmp_path / "killed"),
        [sys.executable, "-m", "cli", "train-classifier", "--resume"],
        tmp_path / "killed",
        "classifier",
        15,
        env,
    )
    assert 15 <= killed_at < CLASSIFIER_STEPS
    assert straight.wait(timeout=600) == 0, log.read_text()
    [reference] = (tmp_path / "straight").glob("classifier-*")
    lines = [untimed_records(run), untimed_records(reference)]
    assert lines[0] == lines[1]  # same steps, bit-identical losses, evaluations and rates
    assert saved_step(run) == CLASSIFIER_STEPS
    with (
        safe_open(str(run / "classifier.safetensors"), framework="pt") as mine,
        safe_open(str(reference / "classifier.safetensors"), framework="pt") as theirs,
    ):
        assert all(mine.get_tensor(k).equal(theirs.get_tensor(k)) for k in theirs.keys())  # noqa: SIM118
