"""Speed of training, measured honestly: ``python -m benchmarks.lab.speed [--data DIR] ...``.

Prints (and with ``--out`` writes as JSON) measurements of the default CVAE at 64 px, batch
64, on this machine (``--only`` picks parts):

- ``pipeline``: end-to-end img/s over a whole epoch of ``zoo train cvae`` (prepared uint8
  cache, flips on tensors, default precision) against a plain PyTorch pipeline with the same
  model: a Dataset that opens each JPEG with PIL and applies PyTorch-VAE's published
  transforms (random flip, centre crop 148, resize 64, to tensor) through a DataLoader, fp32.
- ``peer`` (with ``--peer pytorch-vae --peer-src DIR``): one epoch of PyTorch-VAE's own
  ``ConditionalVAE``, imported unmodified from DIR, in that same published pipeline (Adam
  lr 0.005, batch 64, KL weight 0.00025, 2 DataLoader workers, fp32), then one epoch of
  ``zoo train cvae`` with its defaults, in the same process, and the ratio of the two.
- ``quality`` (with ``--peer-src`` and ``--classifier``): time to quality. The peer trains for
  20 epochs as published (also its per-epoch learning-rate decay, 0.95) and is scored on the
  valid split by zoo's own recon and fid metrics (MSE; FD-attr in the classifier's
  features); then ``zoo train cvae`` with defaults trains one epoch at a time (resumed) and is
  scored after each until it is at least as good on both. Prints both training wall times
  (scoring excluded) and their ratio.
- ``precision``: training-step img/s in fp32 and bf16 autocast, and both loss curves from the
  same initial weights and batches.
- ``probe``: the ``--precision auto`` probe of that step three times, uncached, and how far
  apart its bf16 speed-ups are.
- ``flops``: FLOPs per image of a training step (torch.utils.flop_counter) and the achieved
  GFLOP/s against this machine's measured matmul peak in the same dtype.
- ``compile``: training-step img/s with and without torch.compile, and the compile time.
- ``ddp``: img/s of ``zoo train`` with 1 and 2 processes (torchrun, gloo on CPU).
- ``gpu`` (the default with ``--device cuda``): the train step of every registered model (or
  ``--models``) at ``--batch-sizes`` (64, 256, 1024) in fp32 and bf16, and for the cvae also
  under torch.compile and in channels_last; img/s, peak memory and the share of the GPU's
  bf16 matmul peak measured on the spot. The uint8 images are moved to the GPU once (when
  they fit in half its free memory) and batches are indexed there, so loading never limits.

Nothing here is a pass/fail test: the numbers go in docs/speed.md and the issue notes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from rich.console import Console
from rich.progress import track
from rich.table import Table
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision.transforms import v2

import zoo
from zoo.data import ImageData, load_data, resolve_source
from zoo.data.celeba import IMAGE_DIR, SPLIT_CODES, read_labels
from zoo.device import cpu_flags, cpu_name, keep_freed_memory, pick_device
from zoo.errors import ZooError
from zoo.precision import PrecisionChoice, choose_precision
from zoo.registry import get_model_class
from zoo.step import (
    all_finite,
    make_optimizer,
    measure_step_times,
    median_seconds,
    step_subject,
    train_step,
)
from zoo.train import Trainer, TrainSettings, resume_settings

BATCH = 64
SIZE = 64
console = Console()


def make_model(attributes: int, device: torch.device) -> zoo.GenerativeModel:
    torch.manual_seed(0)
    return zoo.create_model("cvae", num_attributes=attributes, image_size=SIZE).to(device)


def step_function(
    model: zoo.GenerativeModel,
    device: torch.device,
    precision: str,
    *,
    health: bool = False,
    fused_adam: bool | None = None,
    compile_mode: str | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`zoo.step.train_step` of `model` (the trainer's Adam and learning rate) as a function of
    a batch; returns the (device) loss. ``health`` keeps the trainer's finiteness check, its one
    host sync per step; ``fused_adam`` overrides where the trainer fuses Adam."""
    optimizer = make_optimizer(model.parameters(), device, TrainSettings.lr, fused=fused_adam)
    trainable = torch.compile(model, mode=compile_mode) if compile_mode else model
    check = all_finite if health else None

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        outcome = train_step(
            lambda: trainable(x, y), model, optimizer, device, precision, check=check
        )
        return outcome.losses["loss"].detach()

    return step


def default_step(data: ImageData, device: torch.device) -> tuple[Callable[[str], Any], str]:
    """The step of ``zoo train cvae`` with defaults, as a function of the precision, and the
    probe's name for it (the same cache entry as the trainer's, so either probe counts)."""
    model = make_model(len(data.attr_names), device)
    optimizer = make_optimizer(model.parameters(), device, TrainSettings.lr)
    x, y = data.batch(torch.arange(BATCH) % len(data), device)

    def step(precision: str) -> None:
        train_step(lambda: model(x, y), model, optimizer, device, precision)

    return step, step_subject("cvae", model, x)


def auto_precision(data: ImageData, device: torch.device) -> PrecisionChoice:
    """What ``zoo train cvae`` with defaults chooses here."""
    step, subject = default_step(data, device)
    return choose_precision(device, "auto", lambda: measure_step_times(step, device), subject)


