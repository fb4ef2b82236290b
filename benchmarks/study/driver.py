"""Submit a study's cells through an executor until each is done or out of retries.

Executors: ``inline`` (one cell after another in this process; no submitit), ``local``
(submitit's local executor: each cell a child process, ``jobs`` at once) and ``slurm``
(submitit's Slurm executor: the cells of a round go as one job array). The driver keeps no
state of its own: every cell's folder says what happened to it, so a driver killed at any
moment is replaced by running the study again.

submitit moves the function and its arguments between the driver and a job as pickles in
``STUDY_DIR/.submitit``; zoo passes only a folder name and a command line that way and never
reads a job's result pickle: what a cell did is in its ``status.json``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from zoo.errors import ZooError
from zoo.files import atomic_write_text

from .cell import is_done, is_locked, read_status, run_cell, write_status
from .spec import CELL_FILE, Cell, Study

EXECUTORS = ("local", "slurm", "inline")
SUBMITIT_DIR = ".submitit"
POLL_SECONDS = 2.0
NO_TIMEOUT_MIN = 60 * 24 * 365  # submitit's local executor kills a job after 2 minutes unless told


@dataclass
class SlurmOptions:
    """What `--executor slurm` asks sbatch for, per cell (a multi-GPU cell is one task per
    GPU on one node)."""

    partition: str | None = None
    time_min: int = 60 * 24
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    array_parallelism: int = 256
    sbatch: dict[str, str] = field(default_factory=dict)  # extra #SBATCH --KEY=VALUE lines
    setup: list[str] = field(default_factory=list)  # shell lines before the cell starts


class Handle(Protocol):
    def done(self) -> bool: ...


class _Finished:
    def done(self) -> bool:
        return True


@dataclass
class _LockWait:
    """A cell a process from an earlier driver still runs: done when its lock is free."""

    folder: Path

    def done(self) -> bool:
        return not is_locked(self.folder)


class Executor(Protocol):
    limit: int  # cells running at once that this driver starts

    def submit(self, cells: list[Path], program: list[str]) -> list[Handle]: ...


class InlineExecutor:
    limit = 1

    def submit(self, cells: list[Path], program: list[str]) -> list[Handle]:
        handles: list[Handle] = []
        for folder in cells:
            run_cell(str(folder), program)
            handles.append(_Finished())
        return handles


def _submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise ZooError(
            "the local and slurm executors need submitit: pip install 'zoo[cluster]' "
            "(or run with --executor inline)"
        ) from None
    return submitit


class LocalExecutor:
    """submitit's local executor: each cell in its own process, ``jobs`` at once."""

    def __init__(self, study_dir: Path, jobs: int) -> None:
        self.limit = jobs
        self.executor = _submitit().LocalExecutor(folder=study_dir / SUBMITIT_DIR)
        self.executor.update_parameters(timeout_min=NO_TIMEOUT_MIN)

    def submit(self, cells: list[Path], program: list[str]) -> list[Handle]:
        return [self.executor.submit(run_cell, str(folder), program) for folder in cells]


class SlurmExecutor:
    """submitit's Slurm executor: the cells of one submission are one job array; Slurm (and
    ``array_parallelism``) decides how many run at once."""

    limit = sys.maxsize

    def __init__(self, study_dir: Path, options: SlurmOptions, nproc: int) -> None:
        executor = _submitit().SlurmExecutor(folder=study_dir / SUBMITIT_DIR / "%j")
        parameters: dict[str, Any] = {
            "time": options.time_min,
            "nodes": 1,
            "ntasks_per_node": nproc,
            "array_parallelism": options.array_parallelism,
            "job_name": f"zoo-{study_dir.name}",
            "setup": list(options.setup),
            "additional_parameters": dict(options.sbatch),
        }
        if options.partition:
            parameters["partition"] = options.partition
        if options.gpus_per_node is not None:
            parameters["gpus_per_node"] = options.gpus_per_node
        if options.cpus_per_task is not None:
            parameters["cpus_per_task"] = options.cpus_per_task
        if options.mem_gb is not None:
            parameters["mem"] = f"{int(options.mem_gb * 1024)}M"
        executor.update_parameters(**parameters)
        self.executor = executor

    def submit(self, cells: list[Path], program: list[str]) -> list[Handle]:
        with self.executor.batch():
            jobs = [self.executor.submit(run_cell, str(folder), program) for folder in cells]
        for folder, job in zip(cells, jobs, strict=True):
            atomic_write_text(folder / "slurm-job.txt", f"{job.job_id}\n")
        return jobs


