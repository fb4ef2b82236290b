"""Several processes, one run: PyTorch DDP under ``torchrun``, or the ``--nproc`` shortcut.

``torchrun`` (or `run_local_world`, behind ``--nproc``) sets RANK / WORLD_SIZE / LOCAL_RANK,
or ``srun`` sets Slurm's SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (`slurm_ranks`);
the trainer then joins the process group (NCCL on CUDA, gloo on CPU), shards each global
batch across the ranks, and lets rank 0 alone log and save. Small tensors, never pickles, carry
the few things ranks must agree on. A process on its own is a world of one (`Ranks()`),
whose collectives return their input, so the loop in `zoo.run` has one code path.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import os
import re
import runpy
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

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
    rendezvous: str = "env://"  # torch's init_method: torchrun's MASTER_ADDR / MASTER_PORT

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

    def leave(self, *, settled: bool = False) -> None:
        if not self.solo:
            leave(settled=settled)

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

    def parts(self, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every rank's share of a global batch, split as evenly as it goes, in rank order."""
        return positions.tensor_split(self.world_size)


_batch_counts: contextvars.ContextVar[tuple[Ranks, tuple[int, ...]] | None] = (
    contextvars.ContextVar("zoo_global_batch", default=None)
)


@contextlib.contextmanager
def global_batch(ranks: Ranks, counts: tuple[int, ...]) -> Iterator[None]:
    """While a training step runs: the step's global batch is ``counts[r]`` images on rank r
    (a rank that has none runs one image at share 0), for losses that need the whole batch
    (`gather_batch`)."""
    token = _batch_counts.set((ranks, counts))
    try:
        yield
    finally:
        _batch_counts.reset(token)


def gather_batch(rows: torch.Tensor) -> torch.Tensor:
    """The rows of the whole global batch, this rank's and every other rank's, in rank order,
    for a loss that compares each image with the others (beta-TCVAE's estimate of q(z)).

    Gradients flow back to the rank that owns each row (``torch.distributed.nn``'s all_gather),
    so under DDP the step's gradient is the one process's gradient on the global batch. One
    process, or outside a training step: ``rows`` itself.
    """
    current = _batch_counts.get()
    if current is None or current[0].solo:
        return rows
    ranks, counts = current
    mine = rows[: counts[ranks.rank]]
    padding = rows.new_zeros((max(counts) - mine.shape[0], *rows.shape[1:]))
    gathered = dist_nn.all_gather(torch.cat([mine, padding]))
    return torch.cat([part[:count] for part, count in zip(gathered, counts, strict=True)])


