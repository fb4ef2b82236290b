"""Run one cell: its zoo commands as child processes, in the process an executor gives it.

A cell folder holds ``cell.json`` (what to run; written by the driver), ``status.json`` (what
happened; written only by whoever holds ``cell.lock``), ``log.txt`` (the commands' output),
``runs/`` (the training run) and, for a model cell, ``bench/results.json``. The lock is an
flock that the kernel drops when its holder dies however it dies, so a second driver never
runs a cell that is still running and never waits for one that is dead.

The commands run as child processes, exactly as a user would type them: their one-line
errors, Ctrl-C saves, `--resume` and DDP ranks are zoo's own, and a crash of one cell never
takes the driver (or the other cells in it) down.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from zoo.errors import ZooError
from zoo.files import append_text, atomic_write_text, hold_lock

from .spec import CELL_FILE

STATUS_FILE = "status.json"
LOCK_FILE = "cell.lock"
LOG_FILE = "log.txt"
RESULTS = Path("bench") / "results.json"
STATE_FILE = "train_state.safetensors"  # a run that saved at least once can --resume
WEIGHTS = {"model": "model.safetensors", "classifier": "classifier.safetensors"}
INTERRUPTED = 130  # zoo's exit status after Ctrl-C: the run saved and can resume


@dataclass
class Status:
    """What happened to a cell; ``state`` is pending, running, done, failed or interrupted."""

    state: str = "pending"
    attempts: int = 0
    error: str | None = None
    seconds: float = 0.0  # wall time of every attempt, added up
    weights: str | None = None  # relative to the cell folder, once trained
    host: str | None = None
    pid: int | None = None
    started: float | None = None
    finished: float | None = None


def read_status(folder: Path) -> Status:
    """The cell's status; a missing or unreadable file is a cell that never started."""
    try:
        data = json.loads((folder / STATUS_FILE).read_text(encoding="utf-8"))
        return Status(**{key: data[key] for key in asdict(Status()) if key in data})
    except (OSError, ValueError, TypeError):
        return Status()


def write_status(folder: Path, status: Status) -> None:
    atomic_write_text(folder / STATUS_FILE, json.dumps(asdict(status), indent=2) + "\n")


def is_done(folder: Path) -> bool:
    status = read_status(folder)
    if status.state != "done":
        return False
    record = json.loads((folder / CELL_FILE).read_text(encoding="utf-8"))
    wanted = folder / (RESULTS if record["kind"] == "model" else str(status.weights))
    return wanted.is_file()


def is_locked(folder: Path) -> bool:
    """Whether a live process is running this cell now."""
    handle = hold_lock(folder / LOCK_FILE)
    if handle is None:
        return True
    handle.close()
    return False


class CellFailed(Exception):
    """One zoo command of the cell failed; ``line`` says why in one line."""

    def __init__(self, line: str, interrupted: bool = False) -> None:
        super().__init__(line)
        self.line = line
        self.interrupted = interrupted


def _main_rank() -> bool:
    """Under `srun` with several tasks every task runs the cell; rank 0 owns its files."""
    from zoo.distributed import launched_ranks

    return launched_ranks().rank == 0


def run_cell(cell_dir: str, program: list[str]) -> str:
    """Run the cell in ``cell_dir`` to the end (or to its first failure) and say how it ended:
    done, failed, interrupted or busy (another live process holds it). Never raises for the
    cell's own failures: they are its status."""
    folder = Path(cell_dir)
    record = json.loads((folder / CELL_FILE).read_text(encoding="utf-8"))
    if not _main_rank():  # another rank of a multi-task cell: train beside rank 0, nothing else
        _train(folder, record, program, trained=None)
        return "done"
    lock = hold_lock(folder / LOCK_FILE)
    if lock is None:
        return "busy"
    try:
        status = read_status(folder)
        if status.state == "done" and is_done(folder):
            return "done"
        status.state, status.error = "running", None
        status.attempts += 1
        status.host, status.pid, status.started = socket.gethostname(), os.getpid(), time.time()
        write_status(folder, status)
        start = time.monotonic()
        try:
            status.weights = _train(folder, record, program, trained=status.weights)
            write_status(folder, status)  # trained: a later attempt goes straight to bench
            if record["kind"] == "model":
                _bench(folder, record, program, status.weights)
            status.state = "done"
        except CellFailed as failure:
            status.state = "interrupted" if failure.interrupted else "failed"
            status.error = failure.line
        except (OSError, ZooError) as error:
            status.state, status.error = "failed", f"{type(error).__name__}: {error}"
        except KeyboardInterrupt:
            status.state, status.error = "interrupted", "interrupted by Ctrl-C; it resumes"
            status.seconds += time.monotonic() - start
            write_status(folder, status)
            raise
        if status.error:  # the log keeps every attempt's reason; the status only the last
            append_text(folder / LOG_FILE, f"attempt {status.attempts}: {status.error}\n")
        status.seconds += time.monotonic() - start
        status.finished = time.time()
        write_status(folder, status)
        return status.state
    finally:
        lock.close()


