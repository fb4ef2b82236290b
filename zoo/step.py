"""The one training step: what `zoo train` runs, what the throughput metric times as
"train img/s", what the speed lab measures and what the precision probe compares.

A step is: the losses under autocast, the backward of the loss (scaled, for DDP's average),
the finiteness check of the loss and the gradient norm (the loop's one host sync: a NaN must be
caught at the step it appears, before the optimizer writes it into the weights), then the
optimizer step. Adam is fused where torch has the kernel: one kernel instead of about ten small
ops per parameter.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch

from zoo.model import ModelConfig
from zoo.models.cvae import CVAE
from zoo.precision import PRECISIONS, StepTimes, autocast

FUSED_ADAM_DEVICES = ("cpu", "cuda")  # where torch has a fused Adam kernel
PROBE_REPEATS = 3

Losses = dict[str, torch.Tensor]


class StepOutcome(NamedTuple):
    """What a step did: the losses, the (loss, gradient norm) it checked, and whether the
    optimizer stepped (False: non-finite, the gradients were dropped)."""

    losses: Losses
    health: torch.Tensor | None
    stepped: bool


def all_finite(health: torch.Tensor) -> bool:
    """The default check of one process: loss and gradient norm are finite."""
    return bool(torch.isfinite(health).all())


def make_optimizer(
    parameters: Iterable[torch.nn.Parameter],
    device: torch.device,
    lr: float,
    *,
    fused: bool | None = None,
) -> torch.optim.Adam:
    """The trainers' Adam: fused where torch has the kernel unless `fused` says otherwise."""
    if fused is None:
        fused = device.type in FUSED_ADAM_DEVICES
    return torch.optim.Adam(parameters, lr=lr, fused=fused or None)


def train_step(
    losses_of: Callable[[], Losses],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    precision: str,
    *,
    scale: float = 1.0,
    check: Callable[[torch.Tensor], bool] | None = all_finite,
) -> StepOutcome:
    """One optimizer step of `model` on the losses `losses_of()` computes.

    `check` gets the (loss, gradient norm) pair and says whether to step; the trainer passes
    one that also agrees across DDP ranks. ``check=None`` skips it (the speed lab measures what
    the check costs).
    """
    with autocast(device, precision):
        losses = losses_of()
    optimizer.zero_grad(set_to_none=True)
    (losses["loss"] * scale).backward()
    health = None
    if check is not None:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        health = torch.stack(
            [losses["loss"].detach().float(), torch.nn.utils.get_total_norm(grads)]
        )
        if not check(health):
            optimizer.zero_grad(set_to_none=True)
            return StepOutcome(losses, health, False)
    optimizer.step()
    return StepOutcome(losses, health, True)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def median_seconds(
    call: Callable[[], Any], device: torch.device, warmup: int, repeats: int
) -> float:
    """Median wall seconds of one `call` after `warmup` calls (kernels and allocator settle),
    with the device synchronised around each timing."""
    for _ in range(warmup):
        call()
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def measure_step_times(device: torch.device) -> StepTimes:
    """The precision probe: the training step of a 32 px CVAE at batch 16 in each precision.

    The fastest of three interleaved steps each, after one warm-up, in CPU time on one thread:
    other jobs on the machine then barely move the ratio (about half a second in all). The
    global RNG and the thread count are left as they were.
    """
    threads = torch.get_num_threads()
    best = dict.fromkeys(PRECISIONS, math.inf)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.set_num_threads(1)
        try:
            model = CVAE(ModelConfig(image_size=32, num_attributes=40)).to(device)
            optimizer = make_optimizer(model.parameters(), device, lr=1e-3)
            x = torch.rand(16, 3, 32, 32, device=device)
            y = (torch.rand(16, 40, device=device) < 0.5).float()
            for repeat in range(PROBE_REPEATS + 1):
                for precision in PRECISIONS:
                    start = time.thread_time()
                    train_step(lambda: model.loss(x, y), model, optimizer, device, precision)
                    if repeat:  # the first round warms up kernels and allocator
                        best[precision] = min(best[precision], time.thread_time() - start)
        finally:
            torch.set_num_threads(threads)
    return StepTimes(fp32=best["fp32"], bf16=best["bf16"])