def launched_ranks() -> Ranks:
    """The ranks torchrun (or ``--nproc``) gave this process, else those of an srun step; a
    world of one when it runs alone. torchrun's variables win: ``zoo train --nproc N`` in a
    Slurm job gives its ranks WORLD_SIZE, and they must not read the job's SLURM_* instead."""
    if "WORLD_SIZE" not in os.environ:
        return slurm_ranks()
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size <= 1:
        return Ranks()
    return Ranks(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


SLURM_PORTS = (10000, 20000)  # first port, count: below Linux's ephemeral ports (32768 on)


def slurm_ranks() -> Ranks:
    """The ranks of an ``srun`` step of several tasks, so ``srun zoo train`` is a DDP run
    without torchrun; a world of one otherwise.

    The rendezvous is MASTER_ADDR / MASTER_PORT when set, else the step's first node and a port
    every task derives from the job id alone, so they agree without talking.
    """
    tasks = int(os.environ.get("SLURM_NTASKS", "1"))
    # The batch script of a multi-task job also has SLURM_NTASKS and SLURM_PROCID=0, but only
    # the tasks of an srun step have SLURM_STEP_ID: taken for rank 0, that lone shell would
    # wait forever for ranks that never start.
    if tasks <= 1 or "SLURM_PROCID" not in os.environ or "SLURM_STEP_ID" not in os.environ:
        return Ranks()
    # task 0 runs on the step's first node, the job's unless srun took only some of its nodes
    address = os.environ.get("MASTER_ADDR") or first_host(
        slurm_variable("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    )
    port = os.environ.get("MASTER_PORT") or str(
        SLURM_PORTS[0] + int(slurm_variable("SLURM_JOB_ID")) % SLURM_PORTS[1]
    )
    host = f"[{address}]" if ":" in address else address  # an IPv6 address
    return Ranks(
        rank=int(os.environ["SLURM_PROCID"]),
        world_size=tasks,
        local_rank=int(os.environ.get("SLURM_LOCALID", "0")),
        rendezvous=f"tcp://{host}:{port}",
    )


def slurm_variable(*names: str) -> str:
    """The first of ``names`` set in the environment, or an error saying what to set instead."""
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    raise ZooError(f"an srun step without {names[0]}: set MASTER_ADDR and MASTER_PORT")


def first_host(nodelist: str) -> str:
    """The first host of a Slurm host list (``node[01-04,07],gpu7`` -> ``node01``)."""
    return next(hostnames(nodelist))


def hostnames(nodelist: str) -> Iterator[str]:
    """The hosts of a Slurm host list, in order: comma-separated names, each of which may hold
    bracketed ranges (``node[01-04,07]``, ``rack[1-2]-n[3,5]``) whose zero padding is kept."""
    for name in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):
        pieces = re.split(r"\[([^\]]*)\]", name)  # literal, ranges, literal, ranges, ..., literal
        choices = [[piece] if i % 2 == 0 else _numbers(piece) for i, piece in enumerate(pieces)]
        yield from ("".join(parts) for parts in itertools.product(*choices))


def _numbers(ranges: str) -> list[str]:
    """``01-03,7`` -> ``01 02 03 7``: each range padded to the width of its first bound."""
    numbers = []
    for item in ranges.split(","):
        low, _, high = item.partition("-")
        numbers.extend(str(n).zfill(len(low)) for n in range(int(low), int(high or low) + 1))
    return numbers


def join(ranks: Ranks, device: torch.device) -> None:
    """Join the process group: NCCL between GPUs, gloo between CPU processes. The rank and
    world size are passed, not left to the environment, where srun's tasks have neither."""
    if not dist.is_available():
        raise ZooError("this PyTorch build has no torch.distributed; run without torchrun")
    if device.type == "cuda":  # before the group starts, so NCCL binds this rank to its GPU
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            init_method=ranks.rendezvous,
            rank=ranks.rank,
            world_size=ranks.world_size,
        )


def leave(*, settled: bool = False) -> None:
    """Leave the process group. ``settled``: every rank got here the same way (the run ended
    or all agreed to stop), so a barrier ends their last collectives first, and a short pause
    without the GIL lets gloo's threads release that work: torch before 2.8 tears a gloo group
    down holding the GIL and deadlocks if one of them still needs it (pytorch/pytorch#154976).
    After an error on some ranks there is no barrier (the others would wait for it)."""
    if dist.is_available() and dist.is_initialized():
        if settled:
            dist.barrier()
            time.sleep(0.05)
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


# A worker is started as ``python -c WORKER_BOOT ENTRY ARGS``: `-c` puts the working directory
# first on sys.path (as ``-m`` does), so the boot line removes it before importing anything,
# and ENTRY (zoo's own cli.py, by absolute path) is run from its file, never looked up by name.
WORKER_BOOT = (
    "import sys; sys.path[:] = [p for p in sys.path if p != '']; "
    "from zoo.distributed import run_worker; run_worker()"
)
PARENT_FD_ENV = "ZOO_LAUNCHER_FD"
FAILED_RANK_GRACE_S = 10.0  # after a rank fails, how long the others get to fail or finish


def worker_command(entry: Path, argv: list[str]) -> list[str]:
    """The command line of one rank: the same command, run from ``entry``'s file."""
    return [sys.executable, "-u", "-c", WORKER_BOOT, str(Path(entry).resolve()), *argv]


def run_worker() -> None:
    """A rank's entry point (see `WORKER_BOOT`): run the entry file as ``__main__`` with the
    command line, and stop if the launcher dies (its pipe closes), so no rank is orphaned."""
    entry, *argv = sys.argv[1:]
    parent_fd = os.environ.pop(PARENT_FD_ENV, None)
    if parent_fd is not None:
        threading.Thread(target=_exit_when_closed, args=(int(parent_fd),), daemon=True).start()
    sys.argv = [entry, *argv]
    runpy.run_path(entry, run_name="__main__")


def _exit_when_closed(fd: int) -> None:
    """Block until the launcher's end of the pipe closes (it exited or was killed), then end
    this process as a SIGTERM would: the last save stands, as after any kill."""
    while os.read(fd, 1):
        pass
    os.kill(os.getpid(), signal.SIGTERM)


def free_port() -> int:
    """A TCP port nobody listens on now, for the ranks' rendezvous on this machine."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_local_world(nproc: int, entry: Path, argv: list[str]) -> int:
    """Run ``argv`` (minus --nproc) as ``nproc`` DDP ranks on this machine, as ``torchrun
    --standalone`` would, and return the run's exit status.

    The ranks run in their own sessions, so a Ctrl-C at the terminal reaches this launcher
    alone, which passes each SIGINT (or SIGTERM) on to every rank exactly once: one Ctrl-C
    makes them save after the same step and rank 0 print the resume command, a second stops
    them at once. The status is rank 0's, or the first failed rank's when rank 0 succeeded (a
    signal N counts as 128 + N); the peers of a failed rank are stopped after
    `FAILED_RANK_GRACE_S`, and no rank outlives this function.
    """
    command = worker_command(entry, without_nproc(argv))
    world = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
    }
    # the ranks hold the read end, this process the write end: EOF tells them it is gone
    read_end, write_end = os.pipe()
    workers: list[subprocess.Popen] = []
    try:
        with ForwardedSignals(workers):
            for rank in range(nproc):
                env = {**os.environ, **world, "RANK": str(rank), "LOCAL_RANK": str(rank),
                       PARENT_FD_ENV: str(read_end)}  # fmt: skip
                workers.append(
                    subprocess.Popen(command, env=env, start_new_session=True, pass_fds=[read_end])
                )
            return _wait_for(workers)
    finally:
        os.close(read_end)
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        os.close(write_end)


class ForwardedSignals:
    """While the ranks run, SIGINT and SIGTERM sent to this process go to every rank instead
    (installed from the main thread only, where Python delivers signals)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, workers: list[subprocess.Popen]) -> None:
        self.workers = workers
        self.previous: dict[int, Any] = {}

    def _forward(self, signum: int, frame: Any) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    def __enter__(self) -> ForwardedSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._forward) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def _exit_status(code: int) -> int:
    return 128 - code if code < 0 else code


def _wait_for(workers: list[subprocess.Popen]) -> int:
    """Wait for every rank, stopping the others once one has failed; the run's status."""
    first_failure: int | None = None
    failed_at = 0.0
    while any(worker.poll() is None for worker in workers):
        failures = [w.returncode for w in workers if w.returncode not in (None, 0)]
        if failures and first_failure is None:
            first_failure, failed_at = failures[0], time.monotonic()
        if first_failure is not None and time.monotonic() - failed_at > FAILED_RANK_GRACE_S:
            for worker in workers:
                if worker.poll() is None:
                    worker.terminate()
        time.sleep(0.05)
    main = workers[0].returncode
    if main != 0 or first_failure is None:
        return _exit_status(main)
    return _exit_status(first_failure)
