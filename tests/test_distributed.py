"""DDP: `zoo train --nproc 2` (torchrun, gloo on CPU) matches one process with the same batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import zoo
from zoo.distributed import torchrun_command, without_nproc

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


def train(environment, faces: str, out: Path, model: str, *extra: str) -> Path:
    args = ["train", model, "--data", faces, "--image-size", "16", "--batch-size", "16",
            "--max-steps", "4", "--no-flip", "--precision", "fp32", "--out", str(out),
            "--no-progress", "--latent-dim", "4", "-o", "base_channels=4", "-o", "max_channels=8",
            *extra]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "cli", *args],
        env=environment,
        cwd=out.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    [run] = out.iterdir()
    return run


def weights(run: Path) -> torch.Tensor:
    tensors = load_file(run / "model.safetensors")  # the test model is registered only in the runs
    return torch.cat([tensors[name].flatten() for name in sorted(tensors)])


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_with_the_same_global_batch(environment, synthetic_faces, tmp_path):
    single = train(environment, synthetic_faces, tmp_path / "one", "det-ae")
    double = train(environment, synthetic_faces, tmp_path / "two", "det-ae", "--nproc", "2")
    one, two = weights(single), weights(double)
    assert (one - two).norm() / one.norm() < 1e-5
    assert losses(single) == pytest.approx(losses(double), rel=1e-5)
    summary = zoo.read_info(double / "model.safetensors").training
    assert summary["processes"] == 2 and summary["steps"] == 4
    assert (
        not (tmp_path / "two").joinpath("x").exists()
        and len(list((tmp_path / "two").iterdir())) == 1
    )


EDIT_MECHANISMS = ["-o", "film=true", "-o", "adversary_weight=1", "-o", "attr_weight=1",
                   "-o", "realism_weight=1"]  # fmt: skip


@pytest.mark.parametrize(("model", "options"), [("cvae", []), ("edit-cvae", EDIT_MECHANISMS)])
def test_ddp_run_of_a_builtin_model_resumes(environment, synthetic_faces, tmp_path, model, options):
    run = train(environment, synthetic_faces, tmp_path / "runs", model, "--nproc", "2", *options)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "train",
            "--resume",
            str(run),
            "--max-steps",
            "6",
            "--nproc",
            "2",
            "--no-progress",
        ],
        env=environment,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "steps 4->6" in done.stdout
    state = zoo.read_info(run / "model.safetensors").training
    assert state["steps"] == 6 and state["processes"] == 2


def test_torchrun_command():
    argv = ["train", "cvae", "--nproc", "4", "--beta", "2", "--nproc=3"]
    assert without_nproc(argv) == ["train", "cvae", "--beta", "2"]
    command = torchrun_command(2, ["train", "cvae"])
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert command[-3:] == ["cli", "train", "cvae"]
