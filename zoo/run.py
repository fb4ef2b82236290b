"""The run skeleton every trainer shares: what a training run is, apart from its model.

A run lives in ``<out>/<name>-<time>/``: the resolved settings (``config.json``), a JSON-lines
metrics log, the weights file the subclass writes, and ``train_state.safetensors`` for
``--resume``. `TrainingRun` owns the plumbing around the step: the run folder, the epoch plan
(order and flips, a pure function of seed and epoch), each process's shard of the global
batch, the logging window and ``metrics.jsonl``, the progress bar, the per-step finiteness
check, Ctrl-C, atomic saves and exact resume. A subclass says what its data, model and loss
are (`zoo.train.Trainer` for generative models, `benchmarks.classifier_training` for the
attribute classifier), so a fix here is a fix to both.

One process is a world of one (`zoo.distributed.Ranks`), so the loop below is the
single-process loop; under ``torchrun`` the same loop runs as PyTorch DDP and rank 0 alone
logs and saves.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json
import logging
import math
import os
import shlex
import signal
import threading
import time
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, TypeVar

import torch

from zoo import distributed
from zoo.checkpoint import load_train_state, save_train_state
from zoo.config import with_overrides
from zoo.curves import write_run_curves
from zoo.data import ImageData
from zoo.device import keep_freed_memory
from zoo.errors import ZooError, error_reason
from zoo.files import WriteFailed, append_text, atomic_write_bytes, hold_lock, remove_temporaries
from zoo.metrics_log import METRICS_FILE, read_log
from zoo.names import printable
from zoo.precision import PrecisionChoice, StepTimes, choose_precision, exact_fp32
from zoo.progress import training_progress
from zoo.step import measure_step_times, step_subject, train_step

log = logging.getLogger(__name__)

STATE_FILE = "train_state.safetensors"
SETTINGS_FILE = "config.json"
RUN_LOCK = ".zoo-run.lock"  # held by the process that trains the run
# `--precision auto` probes runs of at least this many steps; shorter ones train in fp32: the
# probe's 14 or more steps would be a large share of them, and bf16 at most halves a step
PROBE_MIN_STEPS = 50

T = TypeVar("T")


@dataclass
class RunResult:
    run_dir: Path
    step: int
    total_steps: int
    interrupted: bool
    summary: dict[str, Any]


class EpochPlan(NamedTuple):
    order: torch.Tensor  # the images of the epoch, shuffled
    flips: torch.Tensor  # bool, one per position of `order`: mirror that image


def epoch_plan(num_items: int, seed: int, epoch: int) -> EpochPlan:
    """The shuffled order and the flips of one epoch, a pure function of (seed, epoch): resume
    replays it, and every rank of a DDP run agrees on the images of a global batch."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_items, generator=generator)
    return EpochPlan(order, torch.rand(num_items, generator=generator) < 0.5)


class Shard(NamedTuple):
    """What one process trains on in one step."""

    index: torch.Tensor  # rows of the data
    flips: torch.Tensor | bool  # which of them to mirror
    image_count: int  # this process's images (0: it runs one image at share 0)
    counts: tuple[int, ...]  # every process's images, in rank order

    @property
    def global_image_count(self) -> int:
        """The whole step's images, over all processes."""
        return sum(self.counts)


def _rng_key(kind: str, ranks: distributed.Ranks) -> str:
    return kind if ranks.solo else f"{kind}.{ranks.rank}"


def _rng_state(device: torch.device, ranks: distributed.Ranks) -> dict[str, torch.Tensor]:
    """Every rank's RNG states, gathered (a collective call under DDP)."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device).to(device)
    gathered = {}
    for kind, state in states.items():
        for rank, rank_state in enumerate(ranks.gather(state.to(device))):
            gathered[_rng_key(kind, distributed.Ranks(rank, ranks.world_size))] = rank_state.cpu()
    return gathered


def _set_rng_state(
    states: dict[str, torch.Tensor], device: torch.device, ranks: distributed.Ranks
) -> None:
    cpu = states.get(_rng_key("cpu", ranks))
    if cpu is None:  # resumed with more processes than saved: a fresh, rank-specific stream
        log.warning("no saved RNG state for this rank; its noise stream is reseeded")
        torch.manual_seed(int(torch.seed()) + ranks.rank)
        return
    torch.set_rng_state(cpu)
    cuda = states.get(_rng_key("cuda", ranks))
    if device.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past the step a run resumes from, and lines that are not records (a line
    cut short by a crash, one edited into something else: `zoo.metrics_log`).

    The window the saved step was in is part of the saved state, so the next record covers
    the steps between the last kept record and the saved step too.
    """
    if not path.is_file():
        return
    kept = [line for line, record in read_log(path) if record["step"] <= step]
    atomic_write_bytes(path, b"".join(line + b"\n" for line in kept))


