"""Device and precision choice: CUDA when present, then Apple MPS, then CPU.

``--precision auto`` on a CPU is decided by measurement, not by a CPU flag: bf16 autocast
is fast where the CPU computes bf16 natively (AMX, AVX-512 BF16) and slower than fp32 where
it is emulated, and no single flag tells them apart. A probe times a few training steps in
each precision once per CPU model and torch version and stores the result as JSON in the
zoo cache dir.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from zoo.data.cache import cache_dir
from zoo.errors import ZooError
from zoo.files import WriteFailed, atomic_write_text

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
PRECISION_FILE = "precision.json"
BF16_SPEEDUP_NEEDED = 1.2  # auto picks bf16 only if a probe step is at least 20% faster
PROBE_REPEATS = 3
GLIBC_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
GLIBC_TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt's int argument takes
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers from <malloc.h>


def pick_device(name: str = "auto") -> torch.device:
    """Resolve ``auto`` to the best available device; reject devices that are not there."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ZooError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ZooError(f"device {name} requested but CUDA is not available; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ZooError(f"device {name} requested but MPS is not available; use --device cpu")
    return device


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc keep freed tensor memory for reuse instead of returning it to the kernel.

    PyTorch's CPU allocator mallocs and frees every activation, and glibc serves blocks of a
    few MB with fresh mmaps (or trims them off the heap) and hands them back on free, so each
    training step page faults its activations in again: about 18,000 faults and a sixth of a
    cvae step on the 2-core EPYC of the README's speed table. torch's CPU launcher
    (torch.backends.xeon.run_cpu) swaps in tcmalloc or jemalloc for this; glibc's own mmap and
    trim thresholds do the same in-process. No number changes; the process keeps its
    peak memory instead of shrinking between steps. True when applied; a no-op off glibc and
    when the user chose an allocator or tuned glibc's (LD_PRELOAD, MALLOC_*, GLIBC_TUNABLES).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    tuned = any(key.startswith("MALLOC_") for key in os.environ)
    tuned |= "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
    tuned |= "malloc" in os.environ.get("LD_PRELOAD", "")  # tcmalloc, jemalloc, mimalloc
    if tuned:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mmap_set = libc.mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX) == 1
    trim_set = libc.mallopt(M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD) == 1
    return mmap_set and trim_set


@dataclass(frozen=True)
class PrecisionChoice:
    """A resolved precision and why it was chosen, for the first line of `zoo train`."""

    precision: str  # fp32 | bf16
    reason: str

    def __str__(self) -> str:
        return f"{self.precision} ({self.reason})"


@dataclass(frozen=True)
class StepTimes:
    """Seconds of CPU time for one probe training step in each precision."""

    fp32: float
    bf16: float

    @property
    def speedup(self) -> float:
        return self.fp32 / self.bf16


@functools.cache
def _cpuinfo(field_name: str) -> str:
    """The first non-empty value of a /proc/cpuinfo field ("" where the OS has no such file)."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == field_name and value.strip():
                return value.strip()
    return ""


def cpu_name() -> str:
    """The CPU model string ("AMD EPYC 9R14 ..."), or the architecture where the OS hides it."""
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (avx512_bf16, amx_tile, ...); empty where the OS hides them."""
    return set(_cpuinfo("flags").split())


def probe_key(device: torch.device) -> str:
    """What a stored measurement is valid for: this CPU model and this torch version."""
    return f"{device.type}: {cpu_name()} | torch {torch.__version__}"


