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
from .spec import CELL_FILE, CELLS_DIR, Study
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


def write_study_record(study_dir: Path, study: Study) -> None:
    rows = [
        {"key": key, "label": label, "grid": study.grids.get(key, {})}
        for key, label in study.rows.items()
    ]
    record = {"name": study.name, "rows": rows, "baseline": study.baseline}
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
    grids = {item["key"]: item.get("grid", {}) for item in record["rows"]}
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
        entry: dict[str, Any] = {
            "row": row.key, "label": row.label, "grid": grids[row.key], "metrics": {}
        }  # fmt: skip
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


def swept_keys(report: dict[str, Any]) -> list[str]:
    """The grid keys with at least two numeric values across the rows: each gets a picture of
    every number against it (`draw_against`)."""
    values: dict[str, set[float]] = {}
    for row in report["rows"]:
        for key, value in row.get("grid", {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                values.setdefault(key, set()).add(float(value))
    return [key for key, seen in values.items() if len(seen) > 1]


def draw_against(report: dict[str, Any], key: str, out: Path) -> Path:
    """One panel per headline number against the grid value ``key``: a line per group of rows
    that differ only in it (mean and 95 % interval, seeds as dots); rows without ``key`` (a
    model the grid does not cross) are a dashed level with their interval as a band."""
    from zoo.curves import pyplot_for

    pyplot = pyplot_for("a study report")
    groups: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    levels = []
    for row in report["rows"]:
        value = row.get("grid", {}).get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            name = " ".join(w for w in row["label"].split(" ") if not w.startswith(f"{key}="))
            groups.setdefault(name, []).append((float(value), row))
        else:
            levels.append(row)
    xs = sorted({x for points in groups.values() for x, _ in points})
    log_x = xs[0] > 0 and xs[-1] / xs[0] >= 4
    metrics = report["metrics"]
    columns = min(4, max(len(metrics), 1))
    lines = math.ceil(max(len(metrics), 1) / columns)
    figure, axes = pyplot.subplots(
        lines, columns, figsize=(3.6 * columns, 2.9 * lines), squeeze=False
    )
    colours = pyplot.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, metric in enumerate(metrics):
        axis = axes[index // columns][index % columns]
        for number, (name, points) in enumerate(groups.items()):
            points = sorted(
                (x, row["metrics"][metric]) for x, row in points if metric in row["metrics"]
            )
            if not points:
                continue
            colour = colours[number % len(colours)]
            for x, item in points:
                seeds = list(item["values"].values())
                axis.scatter([x] * len(seeds), seeds, s=8, color=colour, alpha=0.4, zorder=3)
            x_values = [x for x, _ in points]
            means = [item["mean"] for _, item in points]
            low = [
                item["mean"] - (item["low"] if item["low"] is not None else item["mean"])
                for _, item in points
            ]
            high = [
                (item["high"] if item["high"] is not None else item["mean"]) - item["mean"]
                for _, item in points
            ]
            axis.errorbar(
                x_values, means, yerr=[low, high], color=colour, capsize=3, marker="o", label=name
            )
        for number, row in enumerate(levels, start=len(groups)):
            item = row["metrics"].get(metric)
            if item is None:
                continue
            colour = colours[number % len(colours)]
            axis.axhline(item["mean"], color=colour, linestyle="--", label=row["label"])
            if item["low"] is not None:
                axis.axhspan(item["low"], item["high"], color=colour, alpha=0.12)
        if log_x:
            axis.set_xscale("log", base=2)
        axis.set_xticks(xs, [f"{x:g}" for x in xs])
        axis.set_xlabel(key, fontsize=8)
        axis.set_title(metric, fontsize=10)
        axis.grid(alpha=0.3)
    for index in range(len(metrics), lines * columns):
        axes[index // columns][index % columns].axis("off")
    handles, names = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, names, loc="lower center", ncol=min(len(names), 4), fontsize=8)
    figure.suptitle(
        f"{report['study']}: each number against {key}, mean and 95 % t-interval over seeds "
        "(dots: seeds; dashed: rows without it)",
        fontsize=10,
    )
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    picture = io.BytesIO()
    figure.savefig(picture, format="png", dpi=100)
    pyplot.close(figure)
    atomic_write_bytes(out, picture.getvalue())
    return out


def write_report(study_dir: Path) -> tuple[list[Path], str | None]:
    """Write report.json and report.md, then report.png and a ``report-KEY.png`` per swept
    grid key (`swept_keys`); the paths written and, when the pictures cannot be drawn (no
    matplotlib), the one line that says why."""
    report = build_report(study_dir)
    json_path, md_path, png_path = (study_dir / name for name in REPORT_FILES)
    atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
    atomic_write_text(md_path, markdown(report))
    written = [json_path, md_path]
    try:
        written.append(draw(report, png_path))
        for key in swept_keys(report):
            safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in key)
            written.append(draw_against(report, key, study_dir / f"report-{safe}.png"))
    except ZooError as error:
        return written, str(error)
    return written, None