def measure_probe(data: ImageData, device: torch.device, repeats: int = 3) -> dict[str, Any]:
    """The precision probe of the default step run `repeats` times, uncached: how far apart
    its bf16 speed-ups are (the probe is meant to agree with itself within 10 %)."""
    step, subject = default_step(data, device)
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        times = measure_step_times(step, device)
        runs.append({"speedup": times.speedup, "seconds": time.perf_counter() - started})
    speedups = [r["speedup"] for r in runs]
    return {
        "subject": subject,
        "runs": runs,
        "spread": (max(speedups) - min(speedups)) / min(speedups),
    }


def median_rate(step: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median images/s of `step` (one batch) after `warmup` calls (oneDNN and compile settle)."""
    return BATCH / median_seconds(step, device, warmup, repeats)


# -- pipeline ------------------------------------------------------------------------------------


class PlainCelebA(Dataset):
    """The textbook pipeline: PIL opens each JPEG, torchvision transforms crop, resize, flip."""

    def __init__(self, root: Path, split: str) -> None:
        labels = read_labels(root)
        rows = [i for i, code in enumerate(labels.partition) if code == SPLIT_CODES[split]]
        self.paths = [root / IMAGE_DIR / labels.filenames[i] for i in rows]
        self.attrs = torch.from_numpy(labels.signs[rows] > 0).float()
        self.transform = v2.Compose(  # PyTorch-VAE's published list, in its order
            [
                v2.RandomHorizontalFlip(),
                v2.CenterCrop(148),
                v2.Resize(SIZE, antialias=True),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB")), self.attrs[index]


def plain_epoch(root: Path, device: torch.device, workers: int) -> float:
    dataset = PlainCelebA(root, "train")
    loader = DataLoader(
        dataset, batch_size=BATCH, shuffle=True, num_workers=workers, drop_last=False
    )
    step = step_function(make_model(dataset.attrs.shape[1], device), device, "fp32")
    start, images = time.perf_counter(), 0
    for x, y in loader:
        step(x.to(device), y.to(device))
        images += x.shape[0]
    return images / (time.perf_counter() - start)


PEERS = {"pytorch-vae": "https://github.com/AntixK/PyTorch-VAE"}
PEER_WORKERS = 2


def peer_model_class(name: str, source: Path | None) -> type[torch.nn.Module]:
    """PyTorch-VAE's ``ConditionalVAE``, imported from its own folder (never copied into zoo)."""
    model_file = None if source is None else source / "models" / "cvae.py"
    if model_file is None or not model_file.is_file():
        where = "no --peer-src given" if source is None else f"{model_file} does not exist"
        raise ZooError(
            f"{where}; clone {PEERS[name]} and pass its folder as --peer-src "
            f"(it needs models/base.py, models/types_.py and models/cvae.py)"
        )
    # the peer imports itself as the top-level package `models`: give it that name only while
    # importing, so neither another `models` on the path nor an earlier peer gets in the way
    shadowed = {key: sys.modules.pop(key) for key in list(sys.modules) if _is_models(key)}
    sys.path.insert(0, str(source.resolve()))
    try:
        return importlib.import_module("models.cvae").ConditionalVAE
    except Exception as error:  # its code, its failure: one line, not a traceback
        raise ZooError(f"could not import ConditionalVAE from {model_file}: {error}") from None
    finally:
        sys.path.remove(str(source.resolve()))
        for key in [key for key in sys.modules if _is_models(key)]:
            del sys.modules[key]
        sys.modules.update(shadowed)


def _is_models(module_name: str) -> bool:
    return module_name == "models" or module_name.startswith("models.")


def peer_epoch(root: Path, device: torch.device, model_class: type[torch.nn.Module]) -> float:
    """One epoch of the peer as published: its model, transforms, optimizer and loss."""
    dataset = PlainCelebA(root, "train")
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=PEER_WORKERS)
    torch.manual_seed(0)
    model = model_class(in_channels=3, num_classes=dataset.attrs.shape[1], latent_dim=128)
    model = model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.005, weight_decay=0.0)
    start, images = time.perf_counter(), 0
    for x, y in loader:
        outputs = model(x.to(device), labels=y.to(device))
        loss = model.loss_function(*outputs, M_N=0.00025)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        images += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def measure_peer(
    data: str | None, device: torch.device, name: str, source: Path | None
) -> dict[str, Any]:
    """The peer as published, then `zoo train cvae`, then the peer again with the allocator
    setting zoo's trainer applied (glibc's thresholds are process-wide and stay set): how much
    of the ratio that setting alone explains."""
    model_class = peer_model_class(name, source)
    _, root = resolve_source(data)
    peer = peer_epoch(root, device, model_class)
    ours, precision = ours_epoch(data, str(device))
    allocator = keep_freed_memory()
    return {
        "peer": name,
        "peer_img_per_s": peer,
        "peer_workers": PEER_WORKERS,
        "ours_img_per_s": ours,
        "ours_precision": precision,
        "speedup_vs_peer": ours / peer,
        "peer_with_zoo_allocator_img_per_s": peer_epoch(root, device, model_class)
        if allocator
        else None,
    }


# -- time to quality ------------------------------------------------------------------------------

