"""DDP: `zoo train --nproc 2` (torchrun, gloo on CPU) matches one process with the same batch,
however the global batch splits across the ranks (unevenly, or leaving a rank no image); an
srun step's tasks (Slurm's variables, set by hand) train as torchrun's processes do."""

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
from zoo.distributed import (
    Ranks,
    first_host,
    free_port,
    hostnames,
    join,
    launched_ranks,
    without_nproc,
    worker_command,
)

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


def train_args(faces: str, out: Path, model: str, *extra: str) -> list[str]:
    return ["train", model, "--data", faces, "--image-size", "16", "--precision", "fp32",
            "--out", str(out), "--no-progress", "--latent-dim", "4", "-o", "base_channels=4",
            "-o", "max_channels=8", *extra]  # fmt: skip


def train(environment, faces: str, out: Path, model: str, *extra: str) -> Path:
    zoo_command(environment, out.parent, *train_args(faces, out, model, *extra))
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


@pytest.mark.long
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


TCVAE_EPOCH = ["det-tcvae", *BATCHES, "--epochs", "1"]


@pytest.fixture(scope="module")
def tcvae_two_processes(environment, synthetic_faces, tmp_path_factory) -> Path:
    """`--nproc 2`'s run of `TCVAE_EPOCH`, for the tests that compare a run with it."""
    out = tmp_path_factory.mktemp("tcvae") / "two"
    return train(environment, synthetic_faces, out, *TCVAE_EPOCH, "--nproc", "2")


def test_beta_tcvae_estimates_q_of_z_over_the_global_batch_under_ddp(
    environment, synthetic_faces, tmp_path, tcvae_two_processes
):
    """Its total-correlation term compares every image with every other of the batch: two
    processes must gather each other's posteriors to match one (the last batch of the epoch
    leaves rank 1 without images)."""
    single = train(environment, synthetic_faces, tmp_path / "one", *TCVAE_EPOCH)
    double = tcvae_two_processes
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
    monkeypatch.setattr(
        dist, "init_process_group", lambda backend, **given: calls.append(("init", backend, given))
    )
    join(Ranks(rank=1, world_size=2, local_rank=1), torch.device("cuda", 1))
    given = {"init_method": "env://", "rank": 1, "world_size": 2}
    assert calls == [("set", torch.device("cuda", 1)), ("init", "nccl", given)]
    calls.clear()
    join(Ranks(rank=1, world_size=2, local_rank=1, rendezvous="tcp://node01:10123"),
         torch.device("cpu"))  # fmt: skip
    assert calls == [("init", "gloo", {**given, "init_method": "tcp://node01:10123"})]


def test_slurm_host_lists_expand_in_order_keeping_zero_padding():
    assert list(hostnames("node01")) == ["node01"]
    assert list(hostnames("node[01-04,07]")) == ["node01", "node02", "node03", "node04", "node07"]
    assert list(hostnames("gpu-a[3-5],gpu-b7")) == ["gpu-a3", "gpu-a4", "gpu-a5", "gpu-b7"]
    assert list(hostnames("rack[1-2]-n[08-09]")) == ["rack1-n08", "rack1-n09", "rack2-n08",
                                                     "rack2-n09"]  # fmt: skip
    assert first_host("localhost") == "localhost"
    assert first_host("node[099-101]") == "node099"


LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def launcher_free(monkeypatch) -> pytest.MonkeyPatch:
    """No torchrun or Slurm variables from the shell that runs the tests."""
    for name in [*LAUNCH_VARIABLES, *(n for n in os.environ if n.startswith("SLURM_"))]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def set_srun_task(monkeypatch, rank: int, tasks: int, *, step: bool = True) -> None:
    """The variables Slurm gives task ``rank`` of an srun step (or, without ``step``, the batch
    script of a job of ``tasks`` tasks, where SLURM_PROCID is 0 and there is no step id)."""
    variables = {"SLURM_NTASKS": str(tasks), "SLURM_PROCID": str(rank if step else 0),
                 "SLURM_LOCALID": str(rank % 2 if step else 0), "SLURM_JOB_ID": "123456",
                 "SLURM_JOB_NODELIST": "node[07-08]", "SLURM_NODELIST": "node[07-08]"}  # fmt: skip
    if step:
        variables |= {"SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "node[07-08]"}
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


def test_launched_ranks_are_torchruns_else_an_srun_steps_else_a_world_of_one(launcher_free):
    assert launched_ranks() == Ranks()
    launcher_free.setenv("WORLD_SIZE", "4")
    launcher_free.setenv("RANK", "3")
    launcher_free.setenv("LOCAL_RANK", "1")
    assert launched_ranks() == Ranks(rank=3, world_size=4, local_rank=1, rendezvous="env://")
    set_srun_task(launcher_free, 2, 4)
    assert launched_ranks() == Ranks(3, 4, 1)  # torchrun's win (--nproc inside a Slurm job)
    for name in LAUNCH_VARIABLES:
        launcher_free.delenv(name, raising=False)
    # every task derives the same port from the job id: 10000 + 123456 % 20000
    assert launched_ranks() == Ranks(2, 4, 0, rendezvous="tcp://node07:13456")
    launcher_free.setenv("MASTER_ADDR", "10.0.0.5")
    launcher_free.setenv("MASTER_PORT", "29500")
    assert launched_ranks().rendezvous == "tcp://10.0.0.5:29500"


def test_a_batch_script_outside_srun_is_a_world_of_one_not_rank_0_of_its_job(launcher_free):
    """Slurm sets SLURM_NTASKS and SLURM_PROCID=0 in the batch script of a multi-task job too:
    taken for rank 0 of 4, `zoo train` there would wait forever for the other three."""
    set_srun_task(launcher_free, 0, 4, step=False)
    assert launched_ranks() == Ranks()
    set_srun_task(launcher_free, 0, 1)  # an srun step of one task
    assert launched_ranks() == Ranks()


def test_an_srun_step_of_two_tasks_trains_as_torchruns_two_processes(
    environment, synthetic_faces, tmp_path, tcvae_two_processes
):
    """`srun zoo train` without torchrun: two processes given only Slurm's variables (set by
    hand as srun sets them: there is no cluster here) save the weights of `--nproc 2`'s two,
    gathering each other's posteriors and leaving rank 1 without images in the last batch."""
    out = tmp_path / "srun"
    command = [sys.executable, str(ROOT / "cli.py"), *train_args(synthetic_faces, out,
                                                                 *TCVAE_EPOCH)]  # fmt: skip
    shell = {name: value for name, value in environment.items()
             if name not in LAUNCH_VARIABLES and not name.startswith("SLURM_")}  # fmt: skip
    job = {**shell, "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "localhost", "MASTER_PORT": str(free_port())}  # fmt: skip
    piped = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    tasks = [
        subprocess.Popen(command, cwd=tmp_path, **piped,
                         env={**job, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)})
        for rank in range(2)
    ]  # fmt: skip
    try:
        outputs = [task.communicate(timeout=300)[0] for task in tasks]
    finally:
        for task in tasks:
            task.kill()
            task.wait()
    assert [task.returncode for task in tasks] == [0, 0], outputs
    [srun] = out.iterdir()  # one run folder: alone, each task would have made its own
    assert zoo.read_info(srun / "model.safetensors").training["processes"] == 2
    assert torch.equal(weights(srun), weights(tcvae_two_processes))


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
@pytest.mark.long
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
