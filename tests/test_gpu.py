"""GPU acceptance suite: what a user does, on CUDA, in one command: ``python -m pytest -m gpu``.

Every test here is marked ``gpu`` and runs on CUDA where ``torch.cuda.is_available()``; each
names what it would catch there. Without CUDA the same tests run on the CPU (so the default
``python -m pytest``, and CI, check the suite itself); ``ZOO_GPU_TEST_DEVICE`` chooses.

TF32: zoo keeps PyTorch's default, in which cuDNN convolutions use TF32 on Ampere and later
GPUs (results about 1e-3 from the CPU's); ``--deterministic`` and `zoo.device.exact_fp32`
turn it off. The comparisons with the CPU run in exact fp32, where reconstructions and
generated images of one checkpoint agree to 1e-4 (cuDNN and oneDNN sum in different orders).
Training trajectories are not compared across devices: the reparameterisation noise comes
from each device's own generator.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import zoo
from benchmarks.classifier_training import (
    ClassifierRun,
    ClassifierSettings,
    finished_classifier,
)
from zoo.data import checkpoint_data, load_data
from zoo.precision import autocast, exact_fp32
from zoo.registry import MODELS
from zoo.train import Trainer, TrainSettings

DEVICE = os.environ.get("ZOO_GPU_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.startswith("cuda")
ROOT = Path(__file__).resolve().parents[1]
TINY = {"latent_dim": 4, "base_channels": 4, "max_channels": 8}
TOLERANCE = 1e-4  # one checkpoint on the device against the CPU, in exact fp32

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        ON_CUDA and not torch.cuda.is_available(),
        reason=f"ZOO_GPU_TEST_DEVICE={DEVICE} but there is no CUDA GPU here",
    ),
]


@pytest.fixture(autouse=True)
def global_state_restored():
    """--deterministic switches process-wide torch flags; later tests must not inherit them."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    benchmark = torch.backends.cudnn.benchmark
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = benchmark
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def train(faces: str, out: Path, model: str = "cvae", **overrides) -> Path:
    options = {"max_steps": 4, **overrides}
    settings = TrainSettings(
        model=model, data=faces, image_size=16, batch_size=16, log_every=2, device=DEVICE,
        out=str(out), model_config=dict(TINY), **options,
    )  # fmt: skip
    return Trainer(settings, progress=False).run().run_dir


def state_keys(run: Path) -> set[str]:
    with safe_open(str(run / "train_state.safetensors"), framework="pt") as handle:
        return set(handle.keys())


# Item 1: every registered model trains on the GPU in the automatic precision.
# Catches: a model or mechanism with a CPU-only op, a tensor created on the CPU inside a loss
# (device mismatch), autocast given the wrong device type, a precision rule that picks bf16 on a
# GPU without it.
@pytest.mark.parametrize("model", MODELS.names())
def test_every_registered_model_trains_a_few_steps_in_the_automatic_precision(
    model, synthetic_faces, tmp_path
):
    run = train(synthetic_faces, tmp_path, model=model)
    info = zoo.read_info(run / "model.safetensors")
    assert info.training["device"].startswith(DEVICE)
    # auto: bf16 on a GPU that has it; on the CPU the probe result the suite stores (fp32)
    bf16 = ON_CUDA and torch.cuda.is_bf16_supported()
    assert info.training["precision"] == ("bf16" if bf16 else "fp32")
    assert all(math.isfinite(v) for v in info.training["final_losses"].values())
    loaded = zoo.load(run / "model.safetensors", device=DEVICE)
    y = torch.zeros(2, len(info.attr_names), device=DEVICE) if loaded.conditional else None
    assert loaded.generate(2, y).device.type == torch.device(DEVICE).type


