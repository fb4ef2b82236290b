"""DDP: `zoo train --nproc 2` (torchrun, gloo on CPU) matches one process with the same batch,
however the global batch splits across the ranks (unevenly, or leaving a rank no image)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file

import zoo
from zoo.distributed import Ranks, join, torchrun_command, without_nproc

ROOT = Path(__file__).resolve().parents[1]

DETERMINISTIC_MODEL = """
    from zoo.models.vae import VAE


    class DeterministicAE(VAE):
        '''Trains on the posterior mean: no sampling noise, so DDP must equal one process.'''

        def loss(self, x, y=None, *, kl_weight=1.0):
            posterior = self.encode(x, y)
            recon = self.reconstruction_nll(self.decode_logits(posterior.mean, y), x).mean()
            kl = posterior.kl().mean()
            return {"loss": recon + kl_weight * kl, "recon": recon, "kl": kl}
"""


@pytest.fixture(scope="module")
def environment(tmp_path_factory) -> dict[str, str]:
    """A noise-free test model registered through a hand-written dist-info entry point."""
    site = tmp_path_factory.mktemp("site")
    (site / "det_ae.py").write_text(textwrap.dedent(DETERMINISTIC_MODEL))
    info = site / "det_ae_plugin-0.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: det-ae-plugin\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text("[zoo.models]\ndet-ae = det_ae:DeterministicAE\n")
    path = os.pathsep.join(filter(None, [str(site), str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "ZOO_CACHE_DIR": str(site / "cache")}


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


EDIT_MECHANISMS = ["-o", "film=true", "-o", "adversary_weight=1", "-o", "attr_weight=1",
                   "-o", "realism_weight=1"]  # fmt: skip


@pytest.mark.parametrize(("model", "options"), [("cvae", []), ("edit-cvae", EDIT_MECHANISMS)])
def test_ddp_run_of_a_builtin_model_resumes(environment, synthetic_faces, tmp_path, model, options):
    run = train(environment, synthetic_faces, tmp_path / "runs", model, "--batch-size", "16",
                "--max-steps", "4", "--nproc", "2", *options)  # fmt: skip
    done = zoo_command(environment, tmp_path, "train", "--resume", str(run), "--max-steps", "6",
                       "--nproc", "2", "--no-progress")  # fmt: skip
    assert "steps 4->6" in done.stdout
    state = zoo.read_info(run / "model.safetensors").training
    assert state["steps"] == 6 and state["processes"] == 2


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


def test_torchrun_command():
    argv = ["train", "cvae", "--nproc", "4", "--beta", "2", "--nproc=3"]
    assert without_nproc(argv) == ["train", "cvae", "--beta", "2"]
    command = torchrun_command(2, ["train", "cvae"])
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert command[-3:] == ["cli", "train", "cvae"]


def test_the_classifier_trainer_runs_as_two_processes(environment, synthetic_faces, tmp_path):
    """`zoo train-classifier --nproc 2` runs the shared loop under DDP (batch norm statistics
    are per rank, so its numbers are not one process's); rank 0 alone logs and saves."""
    out = tmp_path / "runs"
    zoo_command(
        environment, tmp_path, "train-classifier", "--data", synthetic_faces, "--image-size",
        "16", "--backbone", "test_resnet", "--batch-size", "16", "--max-steps", "6",
        "--precision", "fp32", "--no-progress", "--out", str(out), "--nproc", "2",
    )  # fmt: skip
    [run] = out.iterdir()
    with safe_open(str(run / "classifier.safetensors"), framework="pt") as handle:
        info = json.loads(handle.metadata()["zoo.training"])
    assert info["processes"] == 2 and info["steps"] == 6
    steps = [record["step"] for record in records(run)]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # one writer
    assert "eval_mean_accuracy" in records(run)[-1]