def new_run_dir(out: Path, name: str) -> Path:
    """A fresh ``out/<name>-<time>`` folder (suffixed when two runs start the same second)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = out / f"{name}-{stamp}"
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = out / f"{name}-{stamp}-{suffix}"
    try:
        run_dir.mkdir(parents=True)
    except OSError as error:
        failed = WriteFailed(run_dir, error)
        raise ZooError(f"{failed}; nothing was trained; {failed.advice()} or pass --out") from None
    return run_dir


class Window:
    """Loss sums and throughput since the last log record, kept on the device between logs.

    Every term the loss reports is averaged (models with an adversary or an attribute head
    report more than loss, recon and KL). Each step adds its losses weighted by this process's
    share of the global batch, so under DDP the sum over ranks is the global-batch mean. The
    window is saved with the training state: after a kill or Ctrl-C, the resumed run's next
    record still covers every step since the last one.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.keys: list[str] = []
        self.sums = torch.zeros(0, device=device)
        self.reset()

    def reset(self) -> None:
        self.sums.zero_()
        self.steps = 0
        self.images = 0
        self.start = time.perf_counter()

    def add(self, losses: dict[str, torch.Tensor], images: int, share: float) -> None:
        if not self.keys:
            self.keys = list(losses)
            self.sums = torch.zeros(len(self.keys), device=self.device)
        self.sums += share * torch.stack([losses[k].detach().float() for k in self.keys])
        self.steps += 1
        self.images += images

    def merge_ranks(self, ranks: distributed.Ranks, *, keep: bool = True) -> None:
        """Add up the losses and images of all ranks. With ``keep`` False this rank's copy
        empties, so only rank 0 carries the merged window on and each image counts once."""
        extra = torch.tensor([float(self.images)], device=self.sums.device)
        totals = ranks.sum(torch.cat([self.sums, extra]))
        self.sums = totals[:-1] if keep else torch.zeros_like(self.sums)
        self.images = int(totals[-1].item()) if keep else 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def rate(self) -> float:
        return self.images / max(self.elapsed(), 1e-9)

    def means(self) -> dict[str, float]:
        return dict(zip(self.keys, (self.sums / self.steps).tolist(), strict=True))

    def state(self) -> dict[str, Any]:
        """The open window as JSON (float32 sums survive the round trip exactly)."""
        return {
            "keys": self.keys,
            "sums": self.sums.tolist(),
            "steps": self.steps,
            "images": self.images,
            "elapsed": self.elapsed(),
        }

    def load_state(self, state: dict[str, Any], *, sums: bool = True) -> None:
        """Reopen a saved window; without ``sums`` (DDP ranks but 0) its terms start at zero."""
        if not state:
            return
        self.keys = list(state["keys"])
        self.sums = torch.tensor(state["sums"], dtype=torch.float32, device=self.device)
        self.steps = int(state["steps"])
        self.images = int(state["images"])
        self.start = time.perf_counter() - float(state["elapsed"])
        if not sums:
            self.sums.zero_()
            self.images = 0


class CtrlC:
    """Ctrl-C during training, deferred to the end of the step by a SIGINT handler, so the
    saved weights and step counter always agree; a second Ctrl-C stops at once, unsaved.

    Installed only in the main thread (Python delivers signals there alone); the previous
    handler comes back afterwards.
    """

    def __init__(self) -> None:
        self.pressed = False
        self._previous: Any = None
        self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True

    def __enter__(self) -> CtrlC:
        self.pressed = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._installed:
            previous = self._previous if self._previous is not None else signal.SIG_DFL
            signal.signal(signal.SIGINT, previous)
            self._installed = False


