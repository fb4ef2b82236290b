"""``metrics.jsonl``, a run's log: one JSON object per line, written by `zoo.run`, read by the
loss curves and by ``--resume`` (which trims it to the step it continues from).

A line that is not a record (not UTF-8, not JSON, a cut-short line, a ``step`` that is not a
whole number, an ``epoch`` that is not a number, a value that is neither a number nor text) is
skipped by every reader, with one warning naming the file, how many lines and the first one;
it never stops a run.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def as_record(line: bytes) -> dict[str, Any] | None:
    """The record a log line holds, or None when it is not one zoo could have written."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return None
    epoch = record.get("epoch", 0)
    if not _number(epoch) or not math.isfinite(epoch):
        return None
    if not all(_number(value) or isinstance(value, str) for value in record.values()):
        return None
    return record


def read_log(path: Path) -> list[tuple[bytes, dict[str, Any]]]:
    """Every record of a log with the line it came from; the other lines are skipped with
    one warning. No file is no records."""
    try:
        lines = Path(path).read_bytes().splitlines()
    except FileNotFoundError:
        return []
    kept, skipped = [], []
    for number, line in enumerate(lines, start=1):
        record = as_record(line)
        if record is not None:
            kept.append((line, record))
        elif line.strip():
            skipped.append(number)
    if skipped:
        log.warning(
            "%s: skipped %d line(s) that are not zoo records (line %d first)",
            path,
            len(skipped),
            skipped[0],
        )
    return kept
