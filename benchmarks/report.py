"""Writing a benchmark report: JSON with every number and its settings, and a Markdown table."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from urllib.parse import quote

from benchmarks.runner import BenchReport, ModelResult
from zoo.card import card_path, record_bench_result
from zoo.errors import ZooError
from zoo.files import atomic_write_text
from zoo.names import is_plain_name, markdown_code, markdown_text

log = logging.getLogger(__name__)


def leaderboard(report: BenchReport) -> tuple[list[str], list[list[str]]]:
    """Column names and one row of formatted headline numbers per checkpoint."""
    columns: list[str] = []
    for result in report.results:
        columns += [key for key in result.headline if key not in columns]
    rows = []
    for result in report.results:
        run = result.checkpoint.parent.name
        cells = [
            result.headline.get(column, "failed" if result.errors else "-") for column in columns
        ]
        rows.append([result.info.model_name, run, *cells])
    return ["model", "run", *columns], rows


def markdown(report: BenchReport) -> str:
    """The report as Markdown; names and paths are code spans and messages escaped text, so
    no name from a file can add a row, a column or a section (`zoo.names`)."""
    header, rows = leaderboard(report)
    settings = report.settings
    options = ", ".join(
        markdown_code(f"{metric}.{name}={value}")
        for metric, named in report.options.items()
        for name, value in named.items()
    )
    lines = [
        "# zoo bench",
        "",
        f"{markdown_text(report.created)}: split {markdown_code(report.splits)}, "
        f"n = {settings.n or 'all'}, seed {settings.seed}, device {markdown_code(report.device)}"
        + (f"; options {options}." if options else "."),
        "",
        "| " + " | ".join(markdown_text(column) for column in header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
        *(
            "| "
            + " | ".join(
                [markdown_code(row[0]), markdown_code(row[1])] + [markdown_text(c) for c in row[2:]]
            )
            + " |"
            for row in rows
        ),
    ]

    def who(result: ModelResult, where: str) -> str:
        return f"- {markdown_code(result.info.model_name)} ({markdown_code(where)})"

    errors = [
        f"{who(result, str(result.checkpoint))}: {markdown_code(name)}: {markdown_text(message)}"
        for result in report.results
        for name, message in result.errors.items()
    ]
    data_notes = [
        f"{who(result, str(result.checkpoint))}: {markdown_text(result.data_note)}"
        for result in report.results
        if result.data_note
    ]
    figures = [  # zoo names the pictures from the run folder: the link is percent-encoded
        f"{who(result, result.checkpoint.parent.name)}: ![]({quote(Path(figure).name)})"
        for result in report.results
        for figure in result.figure_paths
    ]
    timings = [
        f"{who(result, result.checkpoint.parent.name)}: "
        + ", ".join(
            f"{markdown_code(name)} {seconds:.1f} s" for name, seconds in result.wall_time_s.items()
        )
        for result in report.results
        if result.wall_time_s
    ]
    if data_notes:
        lines += ["", "## Not the training data", "", *data_notes]
    if timings:
        lines += ["", "## Wall time per metric", "", *timings]
    if figures:
        lines += ["", "## Pictures", "", *figures]
    if errors:
        lines += ["", "## Not computed", "", *errors]
    return "\n".join(lines) + "\n"


def write_report(report: BenchReport, path: Path) -> tuple[Path, Path]:
    """Write ``path`` (JSON), the Markdown table beside it (same name, ``.md``) and the
    metrics' pictures beside both (``<name>-<figure>-<run>.png``)."""
    path = Path(path)
    for result in report.results:
        result.figure_paths = []
        run = result.checkpoint.parent.name
        for name, figure in result.figures:
            if not is_plain_name(name):  # a metric's figure name becomes part of a file name
                log.warning("figure %r is not written: its name is not a plain name", name)
                continue
            result.figure_paths.append(
                str(figure.save(path.with_name(f"{path.stem}-{name}-{run}.png")))
            )
    atomic_write_text(path, json.dumps(report.to_dict(), indent=2) + "\n")
    table = path.with_suffix(".md")
    atomic_write_text(table, markdown(report))
    return path, table


def update_model_cards(report: BenchReport) -> list[Path]:
    """Add each checkpoint's computed metrics to the model card beside it (`zoo.card`),
    replacing older results of the same metric and settings (the shared ones and the
    metric's own options, as ``metric.name``); the cards written. A card that cannot be
    written (a read-only folder) is a warning, never a failed benchmark."""
    settings = {
        k: v
        for k, v in dataclasses.asdict(report.settings).items()
        if k not in ("progress", "runs_dir", "classifiers")
    }
    settings["classifiers"] = ",".join(report.settings.classifiers) or None
    written = []
    for result in report.results:
        try:
            for name, (values, headline) in result.card.items():
                used = result.data_used.get(name, {})
                own = {f"{name}.{k}": v for k, v in result.options.get(name, {}).items()}
                keyed = {
                    **settings,
                    **own,
                    "device": report.device,
                    "data": used.get("fingerprint"),
                }
                keyed["split"] = used.get("split", settings["split"])
                record_bench_result(result.checkpoint, name, keyed, values, headline, used)
            if result.card:
                written.append(card_path(result.checkpoint))
        except (OSError, ZooError) as error:
            log.warning("model card of %s not updated: %s", result.checkpoint, error)
    return written