class TrainingRun:
    """One training run: `run()` trains until the step budget, an error or Ctrl-C.

    ``settings`` needs ``epochs``, ``max_steps``, ``batch_size``, ``lr``, ``seed``,
    ``device``, ``precision``, ``out``, ``save_every``, ``log_every``, ``flip``, ``on_nan``
    and ``deterministic``. A subclass sets `name` and `weights_file` and implements
    `load_data`, `build` (the model and optimizer), `losses` (one forward under autocast),
    `save_weights` and `summary`; the other methods are hooks with working defaults.
    """

    name: str  # run folder prefix and progress-bar label
    command: str  # the zoo command that runs it ("train"), for the resume advice
    weights_file: str
    min_images_per_rank = 0  # 2 for batch norm: a smaller last batch is dropped instead

    def __init__(self, settings: Any, *, resume: Path | None = None, progress: bool = True):
        self.settings = settings
        self.ranks = distributed.launched_ranks()
        self.is_main = self.ranks.is_main
        self.show_progress = progress and self.is_main
        self.device = self.ranks.device(settings.device)
        self.ranks.join(self.device)
        keep_freed_memory()
        if settings.deterministic:
            # cuBLAS needs this workspace setting to be deterministic; harmless elsewhere
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False  # autotuning picks kernels by timing
            exact_fp32()  # TF32 rounds differently from the CPU (and from a run without it)
        self.data = self._load_data()
        torch.manual_seed(settings.seed)
        self.model, self.optimizer = self.build()
        # same weights everywhere, a different noise stream per rank
        if not self.ranks.solo:
            torch.manual_seed(settings.seed * 1_000_003 + self.ranks.rank)
        self.trainable = self._trainable()
        self.steps_per_epoch = self._steps_per_epoch()
        self.total_steps = settings.epochs * self.steps_per_epoch
        if settings.max_steps is not None:
            self.total_steps = min(self.total_steps, settings.max_steps)
        self.step = 0
        self.precision_choice = self._choose_precision()  # may time this run's own step
        self.precision = self.precision_choice.precision
        self.wall_time = 0.0  # of the closed logging windows; the open one has its own clock
        self.images_seen = 0
        self.last_rate = 0.0
        self.last_losses: dict[str, float] = {}
        self.last_saved_step = 0
        self.window = Window(self.device)
        self.ctrl_c = CtrlC()
        self.stop_agreed = False  # under DDP: Ctrl-C was pressed on some rank, all ranks know
        if resume is None:
            self.run_dir = self._new_run_dir()
        else:
            self.run_dir = Path(resume)
        self._folder_lock: BinaryIO | None = None
        try:
            with self._writes_that_keep_the_last_save():
                self._take_run_folder()
                if resume is not None:
                    self._restore()
                self.started()
                if self.is_main:
                    record = json.dumps(self.settings_record(), indent=2)
                    atomic_write_bytes(self.run_dir / SETTINGS_FILE, record.encode())
        except BaseException:
            self._release_run_folder()
            raise

    # -- what a subclass says ---------------------------------------------------------------------

    def load_data(self, progress: bool) -> ImageData:
        raise NotImplementedError

    def build(self) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        raise NotImplementedError

    def losses(self, inputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """The step's loss terms (``loss`` is optimised), computed under autocast."""
        raise NotImplementedError

    def save_weights(self) -> None:
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        raise NotImplementedError

    def started(self) -> None:
        """Called once the step counter is known (0, or the step a resumed run saved)."""

    def batch(self, shard: Shard) -> tuple[torch.Tensor, ...]:
        return self.data.batch(shard.index, self.device, flip=shard.flips)

    def after_step(self) -> None:
        """After each optimizer step (a learning-rate schedule)."""

    def record_fields(self) -> dict[str, Any]:
        """Extra numbers of every log record, after the losses."""
        return {}

    def epoch_fields(self) -> dict[str, Any]:
        """Extra numbers of the records at epoch ends (an evaluation); not timed as training."""
        return {}

    def after_log(self, epoch_end: bool, finished: bool) -> None:
        """After a step's log record (sample pictures)."""

    def logged(self, record: dict[str, Any]) -> None:
        """Rank 0, each record as it is written to ``metrics.jsonl`` (TensorBoard)."""

    def saved(self) -> None:
        """Rank 0, after each save and its ``curves.png`` (a model card)."""

    def closed(self) -> None:
        """Once, when `run` returns or fails (close writers)."""

    def stats(self) -> str:
        """The live numbers on the progress bar."""
        loss = self.last_losses.get("loss")
        return f"loss {loss:9.4g}  {self.last_rate:6.0f} img/s" if loss is not None else ""

    def settings_record(self) -> dict[str, Any]:
        return {"settings": dataclasses.asdict(self.settings)}

    def nan_hint(self) -> str:
        return "lower --lr, or pass --on-nan skip to skip such steps"

    # -- plumbing ---------------------------------------------------------------------------------

    def _choose_precision(self) -> PrecisionChoice:
        """Under DDP rank 0 decides ``auto`` (it may run the probe) and the other ranks follow."""
        requested = self.settings.precision
        if self.ranks.solo or requested != "auto":
            return self._decide_precision(requested)
        choice = self._decide_precision(requested) if self.is_main else None
        agreed = self.ranks.broadcast_text(choice.precision if choice else "", self.device)
        return choice or PrecisionChoice(agreed, "auto: as rank 0 chose")

    def _decide_precision(self, requested: str) -> PrecisionChoice:
        steps = self.total_steps
        return choose_precision(
            self.device,
            requested,
            self._probe_step_times,
            self._probe_subject(),
            unprobed=(
                f"the run has {steps} steps and the probe runs from {PROBE_MIN_STEPS}"
                if steps < PROBE_MIN_STEPS
                else None
            ),
        )

    def _probe_inputs(self) -> tuple[torch.Tensor, ...]:
        """The run's first batch, as this process trains on it."""
        return self.batch(self._shard(epoch_plan(len(self.data), self.settings.seed, 0)))

    def _probe_subject(self) -> str:
        with torch.random.fork_rng(devices=self._rng_devices()):
            return step_subject(self.name, self.model, self._probe_inputs()[0])

    def _probe_step_times(self) -> StepTimes:
        """This run's own training step timed in each precision (`zoo.step.measure_step_times`)
        on its first batch. The plain model stands in for its DDP or compiled wrapper (no
        collective while the other ranks wait, no compile per precision). Weights, optimizer
        state and RNG are put back exactly, so the run is the one it would be without the probe.
        """
        weights = copy.deepcopy(self.model.state_dict())
        optimizer_state = copy.deepcopy(self.optimizer.state_dict())
        wrapped, self.trainable = self.trainable, self.model
        training = self.model.training
        self.model.train()
        try:
            with torch.random.fork_rng(devices=self._rng_devices()):
                inputs = self._probe_inputs()

                def step(precision: str) -> None:
                    train_step(
                        lambda: self.losses(inputs),
                        self.model,
                        self.optimizer,
                        self.device,
                        precision,
                    )

                return measure_step_times(step, self.device)
        finally:
            self.trainable = wrapped
            self.model.load_state_dict(weights)
            self.optimizer.load_state_dict(optimizer_state)
            self.optimizer.zero_grad(set_to_none=True)
            self.model.train(training)

    def _rng_devices(self) -> list[torch.device]:
        return [self.device] if self.device.type == "cuda" else []

    def _load_data(self) -> ImageData:
        """Rank 0 prepares the cache first; the other ranks then only read it."""
        if not self.is_main:
            self.ranks.barrier()
        data = self.load_data(self.show_progress)
        if self.is_main:
            self.ranks.barrier()
        if len(data) == 0:
            raise ZooError(f"split {data.split!r} of {data.root} has no images")
        return data

    def _steps_per_epoch(self) -> int:
        """Whole batches, plus the last partial one unless it would leave a process with fewer
        than `min_images_per_rank` images."""
        size, batch = len(self.data), self.settings.batch_size
        last = size % batch
        if last and last // self.ranks.world_size < self.min_images_per_rank:
            return max(1, size // batch)
        return math.ceil(size / batch)

    def _trainable(self) -> torch.nn.Module:
        """The module the loop calls: the model, wrapped in DDP and/or torch.compile."""
        trainable: torch.nn.Module = self.model
        if not self.ranks.solo:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            trainable = torch.nn.parallel.DistributedDataParallel(trainable, device_ids=device_ids)
        if getattr(self.settings, "compile", False):
            trainable = torch.compile(trainable)
        return trainable

    def _new_run_dir(self) -> Path:
        """Rank 0 names and creates the run folder; the other ranks learn its name."""
        path = new_run_dir(Path(self.settings.out), self.name) if self.is_main else None
        return Path(self.ranks.broadcast_text(str(path or ""), self.device))

    def _restore(self) -> None:
        """Continue from ``train_state.safetensors``: weights, optimizer, step and RNG."""
        state_path = self.run_dir / STATE_FILE
        if not state_path.is_file():
            raise ZooError(
                f"cannot resume {self.run_dir}: {STATE_FILE} is missing (the run never saved); "
                "start a new run instead"
            )
        state = load_train_state(state_path)
        fingerprint = state.extra.get("data_fingerprint")
        if fingerprint and fingerprint != self.data.fingerprint:
            raise ZooError(
                f"cannot resume {self.run_dir}: its data ({self.data.root}) has changed since "
                "the run started (fingerprint differs); start a new run"
            )
        try:
            self.model.load_state_dict(state.model_state)
            self.optimizer.load_state_dict(state.optimizer_state)
        except (RuntimeError, ValueError, KeyError) as error:
            reason = error_reason(error)
            raise ZooError(
                f"{state_path} does not match the {self.name} model of this run "
                f"({reason}); the run folder is damaged"
            ) from None
        for group in self.optimizer.param_groups:
            group["lr"] = self.settings.lr
        _set_rng_state(state.rng_state, self.device, self.ranks)
        self.step = state.step
        self.last_saved_step = state.step
        if self.is_main:
            for path in remove_temporaries(self.run_dir):
                log.info("removed %s, left by a write that was killed", path.name)
            _truncate_metrics(self.run_dir / METRICS_FILE, state.step)
        try:
            self.wall_time = float(state.extra.get("wall_time", 0.0))
            self.images_seen = int(state.extra.get("images_seen", 0))
            self.last_losses = {k: float(v) for k, v in state.extra.get("last_losses", {}).items()}
            self.window.load_state(state.extra.get("window", {}), sums=self.is_main)
        except (AttributeError, KeyError, TypeError, ValueError):
            raise ZooError(
                f"{state_path} holds malformed run totals or logging window; the run folder is "
                "damaged"
            ) from None

    def _take_run_folder(self) -> None:
        """Rank 0 holds the run folder's lock while it trains, so a second process (a resume
        started while the run still goes on) is refused instead of writing beside it."""
        if not self.is_main or not self.run_dir.is_dir():
            return
        self._folder_lock = hold_lock(self.run_dir / RUN_LOCK)
        if self._folder_lock is None:
            raise ZooError(
                f"{self.run_dir} is being trained by another process right now (it holds "
                f"{RUN_LOCK}); wait for it to end, or stop it, then resume"
            )

    def _release_run_folder(self) -> None:
        if self._folder_lock is not None:
            self._folder_lock.close()
            self._folder_lock = None

    def wall_time_s(self) -> float:
        return self.wall_time + self.window.elapsed()

    def save(self) -> None:
        """Write weights, then training state; each write is atomic on its own.

        Every rank calls this (the RNG states and logging windows are gathered); rank 0 writes.
        """
        rng_state = _rng_state(self.device, self.ranks)
        self.window.merge_ranks(self.ranks, keep=self.is_main)
        if not self.is_main:
            return
        self.model.eval()
        with self._writes_that_keep_the_last_save():
            self.save_weights()
            save_train_state(
                self.run_dir / STATE_FILE,
                self.model,
                self.optimizer,
                step=self.step,
                rng_state=rng_state,
                extra={
                    "wall_time": self.wall_time,
                    "images_seen": self.images_seen,
                    "last_losses": self.last_losses,
                    "data_fingerprint": self.data.fingerprint,
                    "window": self.window.state(),
                },
            )
        self.last_saved_step = self.step
        write_run_curves(self.run_dir)
        try:
            self.saved()
        except WriteFailed as error:  # the card is a convenience: the save itself is complete
            log.warning("%s; training goes on (the weights and state are saved)", error)
        self.model.train()

    @contextlib.contextmanager
    def _writes_that_keep_the_last_save(self) -> Iterator[None]:
        """Turn a refused write (disk full, read-only, permission denied) into one line that
        says which file, what the system said, that the last save is intact, and what to do."""
        try:
            yield
        except WriteFailed as error:
            if self.last_saved_step:
                kept = (
                    f"nothing was lost: the last save (step {self.last_saved_step}, "
                    f"{STATE_FILE} in {self.run_dir}) is intact"
                )
                then = f"continue with: {self.resume_command()}"
            else:
                kept, then = "nothing was saved yet", "start the run again"
            raise ZooError(f"{error}; {kept}; {error.advice()}, then {then}") from None

    def resume_command(self) -> str:
        """The shell command that continues this run, with as many processes."""
        nproc = f" --nproc {self.ranks.world_size}" if not self.ranks.solo else ""
        return f"zoo {self.command} --resume {shlex.quote(str(self.run_dir))}{nproc}"

    def _shard(self, plan: EpochPlan) -> Shard:
        """This process's images of the step's global batch (all of them in a world of one).

        A rank left without images (a last batch smaller than the number of ranks) still runs
        the step, on the batch's first image at share 0, so the gradient all-reduce happens and
        adds nothing from it.
        """
        start = (self.step % self.steps_per_epoch) * self.settings.batch_size
        positions = torch.arange(start, min(start + self.settings.batch_size, len(plan.order)))
        parts = self.ranks.parts(positions)
        positions = parts[self.ranks.rank]
        images = len(positions)
        if images == 0:
            positions = torch.tensor([start])
        flips = plan.flips[positions] if self.settings.flip else False
        return Shard(plan.order[positions], flips, images, tuple(map(len, parts)))

    def train_step(
        self, inputs: tuple[torch.Tensor, ...], share: float = 1.0
    ) -> dict[str, torch.Tensor] | None:
        """One optimizer step; None when the step was skipped for a non-finite loss or gradient.

        ``share`` is this process's fraction of the global batch. The loss is a mean over this
        process's images; scaled by share x ranks, DDP's average of the ranks' gradients is the
        gradient of the global-batch mean, as with one process.

        The step is `zoo.step.train_step`; its finiteness check here is also the all-reduce that
        tells every DDP rank whether Ctrl-C was pressed on any of them.
        """

        def agreed_finite(health: torch.Tensor) -> bool:
            finite, self.stop_agreed = self.ranks.agree(health, self.ctrl_c.pressed)
            return finite

        losses, health, stepped = train_step(
            lambda: self.losses(inputs),
            self.model,
            self.optimizer,
            self.device,
            self.precision,
            scale=share * self.ranks.world_size,
            check=agreed_finite,
        )
        if not stepped:
            if self.settings.on_nan == "stop":
                raise ZooError(self._nan_message(losses, health[1]))
            log.warning("non-finite loss or gradient at step %d; step skipped", self.step + 1)
            return None
        self.after_step()
        return losses

    def run(self) -> RunResult:
        """Train to the step budget, an error or Ctrl-C.

        Ctrl-C takes effect between steps: the run saves and returns. A second Ctrl-C stops at
        once without saving (the last save stands, as after a kill). A NaN stops or skips.
        """
        settings = self.settings
        forced = False
        if self._folder_lock is None:  # run() again, after the last run() let go of the folder
            self._take_run_folder()
        plan = epoch_plan(len(self.data), settings.seed, self.step // self.steps_per_epoch)
        self.model.train()
        self.stop_agreed = False
        settled = False  # every rank left the loop the same way (not by an error on one)
        with training_progress(self.show_progress) as progress, self.ctrl_c:
            total, done = self.total_steps, self.step
            task = progress.add_task(self.name, total=total, completed=done, stats="")
            try:
                while self.step < self.total_steps and not self._stopping():
                    if self.step % self.steps_per_epoch == 0:
                        plan = epoch_plan(
                            len(self.data), settings.seed, self.step // self.steps_per_epoch
                        )
                    shard = self._shard(plan)
                    share = shard.image_count / shard.global_image_count
                    with distributed.global_batch(self.ranks, shard.counts):
                        losses = self.train_step(self.batch(shard), share)
                    self.step += 1
                    if losses is not None:
                        self.window.add(losses, shard.image_count, share)
                        self.images_seen += shard.global_image_count
                    epoch_end = self.step % self.steps_per_epoch == 0
                    finished = self.step == self.total_steps
                    if self.window.steps >= settings.log_every or epoch_end or finished:
                        self._log(epoch_end or finished)
                        progress.update(task, stats=self.stats())
                    progress.update(task, completed=self.step)
                    paused = time.perf_counter()
                    self.after_log(epoch_end, finished)
                    if finished or epoch_end or self.step % settings.save_every == 0:
                        self.save()
                    # pictures and saves are not training: img/s and wall_time_s leave them out
                    self.window.start += time.perf_counter() - paused
                if self._stopping() and self.last_saved_step != self.step:
                    self.save()
                settled = True
            except KeyboardInterrupt:
                forced = True
                log.warning(
                    "stopped by a second Ctrl-C without saving; the last save is from step %d",
                    self.last_saved_step,
                )
            finally:
                if not self.ranks.solo:  # the DDP wrapper goes first, while the group is there
                    self.trainable = self.model
                    gc.collect()
                self.ranks.leave(settled=settled)
                self.closed()
                self._release_run_folder()
        interrupted = forced or self.step < self.total_steps
        step = self.last_saved_step if forced else self.step
        return RunResult(self.run_dir, step, self.total_steps, interrupted, self.summary())

    def _stopping(self) -> bool:
        """Whether Ctrl-C asks to stop before the next step: at once in one process; under DDP
        once every rank knows, so they all stop after the same step."""
        return self.ctrl_c.pressed if self.ranks.solo else self.stop_agreed

    def _log(self, at_epoch_end: bool) -> None:
        """Close the logging window: the only place the loop syncs with the device."""
        window = self.window
        self.wall_time += window.elapsed()
        window.merge_ranks(self.ranks)
        if window.steps:
            self.last_losses = window.means()
        record = {
            "step": self.step,
            "epoch": round(self.step / self.steps_per_epoch, 4),
            **self.last_losses,
            **self.record_fields(),
            "img_per_s": window.rate(),
            "wall_time_s": round(self.wall_time, 3),
        }
        self.last_rate = window.rate()
        if at_epoch_end:
            record.update(self.epoch_fields())
        if self.is_main:
            with self._writes_that_keep_the_last_save():
                append_text(self.run_dir / METRICS_FILE, json.dumps(record) + "\n")
            self.logged(record)
        window.reset()

    def _nan_message(self, losses: dict[str, torch.Tensor], grad_norm: torch.Tensor) -> str:
        parts = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
        parts += f", gradient norm={grad_norm.item():.4g}"
        kept = (
            f"the last good checkpoint {self.run_dir / self.weights_file} is from step "
            f"{self.last_saved_step}"
            if self.last_saved_step
            else "nothing was saved"
        )
        return f"loss or gradient is not finite at step {self.step + 1} ({parts}); {kept}; " + (
            self.nan_hint()
        )


def stored_settings(run_dir: Path, settings_class: type[T], **overrides: Any) -> T:
    """The settings a run was started with (its ``config.json``), with the given options
    replaced where they are not None (step budgets, to extend a run). A file that is not
    what zoo wrote (not UTF-8 JSON, missing or unknown fields, a field of the wrong type) is
    one line."""
    path = Path(run_dir) / SETTINGS_FILE
    if not path.is_file():
        raise ZooError(f"cannot resume {run_dir}: {SETTINGS_FILE} is missing; is it a zoo run?")
    damaged = f"{path} is not a zoo run config"
    try:
        stored = json.loads(path.read_bytes().decode("utf-8"))["settings"]
        stored.update(with_overrides(dict, **overrides))
        _check_types(settings_class, stored, damaged)
        return settings_class(**stored)
    except (ValueError, KeyError, TypeError, RecursionError, OSError):
        raise ZooError(f"{damaged}; the run folder is damaged") from None


def _check_types(settings_class: type, values: dict[str, Any], damaged: str) -> None:
    """Every stored setting has the type its field declares (``int | None``, ``list[str]``)."""
    for name, hint in typing.get_type_hints(settings_class).items():
        if name not in values:
            continue
        value = values[name]
        allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        kinds = tuple(typing.get_origin(kind) or kind for kind in allowed)
        if float in kinds:
            kinds += (int,)  # JSON writes 1.0 as 1
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise ZooError(
                f"{damaged}: setting {name} is {printable(repr(value))[:60]}, not {hint}; "
                "the run folder is damaged"
            )
