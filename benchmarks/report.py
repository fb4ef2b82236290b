"""Writing a benchmark report: JSON with every number and its settings, and a Markdown table."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from benchmarks.runner import BenchReport
from zoo.card import card_path, record_bench_result
from zoo.errors import ZooError

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
    header, rows = leaderboard(report)
    settings = report.settings
    lines = [
        "# zoo bench",
        "",
        f"{report.created}: split `{settings.split}`, n = {settings.n or 'all'}, "
        f"seed {settings.seed}, device {report.device}, FID features `{settings.fid_features}`.",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    errors = [
        f"- {result.info.model_name} ({result.checkpoint}): {name}: {message}"
        for result in report.results
        for name, message in result.errors.items()
    ]
    data_notes = [
        f"- {result.info.model_name} ({result.checkpoint}): {result.data_note}"
        for result in report.results
        if result.data_note
    ]
    figures = [
        f"- {result.info.model_name} ({result.checkpoint.parent.name}): ![]({Path(figure).name})"
        for result in report.results
        for figure in result.figure_paths
    ]
    timings = [
        f"- {result.info.model_name} ({result.checkpoint.parent.name}): "
        + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result.wall_time_s.items())
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
    path.parent.mkdir(parents=True, exist_ok=True)
    for result in report.results:
        result.figure_paths = [
            str(
                figure.save(
                    path.with_name(f"{path.stem}-{name}-{result.checkpoint.parent.name}.png")
                )
            )
            for name, figure in result.figures
        ]
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    table = path.with_suffix(".md")
    table.write_text(markdown(report))
    return path, table


def update_model_cards(report: BenchReport) -> list[Path]:
    """Add each checkpoint's computed metrics to the model card beside it (`zoo.card`),
    replacing older results of the same metric and settings; the cards written. A card that
    cannot be written (a read-only folder) is a warning, never a failed benchmark."""
    settings = {
        k: v
        for k, v in dataclasses.asdict(report.settings).items()
        if k not in ("progress", "runs_dir")
    }
    written = []
    for result in report.results:
        try:
            for name, (values, headline) in result.card.items():
                used = result.data_used.get(name, {})
                keyed = {**settings, "device": report.device, "data": used.get("fingerprint")}
                record_bench_result(result.checkpoint, name, keyed, values, headline, used)
            if result.card:
                written.append(card_path(result.checkpoint))
        except (OSError, ZooError) as error:
            log.warning("model card of %s not updated: %s", result.checkpoint, error)
    return written