PEER_EPOCHS = 20
PEER_LR_GAMMA = 0.95  # the published cvae.yaml's scheduler_gamma, an ExponentialLR per epoch


class PeerAsZooModel(zoo.GenerativeModel):
    """The peer's trained ConditionalVAE behind zoo's interface, so zoo's own recon and fid
    metrics score it exactly as they score a zoo model. Its Tanh output is clamped to the
    [0, 1] its training targets lie in (PyTorch-VAE feeds ToTensor images, not [-1, 1])."""

    conditional = True

    def __init__(self, peer: torch.nn.Module, attributes: int) -> None:
        super().__init__(zoo.ModelConfig(num_attributes=attributes, latent_dim=peer.latent_dim))
        self.peer = peer

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> zoo.Posterior:
        assert y is not None
        size = self.peer.img_size
        plane = self.peer.embed_class(y).view(-1, 1, size, size)
        mean, logvar = self.peer.encode(torch.cat([self.peer.embed_data(x), plane], dim=1))
        return zoo.Posterior(mean, logvar)

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        assert y is not None
        return self.peer.decode(torch.cat([z, y.to(z.dtype)], dim=1)).clamp(0, 1)

    def decode_logits(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return torch.logit(self.decode(z, y), eps=1e-6)


def train_peer(
    root: Path, device: torch.device, model_class: type[torch.nn.Module]
) -> tuple[torch.nn.Module, float]:
    """`PEER_EPOCHS` epochs of the peer as published (its transforms, Adam, KL weight and
    per-epoch learning-rate decay); returns the model and the wall seconds of training."""
    dataset = PlainCelebA(root, "train")
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=PEER_WORKERS)
    torch.manual_seed(0)
    model = model_class(in_channels=3, num_classes=dataset.attrs.shape[1], latent_dim=128)
    model = model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.005, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=PEER_LR_GAMMA)
    start = time.perf_counter()
    for _ in track(range(PEER_EPOCHS), description=f"peer, {PEER_EPOCHS} epochs"):
        for x, y in loader:
            outputs = model(x.to(device), labels=y.to(device))
            loss = model.loss_function(*outputs, M_N=0.00025)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return model.eval(), time.perf_counter() - start


def quality_of(
    checkpoint: Path,
    classifier: Path,
    device: torch.device,
    model: zoo.GenerativeModel | None = None,
) -> dict[str, float]:
    """MSE and FD-attr on the checkpoint's valid split, by zoo's recon and fid metrics, with
    the project's classifier; `model` stands in for the checkpoint's (the peer) with its data,
    attributes and preprocessing."""
    from benchmarks.fid import FrechetDistance
    from benchmarks.metric import BenchContext, BenchSettings, Memo
    from benchmarks.recon import Reconstruction
    from benchmarks.runner import benchmark_split

    settings = BenchSettings(
        split="valid", device=str(device), classifiers=[str(classifier)], progress=False
    )
    memo = Memo()
    info = zoo.read_info(checkpoint)
    context = BenchContext(
        model=(model or zoo.load(checkpoint, device=device)).to(device).eval(),
        checkpoint=checkpoint,
        info=info,
        data=benchmark_split(memo, info, settings),
        settings=settings,
        device=device,
        metric_options={"fid": FrechetDistance.Options(features="classifier")},
        memo=memo,
    )
    return {
        "mse": Reconstruction().compute(context)["mse"],
        "fd_attr": FrechetDistance().compute(context)["value"],
    }


def measure_time_to_quality(
    data: str | None,
    device: torch.device,
    name: str,
    source: Path | None,
    classifier: Path | None,
    max_epochs: int,
) -> dict[str, Any]:
    """The peer for `PEER_EPOCHS` epochs, scored; then ``zoo train cvae`` with defaults one
    epoch at a time (resumed), scored after each, until it is at least as good on both MSE
    and FD-attr (or `max_epochs`). Wall times count training only, not the scoring."""
    if classifier is None or not classifier.is_file():
        raise ZooError(
            f"time-to-quality scores FD-attr with the project's attribute classifier: "
            f"{classifier or 'no --classifier given'} is not a file; train one with "
            "`zoo train-classifier --data DIR` and pass it as --classifier"
        )
    model_class = peer_model_class(name, source)
    _, root = resolve_source(data)
    peer, peer_seconds = train_peer(root, device, model_class)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            TrainSettings(model="cvae", data=data, epochs=1, device=str(device), out=out),
            progress=False,
        )
        peer_quality: dict[str, float] = {}
        history = []
        for epoch in range(1, max_epochs + 1):
            if epoch > 1:  # one more epoch of the same run, as `zoo train --resume --epochs` does
                settings = resume_settings(trainer.run_dir, epochs=epoch)
                trainer = Trainer(settings, resume=trainer.run_dir, progress=False)
            trainer.run()
            checkpoint = trainer.run_dir / trainer.weights_file
            if not peer_quality:
                peer_model = PeerAsZooModel(peer, len(trainer.data.attr_names))
                peer_quality = quality_of(checkpoint, classifier, device, peer_model)
            quality = quality_of(checkpoint, classifier, device)
            history.append({"epoch": epoch, "train_seconds": trainer.wall_time, **quality})
            console.print(f"zoo cvae, epoch {epoch}: {quality} (the peer: {peer_quality})")
            if all(quality[key] <= peer_quality[key] for key in quality):
                break
    reached = all(history[-1][key] <= peer_quality[key] for key in peer_quality)
    return {
        "peer": name,
        "peer_epochs": PEER_EPOCHS,
        "peer_train_seconds": peer_seconds,
        "peer_quality": peer_quality,
        "ours": history,
        "ours_precision": trainer.precision,
        "reached": reached,
        "ratio": peer_seconds / history[-1]["train_seconds"] if reached else None,
    }