def measure_step_times(device: torch.device) -> StepTimes:
    """Time a training step (forward and backward) of a 32 px CVAE at batch 16 in each precision.

    The fastest of three interleaved steps each, after one warm-up, in CPU time on one thread:
    other jobs on the machine then barely move the ratio (about half a second in all). The
    global RNG and the thread count are left as they were.
    """
    from zoo.model import ModelConfig
    from zoo.models.cvae import CVAE

    threads = torch.get_num_threads()
    best = dict.fromkeys(PRECISIONS, math.inf)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.set_num_threads(1)
        try:
            model = CVAE(ModelConfig(image_size=32, num_attributes=40)).to(device)
            x = torch.rand(16, 3, 32, 32, device=device)
            y = (torch.rand(16, 40, device=device) < 0.5).float()
            for repeat in range(PROBE_REPEATS + 1):
                for precision in PRECISIONS:
                    start = time.thread_time()
                    with autocast(device, precision):
                        loss = model.loss(x, y)["loss"]
                    model.zero_grad(set_to_none=True)
                    loss.backward()
                    if repeat:  # the first round warms up kernels and allocator
                        best[precision] = min(best[precision], time.thread_time() - start)
        finally:
            torch.set_num_threads(threads)
    return StepTimes(fp32=best["fp32"], bf16=best["bf16"])


def _read_cache(path: Path) -> dict:
    """The stored measurements; a malformed or unreadable file counts as empty (rewritten later)."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def read_measurement(device: torch.device) -> StepTimes | None:
    """The stored probe result for this machine and torch version, if there is a valid one."""
    entry = _read_cache(cache_dir() / PRECISION_FILE).get(probe_key(device))
    try:
        times = StepTimes(fp32=float(entry["fp32_s"]), bf16=float(entry["bf16_s"]))
    except (TypeError, KeyError, ValueError):
        return None
    valid = all(math.isfinite(t) and t > 0 for t in (times.fp32, times.bf16))
    return times if valid else None


def store_measurement(device: torch.device, times: StepTimes) -> None:
    """Add a probe result to the cache file (written atomically; a failure only warns)."""
    path = cache_dir() / PRECISION_FILE
    entries = _read_cache(path)
    entries[probe_key(device)] = {
        "fp32_s": times.fp32,
        "bf16_s": times.bf16,
        "speedup": round(times.speedup, 3),
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    try:
        atomic_write_text(path, json.dumps(entries, indent=2) + "\n")
    except WriteFailed as error:
        log.warning("could not store the precision probe (%s)", error)


def choose_precision(device: torch.device, precision: str) -> PrecisionChoice:
    """``fp32`` or ``bf16`` as asked; ``auto`` is bf16 where it is clearly faster, else fp32.

    On CUDA that is a GPU with bf16 support; on a CPU, a probe (stored per CPU model and torch
    version) that measured bf16 autocast at least `BF16_SPEEDUP_NEEDED` times as fast as fp32.
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
    times = read_measurement(device)
    source = "cached"
    if times is None:
        times = measure_step_times(device)
        store_measurement(device, times)
        source = "measured now"
    speed = f"{times.speedup:.2f}x the speed of fp32 on {cpu_name()}, {source}"
    if times.speedup >= BF16_SPEEDUP_NEEDED:
        return PrecisionChoice("bf16", f"auto: bf16 measured {speed}")
    return PrecisionChoice(
        "fp32", f"auto: bf16 measured {speed}; it needs {BF16_SPEEDUP_NEEDED:g}x"
    )


def resolve_precision(device: torch.device, precision: str) -> str:
    """``auto``, ``fp32`` or ``bf16`` as the precision to train in (see `choose_precision`)."""
    return choose_precision(device, precision).precision


def exact_fp32() -> None:
    """Make fp32 on CUDA mean IEEE fp32: no TF32 in cuDNN convolutions or cuBLAS matmuls.

    zoo keeps PyTorch's default, under which cuDNN convolutions (but not matmuls) run in TF32
    on Ampere and later GPUs: a 10-bit mantissa inside fp32 storage, several times faster,
    with results about 1e-3 apart from the CPU's. ``--deterministic`` calls this, so such a
    run repeats bit for bit and agrees with the CPU to about 1e-5. A no-op without CUDA.
    """
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for a resolved precision of ``bf16``; a no-op for ``fp32``."""
    if resolve_precision(device, precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