def _train(folder: Path, record: dict[str, Any], program: list[str], trained: str | None) -> str:
    """Train (or resume) the cell's run; the path of its weights, relative to ``folder``."""
    weights_name = WEIGHTS[record["kind"]]
    if trained is not None and (folder / trained).is_file():
        return trained
    runs = folder / "runs"
    command = "train" if record["kind"] == "model" else "train-classifier"
    resumable = sorted(run for run in runs.glob("*/") if (run / STATE_FILE).is_file())
    arguments = list(record["commands"][command])
    if resumable:
        arguments = ["--resume", str(resumable[-1])]
        nproc = record["settings"].get("train", {}).get("nproc")
        if nproc is not None:
            arguments += ["--nproc", str(nproc)]
    else:
        if _main_rank():
            for stale in runs.glob("*/"):  # never saved: nothing there to resume or lose
                shutil.rmtree(stale, ignore_errors=True)
        arguments += ["--out", str(runs)]
    _zoo(folder, program, [command, *arguments, "--no-progress"])
    finished = sorted(run for run in runs.glob("*/") if (run / weights_name).is_file())
    if not finished:
        raise CellFailed(f"zoo {command} ended without writing {weights_name} in {runs}")
    return str((finished[-1] / weights_name).relative_to(folder))


def _bench(folder: Path, record: dict[str, Any], program: list[str], weights: str) -> None:
    arguments = ["bench", str(folder / weights), *record["commands"]["bench"]]
    if record["needs"] is not None:
        ruler = folder.parent / record["needs"]
        ruler_weights = read_status(ruler).weights
        if ruler_weights is None or not (ruler / ruler_weights).is_file():
            raise CellFailed(f"its classifier cell {record['needs']} has not finished")
        arguments += ["--classifier", str(ruler / ruler_weights)]
    arguments += ["--out", str(folder / RESULTS), "--no-progress"]
    _zoo(folder, program, arguments)


def _zoo(folder: Path, program: list[str], arguments: list[str]) -> None:
    """Run one zoo command, its output appended to the cell's log; `CellFailed` with its
    error line when it fails."""
    command = [*program, *arguments]
    append_text(folder / LOG_FILE, f"$ zoo {' '.join(arguments)}\n")
    with (
        open(folder / LOG_FILE, "a", encoding="utf-8") as log,
        subprocess.Popen(command, stdout=log, stderr=subprocess.PIPE, text=True) as process,
    ):
        try:
            _, errors = process.communicate()
        except KeyboardInterrupt:  # the same Ctrl-C reached the command: let it save first
            _, errors = process.communicate()
            append_text(folder / LOG_FILE, errors)
            raise
    append_text(folder / LOG_FILE, errors)
    if process.returncode == 0:
        return
    if process.returncode == INTERRUPTED:
        raise CellFailed(f"zoo {arguments[0]} was interrupted; it resumes", interrupted=True)
    if process.returncode < 0:
        name = signal.Signals(-process.returncode).name
        raise CellFailed(f"zoo {arguments[0]} was killed by {name}")
    lines = [line.strip() for line in errors.splitlines() if line.strip()]
    said = [line for line in lines if line.startswith(("error:", "not computed:"))]
    reason = (said or lines or [f"exit status {process.returncode}"])[-1]
    raise CellFailed(f"zoo {arguments[0]}: {reason}")
