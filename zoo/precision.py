"""The precision a run computes in: fp32, or bf16 autocast where it is clearly faster.

``--precision auto`` on a CPU is decided by measurement, not by a CPU flag: bf16 autocast
is fast where the CPU computes bf16 natively (AMX, AVX-512 BF16) and slower than fp32 where
it is emulated, and how much faster depends on the network and the batch (on one Intel Xeon
bf16 was 1.2x fp32 for the cvae at batch 64 and no faster for the editor). So the probe,
passed in by the caller since it trains a model and models sit above this module, times the
run's own training step in each precision (`zoo.step.measure_step_times`); the result is
stored as JSON in the zoo cache dir, keyed by the CPU model, its flags, the torch version
and what was measured (the subject: model, batch shape, threads).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from zoo.device import cpu_flags, cpu_name
from zoo.errors import ZooError
from zoo.files import WriteFailed, atomic_write_text, cache_dir

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
PRECISION_FILE = "precision.json"
BF16_SPEEDUP_NEEDED = 1.2  # auto picks bf16 only if a probe step is at least 20% faster


@dataclass(frozen=True)
class PrecisionChoice:
    """A resolved precision and why it was chosen, for the first line of `zoo train`."""

    precision: str  # fp32 | bf16
    reason: str

    def __str__(self) -> str:
        return f"{self.precision} ({self.reason})"


@dataclass(frozen=True)
class StepTimes:
    """Seconds of one probe training step in each precision."""

    fp32: float
    bf16: float

    @property
    def speedup(self) -> float:
        return self.fp32 / self.bf16


Probe = Callable[[], StepTimes]


def probe_key(device: torch.device, subject: str) -> str:
    """What a stored measurement is valid for: this CPU model and its flags (a digest: two
    CPUs of one name can differ in them), this torch version, and the step it timed."""
    flags = hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:12]
    return f"{device.type}: {cpu_name()} | flags {flags} | torch {torch.__version__} | {subject}"


def _read_cache(path: Path) -> dict:
    """The stored measurements; a malformed or unreadable file counts as empty (rewritten later)."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def read_measurement(device: torch.device, subject: str) -> StepTimes | None:
    """The stored probe result for this machine, torch version and subject, if a valid one."""
    entry = _read_cache(cache_dir() / PRECISION_FILE).get(probe_key(device, subject))
    try:
        times = StepTimes(fp32=float(entry["fp32_s"]), bf16=float(entry["bf16_s"]))
    except (TypeError, KeyError, ValueError):
        return None
    valid = all(math.isfinite(t) and t > 0 for t in (times.fp32, times.bf16))
    return times if valid else None


def store_measurement(device: torch.device, subject: str, times: StepTimes) -> None:
    """Add a probe result to the cache file (written atomically; a failure only warns)."""
    path = cache_dir() / PRECISION_FILE
    entries = _read_cache(path)
    entries[probe_key(device, subject)] = {
        "fp32_s": times.fp32,
        "bf16_s": times.bf16,
        "speedup": round(times.speedup, 3),
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    try:
        atomic_write_text(path, json.dumps(entries, indent=2) + "\n")
    except WriteFailed as error:
        log.warning("could not store the precision probe (%s)", error)


def choose_precision(
    device: torch.device,
    precision: str,
    probe: Probe,
    subject: str,
    *,
    unprobed: str | None = None,
) -> PrecisionChoice:
    """``fp32`` or ``bf16`` as asked; ``auto`` is bf16 where it is clearly faster, else fp32.

    On CUDA that is a GPU with bf16 support; on a CPU, a `probe` of the step named `subject`
    (run once, then stored per CPU, torch version and subject) that measured bf16 autocast at
    least `BF16_SPEEDUP_NEEDED` times as fast as fp32. With `unprobed` (why a probe would not
    pay, say a run of a few steps) and nothing stored, fp32 without probing.
    """
    if precision in PRECISIONS:
        return PrecisionChoice(precision, "requested")
    if precision != "auto":
        raise ZooError(f"unknown precision {precision!r}; use auto, fp32 or bf16")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16", f"auto: {name} supports bf16")
        return PrecisionChoice("fp32", f"auto: {name} has no bf16")
    if device.type != "cpu":
        return PrecisionChoice("fp32", f"auto: bf16 autocast is not used on {device.type}")
    times = read_measurement(device, subject)
    source = "cached"
    if times is None:
        if unprobed is not None:
            return PrecisionChoice("fp32", f"auto: not probed ({unprobed})")
        times = probe()
        store_measurement(device, subject, times)
        source = "measured now"
    speed = f"{times.speedup:.2f}x the speed of fp32 for {subject} on {cpu_name()}, {source}"
    if times.speedup >= BF16_SPEEDUP_NEEDED:
        return PrecisionChoice("bf16", f"auto: bf16 measured {speed}")
    return PrecisionChoice(
        "fp32", f"auto: bf16 measured {speed}; it needs {BF16_SPEEDUP_NEEDED:g}x"
    )


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for a resolved precision of ``bf16``; a no-op for ``fp32``."""
    if precision not in PRECISIONS:
        raise ValueError(f"autocast takes a resolved precision (fp32 or bf16), not {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def exact_fp32() -> None:
    """Make fp32 on CUDA mean IEEE fp32: no TF32 in cuDNN convolutions or cuBLAS matmuls.

    zoo keeps PyTorch's default, under which cuDNN convolutions (but not matmuls) run in TF32
    on Ampere and later GPUs: a 10-bit mantissa inside fp32 storage, several times faster,
    with results about 1e-3 apart from the CPU's. ``--deterministic`` calls this, so such a
    run repeats bit for bit and agrees with the CPU to about 1e-5. A no-op without CUDA.
    """
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
