"""DDP: `zoo train --nproc 2` (torchrun, gloo on CPU) matches one process with the same batch,
however the global batch splits across the ranks (unevenly, or leaving a rank no image)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file

import zoo
from zoo.distributed import Ranks, join, without_nproc, worker_command

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def environment(deterministic_models) -> dict[str, str]:
    return deterministic_models


def zoo_command(environment, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "cli", *args],
        env=environment,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def train(environment, faces: str, out: Path, model: str, *extra: str) -> Path:
    args = ["train", model, "--data", faces, "--image-size", "16", "--precision", "fp32",
            "--out", str(out), "--no-progress", "--latent-dim", "4", "-o", "base_channels=4",
            "-o", "max_channels=8", *extra]  # fmt: skip
    zoo_command(environment, out.parent, *args)
    [run] = out.iterdir()
    return run


def weights(run: Path) -> torch.Tensor:
    tensors = load_file(run / "model.safetensors")  # the test model is registered only in the runs
    return torch.cat([tensors[name].flatten() for name in sorted(tensors)])


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# 77 train images (odd) in global batches of 19: 10 + 9 images per rank, and the epoch's last
# batch is 1 image, so rank 1 has none. Flips on; saves every 3 steps fall inside logging
# windows (records at epoch ends, every 5 steps).
BATCHES = ["--batch-size", "19", "--save-every", "3"]


def test_two_processes_match_one_for_any_batch_split_and_after_a_resume(
    environment, synthetic_faces, tmp_path
):
    single = train(environment, synthetic_faces, tmp_path / "one", "det-ae", *BATCHES,
                   "--epochs", "2", "--max-steps", "7")  # fmt: skip
    double = train(environment, synthetic_faces, tmp_path / "two", "det-ae", *BATCHES,
                   "--epochs", "1", "--nproc", "2")  # fmt: skip
    assert [r["step"] for r in records(double)] == [5]
    resumed = zoo_command(environment, tmp_path, "train", "--resume", str(double), "--epochs", "2",
                          "--max-steps", "7", "--nproc", "2", "--no-progress")  # fmt: skip
    assert "steps 5->7" in resumed.stdout

    one, two = weights(single), weights(double)
    assert (one - two).norm() / one.norm() < 1e-5
    assert [r["step"] for r in records(single)] == [r["step"] for r in records(double)] == [5, 7]
    for a, b in zip(records(single), records(double), strict=True):
        for key in ("loss", "recon", "kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    summary = zoo.read_info(double / "model.safetensors").training
    assert summary["processes"] == 2 and summary["steps"] == 7
    assert len(list((tmp_path / "two").iterdir())) == 1  # the ranks shared one run folder


def test_beta_tcvae_estimates_q_of_z_over_the_global_batch_under_ddp(
    environment, synthetic_faces, tmp_path
):
    """Its total-correlation term compares every image with every other of the batch: two
    processes must gather each other's posteriors to match one (the last batch of the epoch
    leaves rank 1 without images)."""
    single = train(environment, synthetic_faces, tmp_path / "one", "det-tcvae", *BATCHES,
                   "--epochs", "1")  # fmt: skip
    double = train(environment, synthetic_faces, tmp_path / "two", "det-tcvae", *BATCHES,
                   "--epochs", "1", "--nproc", "2")  # fmt: skip
    one, two = weights(single), weights(double)
    assert (one - two).norm() / one.norm() < 1e-5
    for a, b in zip(records(single), records(double), strict=True):
        for key in ("loss", "total_correlation", "mutual_information", "dimension_kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key


EDIT_MECHANISMS = ["-o", "film=true", "-o", "adversary_weight=1", "-o", "attr_weight=1",
                   "-o", "realism_weight=1"]  # fmt: skip


def test_each_rank_binds_its_gpu_before_the_process_group_starts(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set", device)))
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    join(Ranks(rank=1, world_size=2, local_rank=1), torch.device("cuda", 1))
    assert calls == [("set", torch.device("cuda", 1)), ("init", "nccl")]
    calls.clear()
    join(Ranks(rank=1, world_size=2, local_rank=1), torch.device("cpu"))
    assert calls == [("init", "gloo")]


def test_the_ranks_run_zoos_own_cli_file_without_the_nproc_option():
    argv = ["train", "cvae", "--nproc", "4", "--beta", "2", "--nproc=3"]
    assert without_nproc(argv) == ["train", "cvae", "--beta", "2"]
    command = worker_command(ROOT / "cli.py", ["train", "cvae"])
    assert "-m" not in command  # `python -m` would put the working directory first
    assert command[-3:] == [str(ROOT / "cli.py"), "train", "cvae"]


HOSTILE = "open({marker!r}, 'w').write('ran')\n"


def hostile_folder(tmp_path: Path) -> Path:
    """A working directory whose cli.py, zoo/ and benchmarks/ would run if they shadowed zoo's."""
    folder = tmp_path / "project"
    for relative in ("cli.py", "zoo/__init__.py", "benchmarks/__init__.py", "torch/__init__.py"):
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(HOSTILE.format(marker=str(tmp_path / "shadowed")))
    return folder


