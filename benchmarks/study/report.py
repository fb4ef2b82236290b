"""`zoo study report` and `zoo study status`: what a study folder holds, read from its cells.

Rows are (model, settings) across seeds. Each headline number of a metric (the values its
`Metric.card_values` gives, as on a model card) is summarised per row with `stats.summarize`
and compared with the baseline row seed by seed with `stats.paired`.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoo.errors import ZooError
from zoo.files import atomic_write_bytes, atomic_write_text

from .cell import RESULTS, Status, is_locked, read_status
from .spec import CELL_FILE, CELLS_DIR
from .stats import CONFIDENCE, paired, summarize

STUDY_FILE = "study.json"  # the study's name, rows in order, labels and baseline
REPORT_FILES = ("report.json", "report.md", "report.png")
INTERVAL = (
    f"{CONFIDENCE:.0%} t-interval over seeds (Student's t with n - 1 degrees of freedom; "
    "with 3 to 10 seeds a bootstrap would be too narrow); differences are paired by seed, "
    "and 'real' means their interval excludes 0 (no correction for many comparisons)"
)


@dataclass
class CellView:
    name: str
    kind: str
    row: str
    label: str
    seed: int | None
    status: Status
    running: bool
    folder: Path

    @property
    def state(self) -> str:
        if self.running:
            return "running"
        if self.status.state == "running":  # its process is gone without a word
            return "interrupted"
        if self.status.state == "pending" and (self.folder / "slurm-job.txt").is_file():
            return "queued"
        return self.status.state


@dataclass
class Row:
    key: str
    label: str
    values: dict[str, dict[int, float]] = field(default_factory=dict)  # metric key -> seed


def write_study_record(
    study_dir: Path, name: str, rows: list[tuple[str, str]], baseline: str | None
) -> None:
    record = {"name": name, "rows": [{"key": k, "label": v} for k, v in rows], "baseline": baseline}
    atomic_write_text(study_dir / STUDY_FILE, json.dumps(record, indent=2) + "\n")


def _study_record(study_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((study_dir / STUDY_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ZooError(
            f"{study_dir} is not a study folder (no {STUDY_FILE}); make one with "
            "zoo study run STUDY.toml --out DIR"
        ) from None
    except (OSError, ValueError) as error:
        raise ZooError(f"{study_dir / STUDY_FILE}: cannot read it ({error})") from None


def cell_views(study_dir: Path) -> list[CellView]:
    """Every cell of the study folder, classifiers first, in name order."""
    _study_record(study_dir)
    views = []
    for path in sorted((study_dir / CELLS_DIR).glob(f"*/{CELL_FILE}")):
        folder = path.parent
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            fields = {key: record[key] for key in ("name", "kind", "row", "label", "seed")}
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ZooError(
                f"{path}: not a cell record ({type(error).__name__}: {error}); delete the "
                "cell's folder and run the study again to redo it"
            ) from None
        views.append(
            CellView(**fields, status=read_status(folder), running=is_locked(folder), folder=folder)
        )
    return sorted(views, key=lambda view: (view.kind != "classifier", view.name))


def _metric_values(results_file: Path) -> dict[str, float]:
    """The headline numbers of one bench: ``{column: value}`` over its metrics."""
    from benchmarks.metric import METRICS

    data = json.loads(results_file.read_text(encoding="utf-8"))
    values: dict[str, float] = {}
    for result in data["results"]:
        for name, metric_result in result["metrics"].items():
            if not METRICS.find(name):
                continue
            for key, value in METRICS.get(name)().card_values(metric_result).items():
                if isinstance(value, int | float) and math.isfinite(value):
                    values[key] = float(value)
    return values


def build_report(study_dir: Path) -> dict[str, Any]:
    """The report as plain data: rows with per-seed values, summaries and comparisons."""
    record = _study_record(study_dir)
    views = [view for view in cell_views(study_dir) if view.kind == "model"]
    rows = {item["key"]: Row(item["key"], item["label"]) for item in record["rows"]}
    missing: list[str] = []
    for view in views:
        row = rows.get(view.row)
        if row is None:
            continue  # a row the study file no longer names
        results = view.folder / RESULTS
        if view.status.state != "done" or not results.is_file() or view.seed is None:
            missing.append(
                f"{view.name}: {view.state}"
                + (f" ({view.status.error})" if view.status.error else "")
            )
            continue
        for key, value in _metric_values(results).items():
            row.values.setdefault(key, {})[view.seed] = value
    baseline = rows.get(record.get("baseline") or "") or next(iter(rows.values()), None)
    metrics: list[str] = []
    for row in rows.values():
        metrics += [key for key in row.values if key not in metrics]
    report_rows = []
    for row in rows.values():
        entry: dict[str, Any] = {"row": row.key, "label": row.label, "metrics": {}}
        for key in metrics:
            by_seed = row.values.get(key, {})
            if not by_seed:
                continue
            summary = summarize(list(by_seed.values()))
            item: dict[str, Any] = {
                "values": {str(s): v for s, v in sorted(by_seed.items())},
                **summary.to_dict(),
            }
            if baseline is not None and row is not baseline:
                base = baseline.values.get(key, {})
                seeds = sorted(set(by_seed) & set(base))
                if seeds:
                    comparison = paired([by_seed[s] for s in seeds], [base[s] for s in seeds])
                    item["vs_baseline"] = {**comparison.to_dict(), "seeds": seeds}
            entry["metrics"][key] = item
        report_rows.append(entry)
    return {
        "format": "zoo-study-report/1",
        "study": record["name"],
        "baseline": None if baseline is None else baseline.label,
        "interval": INTERVAL,
        "metrics": metrics,
        "rows": report_rows,
        "missing": missing,
    }


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Study {report['study']}", "", f"Intervals: {report['interval']}.", ""]
    if report["baseline"]:
        lines += [f"Baseline row: {report['baseline']}.", ""]
    for key in report["metrics"]:
        lines += [
            f"## {key}",
            "",
            "| row | n | mean | sd | 95 % CI | vs baseline (paired) |",
            "|---|---|---|---|---|---|",
        ]
        for row in report["rows"]:
            item = row["metrics"].get(key)
            if item is None:
                continue
            interval = (
                "-" if item["low"] is None else f"[{_number(item['low'])}, {_number(item['high'])}]"
            )
            versus = "baseline" if row["label"] == report["baseline"] else "-"
            comparison = item.get("vs_baseline")
            if comparison is not None:
                if comparison["low"] is None:
                    versus = f"{comparison['difference']:+.4g} (n = 1: no test)"
                else:
                    verdict = "**real**" if comparison["real"] else "inside seed noise"
                    versus = (
                        f"{comparison['difference']:+.4g} [{_number(comparison['low'])}, "
                        f"{_number(comparison['high'])}], n = {comparison['n']}, "
                        f"p = {comparison['p_value']:.3g}: {verdict}"
                    )
            lines.append(
                f"| {row['label']} | {item['n']} | {_number(item['mean'])} | "
                f"{_number(item['sd'])} | {interval} | {versus} |"
            )
        lines.append("")
    if report["missing"]:
        lines += (
            ["## Cells without results", ""] + [f"- {text}" for text in report["missing"]] + [""]
        )
    return "\n".join(lines)


def draw(report: dict[str, Any], out: Path) -> Path:
    """One panel per headline number: a row per line, its seeds as dots, the mean as a bar
    end with its interval (none for n = 1)."""
    from zoo.curves import pyplot_for

    pyplot = pyplot_for("a study report")
    keys = report["metrics"]
    labels = [row["label"] for row in report["rows"]]
    columns = min(3, max(len(keys), 1))
    lines = math.ceil(max(len(keys), 1) / columns)
    figure, axes = pyplot.subplots(
        lines,
        columns,
        figsize=(4.2 * columns, 0.5 * len(labels) * lines + 1.6 * lines),
        squeeze=False,
    )
    for index, key in enumerate(keys):
        axis = axes[index // columns][index % columns]
        for position, row in enumerate(report["rows"]):
            item = row["metrics"].get(key)
            if item is None:
                continue
            values = list(item["values"].values())
            axis.scatter(values, [position] * len(values), s=14, color="tab:gray", zorder=3)
            if item["low"] is not None:
                axis.errorbar(
                    item["mean"],
                    position,
                    capsize=4,
                    color="tab:blue",
                    zorder=2,
                    fmt="o",
                    xerr=[[item["mean"] - item["low"]], [item["high"] - item["mean"]]],
                )
            else:
                axis.scatter([item["mean"]], [position], marker="D", color="tab:blue", zorder=2)
        axis.set_yticks(range(len(labels)), labels, fontsize=8)
        axis.invert_yaxis()
        axis.set_title(key, fontsize=10)
        axis.grid(axis="x", alpha=0.3)
    for index in range(len(keys), lines * columns):
        axes[index // columns][index % columns].axis("off")
    figure.suptitle(
        f"{report['study']}: mean and 95 % t-interval over seeds (dots: seeds)", fontsize=10
    )
    figure.tight_layout()
    picture = io.BytesIO()
    figure.savefig(picture, format="png", dpi=110)
    pyplot.close(figure)
    atomic_write_bytes(out, picture.getvalue())
    return out


def write_report(study_dir: Path) -> tuple[list[Path], str | None]:
    """Write report.json and report.md, then report.png; the paths written and, when the
    picture cannot be drawn (no matplotlib), the one line that says why."""
    report = build_report(study_dir)
    json_path, md_path, png_path = (study_dir / name for name in REPORT_FILES)
    atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
    atomic_write_text(md_path, markdown(report))
    try:
        return [json_path, md_path, draw(report, png_path)], None
    except ZooError as error:
        return [json_path, md_path], str(error)
