"""Several processes, one run: PyTorch DDP under ``torchrun``, or the ``--nproc`` shortcut.

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK; the trainer then joins the
process group (NCCL on CUDA, gloo on CPU), shards each global batch across the
ranks, and lets rank 0 alone log and save. Small tensors, never pickles, carry
the few things ranks must agree on. A process on its own is a world of one (`Ranks()`),
whose collectives return their input, so the loop in `zoo.run` has one code path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from zoo.device import pick_device
from zoo.errors import ZooError

PATH_BYTES = 4096


@dataclass(frozen=True)
class Ranks:
    """Where this process sits in a run. A process on its own is a world of one, whose
    collectives return their input, so the training loop reads like the one-process loop."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def solo(self) -> bool:
        return self.world_size == 1

    def device(self, requested: str) -> torch.device:
        """The device this process trains on: one GPU per local rank when several share them."""
        return pick_device(requested) if self.solo else device_for(self, requested)

    def join(self, device: torch.device) -> None:
        if not self.solo:
            join(self, device)

    def leave(self) -> None:
        if not self.solo:
            leave()

    def barrier(self) -> None:
        if not self.solo:
            dist.barrier()

    def broadcast_text(self, text: str, device: torch.device) -> str:
        return text if self.solo else broadcast_text(text, self, device)

    def gather(self, state: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's copy of a same-sized tensor, in rank order."""
        return [state] if self.solo else gather_rng_states(state, self)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.solo else sum_over_ranks(values)

    def agree(self, health: torch.Tensor, stop: bool) -> tuple[bool, bool]:
        """Whether ``health`` is finite on every rank and whether any rank must stop."""
        if self.solo:
            return bool(torch.isfinite(health).all()), stop
        return agree(health, stop)

    def my_part(self, positions: torch.Tensor) -> torch.Tensor:
        """This rank's share of a global batch, split as evenly as it goes."""
        return positions if self.solo else positions.tensor_split(self.world_size)[self.rank]


def launched_ranks() -> Ranks:
    """The ranks torchrun gave this process; a world of one when it runs alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks()
    return Ranks(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def join(ranks: Ranks, device: torch.device) -> None:
    """Join the process group: NCCL between GPUs, gloo between CPU processes."""
    if not dist.is_available():
        raise ZooError("this PyTorch build has no torch.distributed; run without torchrun")
    if device.type == "cuda":  # before the group starts, so NCCL binds this rank to its GPU
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_for(ranks: Ranks, requested: str) -> torch.device:
    """One GPU per local rank when there are GPUs; CPU processes otherwise."""
    if torch.cuda.is_available() and requested in ("auto", "cuda"):
        return torch.device("cuda", ranks.local_rank)
    if requested not in ("auto", "cpu"):
        raise ZooError(f"--device {requested} cannot be shared by ranks; use auto, cuda or cpu")
    return torch.device("cpu")


def broadcast_text(text: str, ranks: Ranks, device: torch.device) -> str:
    """Rank 0's string on every rank (a run folder path), as a fixed-size byte tensor."""
    buffer = torch.zeros(PATH_BYTES, dtype=torch.uint8, device=device)
    if ranks.is_main:
        encoded = text.encode()
        if len(encoded) > PATH_BYTES:
            raise ZooError(f"run folder path longer than {PATH_BYTES} bytes: {text[:60]}...")
        buffer[: len(encoded)] = torch.tensor(list(encoded), dtype=torch.uint8)
    dist.broadcast(buffer, src=0)
    return bytes(buffer[buffer.nonzero().flatten()].cpu().tolist()).decode()


def gather_rng_states(state: torch.Tensor, ranks: Ranks) -> list[torch.Tensor]:
    """Every rank's CPU RNG state on every rank (all states have the same size)."""
    states = [torch.empty_like(state) for _ in range(ranks.world_size)]
    dist.all_gather(states, state)
    return states


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def agree(health: torch.Tensor, stop: bool) -> tuple[bool, bool]:
    """Whether ``health`` (loss, gradient norm) is finite on every rank, and whether any rank
    was asked to stop (Ctrl-C): one all-reduce, so all ranks skip, stop or go on together."""
    go_on = torch.tensor(0.0 if stop else 1.0, device=health.device)
    flags = torch.stack([torch.isfinite(health.detach()).all().float(), go_on])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    finite, everyone_goes_on = flags.tolist()
    return bool(finite), not everyone_goes_on


def torchrun_command(nproc: int, cli_args: list[str]) -> list[str]:
    """``zoo train ... --nproc N`` as the equivalent single-node torchrun command."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", "-m", "cli", *cli_args,
    ]  # fmt: skip


def without_nproc(argv: list[str]) -> list[str]:
    """The command line with the --nproc option removed (the children must not relaunch)."""
    kept, skip = [], False
    for argument in argv:
        if skip:
            skip = False
        elif argument == "--nproc":
            skip = True
        elif not argument.startswith("--nproc="):
            kept.append(argument)
    return kept


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run the same `zoo train` under torchrun with ``nproc`` processes; its exit status."""
    return subprocess.call(torchrun_command(nproc, without_nproc(argv)))