def workers_of(out: Path) -> list[int]:
    """Pids of processes still running with ``out`` on their command line."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(out).encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:  # the process ended while we looked
            continue
    return pids


def interrupt_like_a_terminal(command: list[str], env: dict, cwd: Path, out: Path) -> str:
    """Start ``command`` in its own process group, wait until its run has logged a record,
    then send SIGINT to the whole group, as a terminal's Ctrl-C does; its output."""
    piped = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    process = subprocess.Popen(command, env=env, cwd=cwd, start_new_session=True, **piped)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if any(run.stat().st_size for run in out.glob("*/metrics.jsonl")):
            break
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()[0]
    os.killpg(process.pid, signal.SIGINT)
    stdout, _ = process.communicate(timeout=300)
    assert process.returncode == 130, stdout
    assert workers_of(out) == [], "a rank outlived the launcher"
    return stdout


def resumed_command(stdout: str) -> list[str]:
    """The printed ``continue with: zoo ...`` command, run through zoo's cli.py file."""
    [printed] = re.findall(r"continue with: zoo (.+)$", stdout, re.MULTILINE)
    return [sys.executable, str(ROOT / "cli.py"), *shlex.split(printed)]


# docs/reliability.md: you press Ctrl-C during training (--nproc)
@pytest.mark.parametrize("trainer", ["train", "train-classifier"])
def test_ctrl_c_stops_both_trainers_ranks_after_a_save_and_a_working_dir_cannot_shadow_zoo(
    environment, synthetic_faces, tmp_path, trainer
):
    """The ranks save, rank 0 prints the resume command (with --nproc 2), the launcher exits
    130 and no rank is left running; a cli.py (or zoo/, torch/) in the working directory
    never runs, and the printed command finishes the run. The model has every edit
    mechanism, whose networks and counters must resume under DDP too."""
    out, cwd = tmp_path / "runs", hostile_folder(tmp_path)
    model = ["edit-cvae", "--latent-dim", "4", "-o", "base_channels=4", "-o", "max_channels=8",
             *EDIT_MECHANISMS]  # fmt: skip
    if trainer == "train-classifier":
        model = ["--backbone", "test_resnet"]
    command = [sys.executable, str(ROOT / "cli.py"), trainer, *model, "--data", synthetic_faces,
               "--image-size", "16", "--batch-size", "16", "--epochs", "100000", "--precision",
               "fp32", "--no-progress", "--out", str(out), "--nproc", "2"]  # fmt: skip
    stdout = interrupt_like_a_terminal(command, environment, cwd, out)
    resume = resumed_command(stdout)
    assert resume[-2:] == ["--nproc", "2"]
    [run] = out.iterdir()
    with safe_open(str(run / "train_state.safetensors"), framework="pt") as handle:
        saved = int(handle.metadata()["step"])
    [stopped] = re.findall(r"interrupted at step (\d+)/", stdout)
    assert saved == int(stopped) >= records(run)[-1]["step"]  # saved the last trained step
    finish = [*resume, "--max-steps", str(saved + 2), "--no-progress"]
    done = subprocess.run(finish, env=environment, cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (tmp_path / "shadowed").exists()
    steps = [record["step"] for record in records(run)]
    assert steps == sorted(set(steps)) and steps[-1] == saved + 2  # one writer
    weights_file = (
        "classifier.safetensors" if trainer == "train-classifier" else "model.safetensors"
    )
    with safe_open(str(run / weights_file), framework="pt") as handle:
        training = json.loads(handle.metadata()["zoo.training"])
    assert training["processes"] == 2 and training["steps"] == saved + 2
    if trainer == "train-classifier":
        assert "eval_mean_accuracy" in records(run)[-1]