def ours_epoch(data: str | None, device: str) -> tuple[float, str]:
    with tempfile.TemporaryDirectory() as out:
        settings = TrainSettings(model="cvae", data=data, epochs=1, device=device, out=out)
        trainer = Trainer(settings, progress=False)
        summary = trainer.run().summary
    return summary["images_per_s"], summary["precision"]


def measure_pipeline(data: str | None, device: torch.device) -> dict[str, Any]:
    _, root = resolve_source(data)
    ours, precision = ours_epoch(data, str(device))
    plain = {workers: plain_epoch(root, device, workers) for workers in (0, 2)}
    best_workers = max(plain, key=plain.get)
    return {
        "ours_img_per_s": ours,
        "ours_precision": precision,
        "plain_img_per_s": plain,
        "speedup_vs_best_plain": ours / plain[best_workers],
        "best_plain_workers": best_workers,
    }


# -- precision, flops, compile -------------------------------------------------------------------


def batches(data: ImageData, device: torch.device, count: int) -> list[tuple[torch.Tensor, ...]]:
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    return [
        data.batch(order[(i * BATCH) % len(data) :][:BATCH], device, flip=False)
        for i in range(count)
    ]


def measure_precision(data: ImageData, device: torch.device, steps: int) -> dict[str, Any]:
    fixed = batches(data, device, 1)[0]
    curve_batches = batches(data, device, steps)
    result: dict[str, Any] = {}
    for precision in ("fp32", "bf16"):
        timed = step_function(make_model(len(data.attr_names), device), device, precision)
        result[f"{precision}_img_per_s"] = median_rate(
            lambda timed=timed: timed(*fixed), device, 8, 10
        )
        fresh = step_function(make_model(len(data.attr_names), device), device, precision)
        torch.manual_seed(1)  # the same reparameterisation noise for both curves
        result[f"{precision}_losses"] = [fresh(*batch).item() for batch in curve_batches]
    result["bf16_speedup"] = result["bf16_img_per_s"] / result["fp32_img_per_s"]
    return result


def matmul_peak(device: torch.device, dtype: torch.dtype, side: int = 2048) -> float:
    a = torch.randn(side, side, device=device, dtype=dtype)
    b = torch.randn(side, side, device=device, dtype=dtype)
    seconds = []
    for _ in range(6):
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return 2 * side**3 / statistics.median(seconds[2:]) / 1e9


def measure_flops(data: ImageData, device: torch.device, rates: dict[str, Any]) -> dict[str, Any]:
    x, y = batches(data, device, 1)[0]
    model = make_model(len(data.attr_names), device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x, y)["loss"].backward()
    per_image = counter.get_total_flops() / BATCH
    result: dict[str, Any] = {"train_step_gflop_per_image": per_image / 1e9}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        peak = matmul_peak(device, dtype)
        achieved = per_image * rates[f"{precision}_img_per_s"] / 1e9
        result[precision] = {
            "matmul_peak_gflops": peak,
            "achieved_gflops": achieved,
            "fraction_of_peak": achieved / peak,
        }
    return result


# -- step variants and profile -------------------------------------------------------------------


@contextlib.contextmanager
def group_norm_in_fp32() -> Iterator[None]:
    """Run every GroupNorm in fp32 (cast in and back out), to time it against bf16."""
    original = torch.nn.GroupNorm.forward

    def forward(self: torch.nn.GroupNorm, h: torch.Tensor) -> torch.Tensor:
        return original(self, h.float()).to(h.dtype)

    torch.nn.GroupNorm.forward = forward
    try:
        yield
    finally:
        torch.nn.GroupNorm.forward = original