@dataclass
class Outcome:
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # cell -> its error line
    interrupted: bool = False


def prepare(study: Study, study_dir: Path) -> None:
    """Write each cell's folder and ``cell.json``; an existing one is left as it is (the same
    name is the same settings)."""
    for cell in study.cells:
        folder = cell.folder(study_dir)
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / CELL_FILE).is_file():
            atomic_write_text(folder / CELL_FILE, json.dumps(cell.record(), indent=2) + "\n")


def run_study(
    study: Study,
    study_dir: Path,
    program: list[str],
    make_executor: Callable[[int], Executor],
    retries: int,
    on_change: Callable[[int, int, int, int], None] = lambda done, total, running, failed: None,
) -> Outcome:
    """Run every cell not done yet: classifiers first (the model cells' benches read them),
    then the models. ``make_executor(nproc)`` gives the executor for cells of that many
    processes. ``on_change(done, total, running, failed)`` follows the progress."""
    prepare(study, study_dir)
    outcome = Outcome()
    total = len(study.cells)
    executors: dict[int, Executor] = {}
    try:
        for kind in ("classifier", "model"):
            cells = [cell for cell in study.cells if cell.kind == kind]
            _run_round(
                cells,
                study_dir,
                program,
                executors,
                make_executor,
                retries,
                outcome,
                lambda running: on_change(len(outcome.done), total, running, len(outcome.failed)),
            )
            if kind == "classifier" and outcome.failed:
                for cell in study.model_cells():
                    if cell.needs in outcome.failed:
                        outcome.failed[cell.name] = f"its classifier cell {cell.needs} failed"
                break
    except KeyboardInterrupt:
        outcome.interrupted = True
    on_change(len(outcome.done), total, 0, len(outcome.failed))
    return outcome


def _nproc(cell: Cell) -> int:
    return int(cell.settings.get("train", {}).get("nproc", 1) or 1)


def _run_round(
    cells: list[Cell],
    study_dir: Path,
    program: list[str],
    executors: dict[int, Executor],
    make_executor: Callable[[int], Executor],
    retries: int,
    outcome: Outcome,
    report: Callable[[int], None],
) -> None:
    attempts = {cell.name: 0 for cell in cells}
    todo: list[Cell] = []
    running: dict[str, Handle] = {}
    for cell in cells:
        folder = cell.folder(study_dir)
        if is_done(folder):
            outcome.done.append(cell.name)
        elif is_locked(folder):  # an earlier driver's cell, still running: wait for it
            running[cell.name] = _LockWait(folder)
        else:
            todo.append(cell)
    by_name = {cell.name: cell for cell in cells}
    report(len(running))
    while todo or running:
        for nproc in sorted({_nproc(cell) for cell in todo}):
            if nproc not in executors:
                executors[nproc] = make_executor(nproc)
            executor = executors[nproc]
            room = executor.limit - len(running)
            batch = [cell for cell in todo if _nproc(cell) == nproc][: max(room, 0)]
            if not batch:
                continue
            for cell in batch:
                todo.remove(cell)
                attempts[cell.name] += 1
            folders = [cell.folder(study_dir) for cell in batch]
            for cell, handle in zip(batch, executor.submit(folders, program), strict=True):
                running[cell.name] = handle
            report(len(running))
        finished = [name for name, handle in running.items() if handle.done()]
        if not finished:
            time.sleep(POLL_SECONDS)
            continue
        for name in finished:
            del running[name]
            folder = by_name[name].folder(study_dir)
            if is_locked(folder):  # its job said done, its process has not let go yet
                running[name] = _LockWait(folder)
                continue
            status = read_status(folder)
            if is_done(folder):
                outcome.done.append(name)
            elif attempts[name] <= retries:  # again at once: it resumes from its last save
                todo.insert(0, by_name[name])
            else:
                if status.state == "running":  # its process died before it could say why
                    status.state = "failed"
                    status.error = "its process died without a word (killed?); see its log.txt"
                    write_status(folder, status)
                outcome.failed[name] = status.error or status.state
        report(len(running))
