"""The one training step: what `zoo train` runs, what the throughput metric times as
"train img/s", what the speed lab measures and what the precision probe compares.

A step is: the losses under autocast, the backward of the loss (scaled, for DDP's average),
the finiteness check of the loss and the gradient norm (the loop's one host sync: a NaN must be
caught at the step it appears, before the optimizer writes it into the weights), then the
optimizer step. Adam is fused where torch has the kernel: one kernel instead of about ten small
ops per parameter.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch

from zoo.precision import PRECISIONS, StepTimes, autocast

FUSED_ADAM_DEVICES = ("cpu", "cuda")  # where torch has a fused Adam kernel
PROBE_WARMUP_ROUNDS = 2
PROBE_MIN_ROUNDS = 5
PROBE_MAX_ROUNDS = 50
PROBE_MIN_SECONDS = 2.0

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


def step_subject(name: str, model: torch.nn.Module, batch: torch.Tensor) -> str:
    """What a precision probe of `model`'s step timed, for its cache key and the first line of
    `zoo train`: the model's name, a digest of its layers, the batch shape and the threads."""
    layers = hashlib.sha256(repr(model).encode()).hexdigest()[:8]
    shape = "x".join(map(str, batch.shape))
    return f"{name} [{layers}] at {shape}, {torch.get_num_threads()} threads"


def measure_step_times(step: Callable[[str], Any], device: torch.device) -> StepTimes:
    """The precision probe: the median wall seconds of ``step(precision)`` in fp32 and bf16.

    Rounds alternate the precisions, so a change in the machine's load falls on both. After
    `PROBE_WARMUP_ROUNDS` untimed rounds (oneDNN builds its kernels per precision and shape,
    the allocator settles), at least `PROBE_MIN_ROUNDS` rounds and `PROBE_MIN_SECONDS` of
    timed steps, at most `PROBE_MAX_ROUNDS`: about four seconds for the default cvae at batch
    64 on two Zen 4 cores, where two probes agree within a few per cent (the speed lab's
    ``probe`` part measures that). The caller keeps the model's state and the RNG.
    """
    seconds: dict[str, list[float]] = {precision: [] for precision in PRECISIONS}
    for _ in range(PROBE_WARMUP_ROUNDS):
        for precision in PRECISIONS:
            step(precision)
    while len(seconds["fp32"]) < PROBE_MAX_ROUNDS and (
        len(seconds["fp32"]) < PROBE_MIN_ROUNDS
        or sum(map(sum, seconds.values())) < PROBE_MIN_SECONDS
    ):
        for precision in PRECISIONS:
            synchronize(device)
            start = time.perf_counter()
            step(precision)
            synchronize(device)
            seconds[precision].append(time.perf_counter() - start)
    return StepTimes(
        fp32=statistics.median(seconds["fp32"]), bf16=statistics.median(seconds["bf16"])
    )