def variant_step(
    data: ImageData,
    device: torch.device,
    precision: str,
    *,
    channels_last: bool = False,
    health: bool = True,
    **options: Any,
) -> Callable[[], torch.Tensor]:
    """The trainer's step (autocast, backward, finiteness check, Adam) on one fixed batch,
    with one thing changed (see `step_function` for the other options)."""
    x, y = batches(data, device, 1)[0]
    model = make_model(len(data.attr_names), device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    step = step_function(model, device, precision, health=health, **options)
    return lambda: step(x, y)


def interleaved_rates(
    steps: dict[str, Callable[[], Any]], device: torch.device, warmup: int, rounds: int
) -> dict[str, float]:
    """Median img/s of each step, timed in turns (one call of each per round), so a drift in
    the machine's speed during the run reaches every variant alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            seconds[name].append(median_seconds(step, device, 0, 1))
    return {name: BATCH / statistics.median(times) for name, times in seconds.items()}


def measure_variants(data: ImageData, device: torch.device, precision: str) -> dict[str, Any]:
    """Train-step img/s of the default step and of each candidate change, timed in turns;
    then other thread counts, one at a time (threads left spinning would slow the others)."""
    threads = torch.get_num_threads()
    result: dict[str, Any] = {"precision": precision, "threads": threads}
    candidates = {
        "default": variant_step(data, device, precision),
        "channels_last": variant_step(data, device, precision, channels_last=True),
        "no finiteness check": variant_step(data, device, precision, health=False),
        "for-loop Adam (torch's CPU default)": variant_step(
            data, device, precision, fused_adam=False
        ),
    }
    fp32_norm_step = variant_step(data, device, precision)

    def fp32_norm() -> None:
        with group_norm_in_fp32():
            fp32_norm_step()

    candidates["GroupNorm in fp32"] = fp32_norm
    result.update(interleaved_rates(candidates, device, 5, 15))
    for count in sorted({1, 2 * threads}):
        torch.set_num_threads(count)
        try:
            result[f"{count} threads"] = median_rate(
                variant_step(data, device, precision), device, 5, 15
            )
        finally:
            torch.set_num_threads(threads)
    return result


def curve_change(data: ImageData, device: torch.device, steps: int, **options: Any) -> float:
    """Largest relative difference between fp32 loss curves of the default step and of the
    step with ``options``, over ``steps`` batches from the same weights and noise: whether a
    faster variant still trains the same model (bf16 curves differ by chaos alone)."""
    curves = []
    for variant in ({}, options):
        step = step_function(make_model(len(data.attr_names), device), device, "fp32", **variant)
        torch.manual_seed(1)
        curves.append([step(*batch).item() for batch in batches(data, device, steps)])
    return max(abs(a - b) / abs(a) for a, b in zip(*curves, strict=True))


def measure_gpu(
    data: ImageData, device: torch.device, models: list[str], batch_sizes: list[int]
) -> dict[str, Any]:
    """The GPU table: train-step img/s, peak memory and share of the bf16 matmul peak for each
    model, batch size and precision (and compile / channels_last for the cvae)."""
    nbytes = data.images.numel()
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else nbytes * 2
    images = data.images.to(device) if nbytes * 2 <= free else data.images
    attrs = data.attrs.to(device)
    peak = matmul_peak(device, torch.bfloat16)
    rows = []
    for name in models:
        model_class = get_model_class(name)
        flops = None
        for batch in batch_sizes:
            index = torch.randint(len(data), (batch,), generator=torch.Generator().manual_seed(0))
            x = images[index.to(images.device)].to(device).float().div_(255)
            y = attrs[index.to(device)]
            variants = [("eager", {}, False)]
            if name == "cvae":
                variants += [
                    ("compile", {"compile_mode": "default"}, False),
                    ("channels_last", {}, True),
                ]
            for precision in ("fp32", "bf16"):
                for label, options, channels_last in variants:
                    row: dict[str, Any] = {
                        "model": name, "batch": batch, "precision": precision, "variant": label,
                    }  # fmt: skip
                    torch.manual_seed(0)
                    model = zoo.create_model(name, **model_class.data_config(data)).to(device)
                    inputs = (x, y)
                    if channels_last:
                        model = model.to(memory_format=torch.channels_last)
                        inputs = (x.contiguous(memory_format=torch.channels_last), y)
                    if flops is None:
                        counter = FlopCounterMode(display=False)
                        with counter:
                            model(x[:8], y[:8])["loss"].backward()
                        flops = counter.get_total_flops() / 8
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    try:
                        step = step_function(model, device, precision, health=True, **options)
                        seconds = median_seconds(lambda s=step, i=inputs: s(*i), device, 3, 10)
                        rate = batch / seconds
                    except torch.cuda.OutOfMemoryError:
                        row["error"] = "out of memory"
                    else:
                        row["img_per_s"] = rate
                        row["share_of_bf16_peak"] = flops * rate / 1e9 / peak
                        if device.type == "cuda":
                            row["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
                    rows.append(row)
                    del model
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    on_device = images.device.type == device.type
    return {"bf16_matmul_peak_gflops": peak, "data_on_device": on_device, "rows": rows}


def measure_layers(device: torch.device, precision: str, attributes: int) -> list[dict[str, Any]]:
    """Forward and backward time of each convolution of the cvae at batch 64, with its input
    and weights contiguous and in channels_last: which layers the memory format helps."""
    model = make_model(attributes, device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    inputs: dict[str, tuple[torch.nn.Module, torch.Size]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: Any) -> None:
            inputs.setdefault(name, (module, args[0].shape))

        return hook

    hooks = [
        module.register_forward_hook(record(name))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Conv2d | torch.nn.ConvTranspose2d)
    ]
    x = torch.rand(BATCH, 3, SIZE, SIZE, device=device)
    model.loss(x, (torch.rand(BATCH, attributes, device=device) < 0.5).float())
    for hook in hooks:
        hook.remove()
    rows = []
    for name, (module, shape) in inputs.items():
        row: dict[str, Any] = {"layer": name, "kind": type(module).__name__, "input": list(shape)}
        for layout in (torch.contiguous_format, torch.channels_last):
            layer = module.to(dtype=dtype, memory_format=layout)
            h = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=layout)
            h.requires_grad_()

            def step(layer: torch.nn.Module = layer, h: torch.Tensor = h) -> None:
                layer(h).float().sum().backward()

            row[str(layout).removeprefix("torch.")] = median_seconds(step, device, 2, 5)
        rows.append(row)
    return rows


def measure_epoch_overheads(data_arg: str | None, device: torch.device) -> dict[str, float]:
    """Seconds the trainer spends once per epoch outside the steps: the sample grid and the
    checkpoint save (fastest of three each)."""
    with tempfile.TemporaryDirectory() as out:
        settings = TrainSettings(model="cvae", data=data_arg, device=str(device), out=out)
        trainer = Trainer(settings, progress=False)
        result = {}
        for name, work in (("sample_grid_s", trainer.write_samples), ("save_s", trainer.save)):
            seconds = []
            for _ in range(3):
                start = time.perf_counter()
                work()
                seconds.append(time.perf_counter() - start)
            result[name] = min(seconds)
    return result


def measure_profile(data: ImageData, device: torch.device, precision: str) -> dict[str, Any]:
    """The default train step's top operators by self time (torch.profiler), per step."""
    step = variant_step(data, device, precision)
    for _ in range(5):
        step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    steps = 10
    with torch.profiler.profile(activities=activities, record_shapes=True) as profiler:
        for _ in range(steps):
            step()

    def by_self_time(events: Any) -> list[Any]:
        return sorted(events, key=lambda event: event.self_cpu_time_total, reverse=True)

    events = by_self_time(profiler.key_averages())
    total = sum(event.self_cpu_time_total for event in events)

    def row(event: Any, shapes: bool = False) -> dict[str, Any]:
        return {
            "op": event.key,
            "shapes": str(event.input_shapes[:2]) if shapes else "",
            "self_ms_per_step": event.self_cpu_time_total / 1e3 / steps,
            "share": event.self_cpu_time_total / total,
            "calls_per_step": event.count / steps,
        }

    by_shape = by_self_time(profiler.key_averages(group_by_input_shape=True))
    convolutions = [event for event in by_shape if "convolution" in event.key]
    return {
        "precision": precision,
        "top_ops": [row(event) for event in events[:12]],
        "top_convolutions": [row(event, shapes=True) for event in convolutions[:8]],
    }


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def measure_compile(data: ImageData, device: torch.device, precision: str) -> dict[str, Any]:
    """torch.compile's steady rate, its compile time, and the rate over a default `zoo train`
    run on this data (10 epochs) once the compile time is paid."""
    run_steps = TrainSettings(model="cvae").epochs * -(-len(data) // BATCH)
    eager = median_rate(variant_step(data, device, precision), device, 5, 15)
    result: dict[str, Any] = {"precision": precision, "eager_img_per_s": eager}
    for mode in COMPILE_MODES:
        step = variant_step(data, device, precision, compile_mode=mode)
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
        rate = median_rate(step, device, 5, 15)
        result[mode] = {
            "compile_seconds": seconds,
            "img_per_s": rate,
            "run_steps": run_steps,
            "amortised_img_per_s": run_steps * BATCH / (seconds + run_steps * BATCH / rate),
        }
    return result


# -- ddp -----------------------------------------------------------------------------------------


def measure_ddp(data: str | None, steps: int) -> dict[str, Any]:
    result = {}
    for processes in (1, 2):
        with tempfile.TemporaryDirectory() as out:
            command = [
                sys.executable,
                "-m",
                "cli",
                "train",
                "cvae",
                "--max-steps",
                str(steps),
                "--out",
                out,
                "--no-progress",
                "--nproc",
                str(processes),
            ]
            if data:
                command += ["--data", str(Path(data).resolve()) if Path(data).exists() else data]
            # run from the empty run folder: `python -m` puts the working directory on sys.path
            subprocess.run(command, check=True, capture_output=True, text=True, cwd=out)
            [checkpoint] = Path(out).glob("*/model.safetensors")
            training = zoo.read_info(checkpoint).training
            result[f"{processes}_process_img_per_s"] = training["images_per_s"]
            result[f"{processes}_process_precision"] = training["precision"]
    return result


# -- report --------------------------------------------------------------------------------------


def cpu_features() -> list[str]:
    """The CPU flags that decide bf16 speed (native bf16 dot products, AMX tiles)."""
    flags = cpu_flags()
    return [f for f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2") if f in flags]


PARTS = (
    "pipeline", "precision", "probe", "flops", "compile", "variants", "profile", "layers", "ddp"
)  # fmt: skip
GPU_BATCH_SIZES = (64, 256, 1024)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    try:
        return run(argv)
    except ZooError as error:
        console.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        raise SystemExit(1) from None


def run(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="CelebA folder (default: zoo's resolution)")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--only", default=None, help=f"comma-separated parts of {','.join(PARTS)},peer,quality"
    )
    parser.add_argument("--peer", choices=sorted(PEERS), default=None, help="compare with a peer")
    parser.add_argument("--peer-src", type=Path, default=None, help="the peer's source folder")
    parser.add_argument(
        "--classifier", type=Path, default=None, help="quality part: the FD-attr classifier"
    )
    parser.add_argument(
        "--max-epochs", type=int, default=20, help="quality part: zoo's epochs at most"
    )
    parser.add_argument("--curve-steps", type=int, default=60)
    parser.add_argument("--ddp-steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    parser.add_argument("--models", default=None, help="gpu part: comma-separated model names")
    parser.add_argument(
        "--batch-sizes", default=",".join(map(str, GPU_BATCH_SIZES)), help="gpu part: batch sizes"
    )
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    default_parts = {"gpu"} if device.type == "cuda" else set(PARTS)
    parts = set(args.only.split(",")) if args.only else {"peer"} if args.peer else default_parts
    data = load_data(args.data, "train", SIZE)
    results: dict[str, Any] = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "cpu_features": cpu_features(),
        "auto_precision": auto_precision(data, device).precision,
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "data": data.root,
        "data_images": len(data),
        "batch_size": BATCH,
        "image_size": SIZE,
    }
    if "peer" in parts:
        peer = args.peer or "pytorch-vae"
        results["peer"] = measure_peer(args.data, device, peer, args.peer_src)
    keep_freed_memory()  # every other part times steps the way `zoo train` runs them
    if "pipeline" in parts:
        results["pipeline"] = measure_pipeline(args.data, device)
    if parts & {"precision", "flops"}:
        results["precision"] = measure_precision(data, device, args.curve_steps)
    if "flops" in parts:
        results["flops"] = measure_flops(data, device, results["precision"])
    auto = results["auto_precision"]
    if "compile" in parts:
        results["compile"] = measure_compile(data, device, auto)
    if "variants" in parts:
        results["variants"] = measure_variants(data, device, auto)
        results["curve_change"] = {
            "steps": args.curve_steps,
            "fused vs for-loop Adam": curve_change(
                data, device, args.curve_steps, fused_adam=False
            ),
        }
        results["overheads"] = measure_epoch_overheads(args.data, device)
    if "profile" in parts:
        results["profile"] = measure_profile(data, device, auto)
    if "layers" in parts:
        results["layers"] = measure_layers(device, auto, len(data.attr_names))
    if "ddp" in parts:
        results["ddp"] = measure_ddp(args.data, args.ddp_steps)
    if "probe" in parts:
        results["probe"] = measure_probe(data, device)
    if "quality" in parts:
        peer = args.peer or "pytorch-vae"
        results["quality"] = measure_time_to_quality(
            args.data, device, peer, args.peer_src, args.classifier, args.max_epochs
        )
    if "gpu" in parts:
        models = args.models.split(",") if args.models else zoo.list_models()
        sizes = [int(size) for size in args.batch_sizes.split(",")]
        results["gpu"] = measure_gpu(data, device, models, sizes)
    report(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def report(results: dict[str, Any]) -> None:
    table = Table(
        title=f"zoo speed: cvae {SIZE}px batch {BATCH} on {results['device']}, "
        f"{results['cpu']} ({' '.join(results['cpu_features']) or 'no bf16/AMX flags'}), "
        f"{results['threads']} threads, torch {results['torch']}, auto precision "
        f"{results['auto_precision']}"
    )
    table.add_column("measurement")
    table.add_column("value", justify="right")
    rows: list[tuple[str, str]] = []
    if "peer" in results:
        p = results["peer"]
        rows += [
            (
                f"{p['peer']} ConditionalVAE epoch (fp32, {p['peer_workers']} workers)",
                f"{p['peer_img_per_s']:.0f} img/s",
            ),
            (f"zoo train cvae epoch ({p['ours_precision']})", f"{p['ours_img_per_s']:.0f} img/s"),
            ("zoo / peer", f"{p['speedup_vs_peer']:.2f}x"),
        ]
        if p["peer_with_zoo_allocator_img_per_s"] is not None:
            rows.append(
                (
                    f"{p['peer']} again, with zoo's allocator setting",
                    f"{p['peer_with_zoo_allocator_img_per_s']:.0f} img/s",
                )
            )
    if "quality" in results:
        q = results["quality"]
        last = q["ours"][-1]
        rows += [
            (
                f"{q['peer']} ConditionalVAE, {q['peer_epochs']} epochs: train s, MSE, FD-attr",
                f"{q['peer_train_seconds']:.0f} s, {q['peer_quality']['mse']:.5f}, "
                f"{q['peer_quality']['fd_attr']:.2f}",
            ),
            (
                f"zoo train cvae ({q['ours_precision']}), {last['epoch']} epochs: the same",
                f"{last['train_seconds']:.0f} s, {last['mse']:.5f}, {last['fd_attr']:.2f}",
            ),
            (
                "time to quality, peer / zoo",
                f"{q['ratio']:.2f}x" if q["reached"] else "zoo did not reach the peer",
            ),
        ]
    if "probe" in results:
        p = results["probe"]
        rows += [
            (
                f"precision probe {i + 1} of {p['subject']}",
                f"bf16 {r['speedup']:.2f}x in {r['seconds']:.1f} s",
            )
            for i, r in enumerate(p["runs"])
        ]
        rows.append(("probes' spread (max - min) / min", f"{100 * p['spread']:.1f} %"))
    if "pipeline" in results:
        p = results["pipeline"]
        rows += [
            (f"zoo train epoch ({p['ours_precision']})", f"{p['ours_img_per_s']:.0f} img/s"),
            *[
                (f"plain JPEG DataLoader, {w} workers", f"{r:.0f} img/s")
                for w, r in p["plain_img_per_s"].items()
            ],
            ("speed-up vs best plain", f"{p['speedup_vs_best_plain']:.2f}x"),
        ]
    if "precision" in results:
        p = results["precision"]
        rows += [
            ("train step fp32", f"{p['fp32_img_per_s']:.0f} img/s"),
            ("train step bf16", f"{p['bf16_img_per_s']:.0f} img/s"),
            ("bf16 speed-up", f"{p['bf16_speedup']:.2f}x"),
        ]
        for index in range(0, len(p["fp32_losses"]), max(1, len(p["fp32_losses"]) // 6)):
            rows.append(
                (
                    f"loss at step {index + 1} fp32 / bf16",
                    f"{p['fp32_losses'][index]:.1f} / {p['bf16_losses'][index]:.1f}",
                )
            )
    if "flops" in results:
        f = results["flops"]
        rows.append(("train step GFLOP per image", f"{f['train_step_gflop_per_image']:.3f}"))
        for precision in ("fp32", "bf16"):
            rows.append(
                (
                    f"{precision} achieved / matmul peak GFLOP/s",
                    f"{f[precision]['achieved_gflops']:.0f} / "
                    f"{f[precision]['matmul_peak_gflops']:.0f} "
                    f"({100 * f[precision]['fraction_of_peak']:.0f}%)",
                )
            )
    if "compile" in results:
        c = results["compile"]
        rows.append((f"eager step ({c['precision']})", f"{c['eager_img_per_s']:.0f} img/s"))
        for mode in COMPILE_MODES:
            m = c[mode]
            rows.append(
                (
                    f"torch.compile mode {mode}: step / over a {m['run_steps']}-step run",
                    f"{m['img_per_s']:.0f} / {m['amortised_img_per_s']:.0f} img/s "
                    f"(compiles in {m['compile_seconds']:.0f} s)",
                )
            )
    if "variants" in results:
        v = results["variants"]
        base = v["default"]
        for name, rate in v.items():
            if isinstance(rate, float):
                rows.append(
                    (
                        f"train step ({v['precision']}): {name}",
                        f"{rate:.0f} img/s ({rate / base:.2f}x)",
                    )
                )
    if "curve_change" in results:
        c = results["curve_change"]
        rows.append(
            (
                f"fp32 loss curve, fused vs for-loop Adam, {c['steps']} steps",
                f"max {100 * c['fused vs for-loop Adam']:.3f}% apart",
            )
        )
    if "overheads" in results:
        o = results["overheads"]
        epoch = results["data_images"] / results["variants"]["default"]
        share = (o["sample_grid_s"] + o["save_s"]) / epoch
        rows.append(
            (
                "once per epoch: sample grid + checkpoint save",
                f"{o['sample_grid_s']:.2f} s + {o['save_s']:.2f} s "
                f"({100 * share:.1f}% of an epoch)",
            )
        )
    if "ddp" in results:
        d = results["ddp"]
        rows += [
            ("zoo train, 1 process", f"{d['1_process_img_per_s']:.0f} img/s"),
            ("zoo train, 2 processes", f"{d['2_process_img_per_s']:.0f} img/s"),
        ]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if "profile" in results:
        profile = Table(
            title=f"top ops of the default train step ({results['profile']['precision']})"
        )
        for column in ("op", "ms per step", "share", "calls per step"):
            profile.add_column(column, justify="left" if column == "op" else "right")
        ops = results["profile"]["top_ops"] + results["profile"]["top_convolutions"]
        for op in ops:
            profile.add_row(
                f"{op['op']} {op['shapes']}".strip(),
                f"{op['self_ms_per_step']:.1f}",
                f"{100 * op['share']:.0f}%",
                f"{op['calls_per_step']:.0f}",
            )
        console.print(profile)
    if "layers" in results:
        layers = Table(title=f"convolutions, forward + backward at batch {BATCH}")
        for column in ("layer", "input", "contiguous ms", "channels_last ms"):
            layers.add_column(column, justify="left" if column == "layer" else "right")
        for row in results["layers"]:
            layers.add_row(
                f"{row['layer']} ({row['kind']})",
                "x".join(map(str, row["input"])),
                f"{1e3 * row['contiguous_format']:.1f}",
                f"{1e3 * row['channels_last']:.1f}",
            )
        console.print(layers)
    if "gpu" in results:
        g = results["gpu"]
        gpu = Table(
            title=f"train step on {results.get('gpu_name') or results['device']}: bf16 matmul "
            f"peak {g['bf16_matmul_peak_gflops']:.0f} GFLOP/s, images "
            f"{'on the device' if g['data_on_device'] else 'copied from the host'}"
        )
        for column in ("model", "batch", "precision", "variant", "img/s", "peak MB", "% bf16 peak"):
            gpu.add_column(column, justify="left" if column == "model" else "right")
        for row in g["rows"]:
            measured = "img_per_s" in row
            gpu.add_row(
                row["model"],
                str(row["batch"]),
                row["precision"],
                row["variant"],
                f"{row['img_per_s']:.0f}" if measured else row["error"],
                f"{row['peak_memory_mb']:.0f}" if "peak_memory_mb" in row else "-",
                f"{100 * row['share_of_bf16_peak']:.1f}" if measured else "-",
            )
        console.print(gpu)


if __name__ == "__main__":
    main()
