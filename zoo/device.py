"""Device and precision choice: CUDA when present, then Apple MPS, then CPU."""

from __future__ import annotations

import contextlib

import torch

from zoo.errors import ZooError


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


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 is faster than fp32 here: CUDA with bf16 support, or a CPU with AMX tiles
    (on other CPUs bf16 convolutions are emulated and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return bool(amx and amx())
    return False


def resolve_precision(device: torch.device, precision: str) -> str:
    """``auto`` means bf16 where it is fast (see `fast_bf16`), fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ZooError(f"unknown precision {precision!r}; use auto, fp32 or bf16")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for a resolved precision of ``bf16``; a no-op for ``fp32``."""
    if resolve_precision(device, precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
