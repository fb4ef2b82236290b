"""Loss curves as a picture: ``curves.png`` in every run folder and ``zoo curves`` to compare.

Each loss term a run logs (loss, recon, KL, an adversary's or a head's terms) gets its own
panel against step, with dotted lines at epoch boundaries. ``metrics.jsonl`` is the source:
a resumed run trims it to its last save and appends, so it draws as one continuous curve.
matplotlib is an optional extra (``pip install 'zoo[plots]'``); without it training still
runs and only the picture is missing.
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import Any

from zoo.errors import ZooError, failure_text
from zoo.files import atomic_write_bytes
from zoo.metrics_log import METRICS_FILE, read_log

log = logging.getLogger(__name__)

CURVES_FILE = "curves.png"
PLOTS_HINT = "install the plots extra: pip install 'zoo[plots]'"
NOT_LOSSES = {"step", "epoch", "img_per_s", "wall_time_s", "kl_weight", "lr"}


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl``; lines that are not records are skipped with
    one warning (`zoo.metrics_log`)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ZooError(f"{run_dir} has no {METRICS_FILE}; pass a run folder written by zoo train")
    return [record for _, record in read_log(path)]


def loss_terms(records: list[dict[str, Any]]) -> list[str]:
    """The logged loss terms, in the order the log first names them (evaluations excluded)."""
    terms: list[str] = []
    for record in records:
        for key, value in record.items():
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            loss = numeric and key not in NOT_LOSSES and not key.startswith("eval")
            if loss and key not in terms:
                terms.append(key)
    return terms


def pyplot_for(what: str) -> Any:
    """matplotlib's pyplot drawing to files only; without the plots extra, one line saying
    that drawing ``what`` needs it."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display, no GUI toolkit
        from matplotlib import pyplot
    except ImportError:
        raise ZooError(f"drawing {what} needs matplotlib; {PLOTS_HINT}") from None
    return pyplot


def draw_curves(runs: dict[str, list[dict[str, Any]]], out: Path, title: str = "") -> Path:
    """One panel per loss term, each run a line labelled by its key; epoch boundaries of the
    first run dotted. Written atomically (a crash leaves the previous picture)."""
    pyplot = pyplot_for("loss curves")
    terms: list[str] = []
    for records in runs.values():
        terms += [term for term in loss_terms(records) if term not in terms]
    if not terms:
        raise ZooError(f"no loss records to draw yet in {', '.join(runs)}")
    columns = min(3, len(terms))
    rows = math.ceil(len(terms) / columns)
    size = (4.2 * columns, 3.0 * rows)
    figure, axes = pyplot.subplots(rows, columns, figsize=size, squeeze=False)
    for axis, term in zip(axes.flat, terms, strict=False):
        values = []
        for index, (label, records) in enumerate(runs.items()):
            points = [(r["step"], r[term]) for r in records if isinstance(r.get(term), int | float)]
            if points:  # one colour per run in every panel, whichever runs log the term
                marker = "." if len(points) < 20 else None  # a short run is a few dots
                xs, ys = zip(*points, strict=True)
                axis.plot(xs, ys, f"C{index}", label=label, linewidth=1.2, marker=marker)
                values += ys
        first = next(iter(runs.values()))
        for step in _epoch_boundaries(first):
            axis.axvline(step, color="0.8", linestyle=":", linewidth=0.8)
        axis.set_title(term)
        axis.set_xlabel("step")
        if term in ("loss", "recon") and all(v > 0 for v in values):
            axis.set_yscale("log")
    for axis in list(axes.flat)[len(terms) :]:
        axis.set_visible(False)
    if len(runs) > 1:
        axes.flat[0].legend(fontsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=110)
    pyplot.close(figure)
    atomic_write_bytes(Path(out), png.getvalue())
    return Path(out)


def _epoch_boundaries(records: list[dict[str, Any]]) -> list[int]:
    """Steps whose record closes an epoch (its ``epoch`` is a whole number)."""
    return [r["step"] for r in records if float(r.get("epoch", 0.5)).is_integer() and r["epoch"]]


def write_run_curves(run_dir: Path) -> Path | None:
    """``curves.png`` of one run, or None (one line) when matplotlib is missing, the log has no
    record yet, or drawing fails for any reason: a picture must never stop a training run."""
    try:
        records = read_records(run_dir)
        if not records:
            return None
        return draw_curves({run_dir.name: records}, run_dir / CURVES_FILE, title=run_dir.name)
    except ZooError as error:
        log.info("%s not drawn: %s", CURVES_FILE, error)
    except Exception as error:
        log.warning("%s not drawn: %s; training goes on", CURVES_FILE, failure_text(error))
    return None