# Item 1 and 3: resume exactly, with the CUDA generator's state saved per device.
# Catches: an RNG state not saved or restored for CUDA, non-deterministic kernels under
# --deterministic (cuDNN autotuning, cuBLAS workspaces), optimizer state left on the wrong device.
def test_a_resumed_gpu_run_equals_the_uninterrupted_run(synthetic_faces, tmp_path):
    common = {"precision": "fp32", "deterministic": True, "save_every": 3}
    straight = train(synthetic_faces, tmp_path / "straight", max_steps=8, **common)
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    first = train(synthetic_faces, tmp_path / "resumed", max_steps=5, **common)
    assert ("rng.cuda" in state_keys(first)) == ON_CUDA
    settings = TrainSettings(**json.loads((first / "config.json").read_text())["settings"])
    settings.max_steps = 8
    Trainer(settings, resume=first, progress=False).run()
    for run in (first, straight):
        assert zoo.read_info(run / "model.safetensors").training["steps"] == 8
    with (
        safe_open(str(first / "model.safetensors"), framework="pt") as resumed,
        safe_open(str(straight / "model.safetensors"), framework="pt") as reference,
    ):
        for name in reference.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            assert torch.equal(resumed.get_tensor(name), reference.get_tensor(name)), name


# Item 1 and 3: two GPUs, one per rank, through NCCL, train as one GPU does.
# Catches: ranks sharing GPU 0 (set_device missing before NCCL starts), NCCL collectives on CPU
# tensors, a checkpoint written by two ranks, gradients not averaged as one process's.
@pytest.mark.skipif(ON_CUDA and torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.skipif(
    not ON_CUDA,
    reason="on the CPU this is test_distributed.py's two-processes-match-one test (det-ae, gloo)",
)
def test_two_gpus_train_as_one_gpu_does(synthetic_faces, deterministic_models, tmp_path):
    def train_det_ae(out: Path, *extra: str) -> Path:
        done = subprocess.run(
            [sys.executable, str(ROOT / "cli.py"), "train", "det-ae", "--data", synthetic_faces,
             "--image-size", "16", "--batch-size", "19", "--max-steps", "6", "--latent-dim",
             "4", "-o", "base_channels=4", "-o", "max_channels=8", "--precision", "fp32",
             "--deterministic", "--no-progress", "--out", str(out), *extra],
            env=deterministic_models, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        [run] = out.iterdir()
        return run

    one = train_det_ae(tmp_path / "one", "--device", DEVICE)
    two = train_det_ae(tmp_path / "two", "--nproc", "2", "--device", "auto" if ON_CUDA else "cpu")
    info = zoo.read_info(two / "model.safetensors")
    assert info.training["processes"] == 2 and info.training["device"].startswith(DEVICE)
    weights = [load_file(run / "model.safetensors") for run in (one, two)]
    flat = [torch.cat([w[name].flatten() for name in sorted(w)]) for w in weights]
    assert (flat[0] - flat[1]).norm() / flat[0].norm() < 1e-5


# Item 1: `zoo bench` with every metric that runs offline.
# Catches: a metric that moves data to the CPU and back, a classifier or FID feature extractor
# left on the CPU, throughput timing without synchronisation, peak memory not reported.
def test_zoo_bench_runs_every_offline_metric_on_the_gpu(synthetic_faces, tmp_path):
    run = train(synthetic_faces, tmp_path / "runs")
    classifier, _ = finished_classifier(ClassifierRun(
        ClassifierSettings(
            data=synthetic_faces, image_size=16, backbone="test_resnet", max_steps=4,
            batch_size=16, device=DEVICE, out=str(tmp_path / "runs"), progress=False,
        )
    ).run())  # fmt: skip
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "cli", "bench", str(run / "model.safetensors"), "--device",
         DEVICE, "--data", synthetic_faces, "--fid-features", "classifier", "--classifier",
         str(classifier), "--n", "8", "--no-progress", "--out", str(out)],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    [result] = json.loads(out.read_text())["results"]
    assert set(result["metrics"]) == {"fid", "recon", "edit", "throughput"}
    assert not result["errors"]
    memory = result["metrics"]["throughput"]["peak_memory_mb"]
    if ON_CUDA:  # the CUDA allocator's peak; the CPU has no such counter
        assert min(memory.values()) > 0
    else:
        assert memory is None


# Item 1: one checkpoint gives the same pictures and numbers on the GPU as on the CPU.
# Catches: device-dependent preprocessing, labels in another order on one device, a prior
# sampled on the device instead of from the given generator, fp16/bf16 slipping into eval.
def test_the_gpu_matches_the_cpu_for_one_checkpoint(synthetic_faces, tmp_path):
    run = train(synthetic_faces, tmp_path, precision="fp32")
    exact_fp32()  # TF32 convolutions would differ by about 1e-3 (the module docstring)
    on_cpu = zoo.load(run / "model.safetensors", device="cpu")
    on_device = zoo.load(run / "model.safetensors", device=DEVICE)
    data = checkpoint_data(on_cpu.checkpoint_info, "valid", synthetic_faces)
    x, _ = data.batch(torch.arange(8))
    y = data.labels(on_cpu.checkpoint_info.attr_names)[:8]
    with torch.no_grad():
        pairs = [
            (on_cpu.reconstruct(x, y), on_device.reconstruct(x.to(DEVICE), y.to(DEVICE))),
            (
                on_cpu.generate(8, y, generator=torch.Generator().manual_seed(3)),
                on_device.generate(8, y.to(DEVICE), generator=torch.Generator().manual_seed(3)),
            ),
        ]
    for cpu, device in pairs:
        assert (cpu - device.cpu()).abs().max() <= TOLERANCE


def saved_activation_megabytes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """What one training step keeps for its backward pass, measured on the CPU in fp32."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.loss(x, y)["loss"].backward()
    return sum(seen.values()) / 2**20


# Item 1: peak GPU memory of a real training step (64 px cvae, batch 64), against a bound.
# Catches: activations kept across steps (a leak), memory that grows with the step count, a
# copy of the batch or the model more than the step needs.
def test_peak_gpu_memory_of_training_is_bounded_and_reported(
    synthetic_faces, tmp_path, record_property
):
    if not ON_CUDA:
        pytest.skip("device memory is counted by the CUDA allocator; the CPU has no such counter")
    data = load_data(synthetic_faces, "train", 64, progress=False)
    x, y = data.batch(torch.arange(64))
    model = zoo.create_model("cvae", num_attributes=y.shape[1], image_size=64)
    states = 4 * sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    bound = states + 2 * saved_activation_megabytes(model, x, y) + 512  # workspaces, batches

    def peak_of(steps: int) -> float:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        settings = TrainSettings(
            model="cvae", data=synthetic_faces, max_steps=steps, batch_size=64, device=DEVICE,
            out=str(tmp_path / str(steps)), log_every=3,
        )  # fmt: skip
        Trainer(settings, progress=False).run()
        return torch.cuda.max_memory_allocated() / 2**20

    three, six = peak_of(3), peak_of(6)
    record_property("peak_gpu_memory_mb", round(six, 1))
    print(f"peak GPU memory of 6 cvae steps at batch 64, 64 px: {six:.0f} MB (bound {bound:.0f})")
    assert six < bound
    assert six < 1.1 * three  # no growth with the step count


# Item 3: batches reach the GPU from pinned memory, asynchronously, with the CPU's values.
# Catches: a non_blocking copy from memory that is reused before the copy ends, flips or the
# uint8 -> float conversion differing between devices.
def test_batches_on_the_gpu_equal_the_cpu_batches(synthetic_faces):
    data = load_data(synthetic_faces, "train", 16, progress=False)
    index = torch.arange(16)
    flips = index % 2 == 0
    x_cpu, y_cpu = data.batch(index, "cpu", flip=flips)
    x_device, y_device = data.batch(index, DEVICE, flip=flips)
    assert x_device.device.type == torch.device(DEVICE).type
    assert torch.equal(x_cpu, x_device.cpu()) and torch.equal(y_cpu, y_device.cpu())


# Item 3: autocast on the GPU's device type.
# Catches: autocast built for "cpu" while the model runs on CUDA (the step silently stays fp32).
def test_bf16_autocast_runs_the_convolutions_in_bf16_on_the_device():
    if ON_CUDA and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    model = zoo.create_model("cvae", num_attributes=3, image_size=16, **TINY).to(DEVICE)
    seen = []
    model.encoder.stages[0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    x, y = torch.rand(2, 3, 16, 16, device=DEVICE), torch.ones(2, 3, device=DEVICE)
    with autocast(torch.device(DEVICE), "bf16"):
        model.loss(x, y)
    assert seen == [torch.bfloat16]
