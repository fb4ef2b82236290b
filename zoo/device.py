"""The hardware: which device (CUDA when present, then Apple MPS, then CPU), what CPU it is,
and how the process keeps freed memory. Precision is `zoo.precision`'s."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import platform
from pathlib import Path

import torch

from zoo.errors import ZooError

log = logging.getLogger(__name__)

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
    cvae step on the 2-core EPYC of docs/speed.md's table. torch's CPU launcher
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
