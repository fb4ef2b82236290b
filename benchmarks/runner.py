"""Run metrics over checkpoints and collect a report: the leaderboard behind `zoo bench`."""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import zoo
from benchmarks.metric import METRICS, BenchContext, BenchSettings, Memo, Metric
from zoo.checkpoint import read_info
from zoo.data import ImageData, checkpoint_data, checkpoint_source, held_out_split
from zoo.device import keep_freed_memory, pick_device
from zoo.errors import ZooError, failure_text
from zoo.figures import Figure
from zoo.metadata import CheckpointInfo

log = logging.getLogger(__name__)

REPORT_FORMAT = "zoo-bench/2"  # 2: each metric's options beside its result, not in settings


def latest_runs(runs_dir: str | Path) -> list[Path]:
    """The newest ``model.safetensors`` of every model name under ``runs_dir``."""
    newest: dict[str, tuple[float, Path]] = {}
    for path in sorted(Path(runs_dir).glob("*/model.safetensors")):
        try:
            name = read_info(path).model_name
        except ZooError as error:
            log.warning("skipping %s: %s", path, error)
            continue
        mtime = path.stat().st_mtime
        if name not in newest or mtime > newest[name][0]:
            newest[name] = (mtime, path)
    if not newest:
        raise ZooError(
            f"no trained models under {runs_dir}/; train one with `zoo train MODEL` "
            "or pass checkpoint files to zoo bench"
        )
    return [newest[name][1] for name in sorted(newest)]


@dataclass
class ModelResult:
    checkpoint: Path
    info: CheckpointInfo
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    headline: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    data_used: dict[str, dict[str, Any]] = field(default_factory=dict)  # per metric
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per metric: its Options
    wall_time_s: dict[str, float] = field(default_factory=dict)  # per metric, failed ones too
    data_note: str | None = None  # set when the data measured on is not the training data
    figures: list[tuple[str, Figure]] = field(default_factory=list)
    figure_paths: list[str] = field(default_factory=list)  # filled when the report is written
    card: dict[str, tuple[dict[str, float], dict[str, str]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.checkpoint),
            "model": self.info.model_name,
            "source": self.info.source,
            "config": self.info.config,
            "data": {k: v for k, v in self.info.data.items() if k != "attr_names"},
            "training": self.info.training,
            "metrics": self.metrics,
            "errors": self.errors,
            "data_used": self.data_used,
            "options": self.options,
            "wall_time_s": self.wall_time_s,
            "data_note": self.data_note,
            "figures": self.figure_paths,
        }


@dataclass
class BenchReport:
    settings: BenchSettings
    device: str
    metrics: list[str]
    results: list[ModelResult]
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # of the metrics run
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    @property
    def splits(self) -> str:
        """The splits the metrics measured (``--split``, or the held-out default per data)."""
        used = {data["split"] for r in self.results for data in r.data_used.values()}
        return ", ".join(sorted(used)) or str(self.settings.split or "none")

    @property
    def failed(self) -> bool:
        return any(result.errors for result in self.results)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": REPORT_FORMAT,
            "created": self.created,
            "settings": {**dataclasses.asdict(self.settings), "device": self.device},
            "metrics": self.metrics,
            "versions": {
                "zoo": zoo.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "results": [result.to_dict() for result in self.results],
        }


def run_bench(
    checkpoints: list[Path],
    metric_names: list[str],
    settings: BenchSettings,
    options: dict[str, Any] | None = None,
) -> BenchReport:
    """Every metric on every checkpoint, each with its `Metric.Options` (``options``, by
    metric name, from `resolve_options`; the defaults for the others); a metric that fails,
    for whatever reason, is recorded with the reason and the others still run (the CLI then
    exits 1)."""
    options = dict(options or {})
    metrics: dict[str, Metric] = {}
    unusable: dict[str, str] = {}  # metrics whose constructor raised
    for name in metric_names:
        try:
            metrics[name] = METRICS.get(name)()
            options.setdefault(name, type(metrics[name]).Options())
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # a plugin may raise anything
            unusable[name] = failure_text(error)
    recorded = {name: dataclasses.asdict(options[name]) for name in metrics}
    device = pick_device(settings.device)
    keep_freed_memory()
    memo = Memo()
    results = []
    for checkpoint in checkpoints:
        model = zoo.load(checkpoint, device=device)
        result = ModelResult(Path(checkpoint), model.checkpoint_info)
        results.append(result)
        result.errors.update(unusable)
        try:
            data = benchmark_split(memo, result.info, settings)
        except ZooError as error:
            result.errors = dict.fromkeys(metric_names, str(error))
            continue
        result.data_note = data_difference(result.info, data, settings.data)
        context = BenchContext(
            model=model,
            checkpoint=Path(checkpoint),
            info=result.info,
            data=data,
            settings=settings,
            device=device,
            metric_options=options,
            memo=memo,
            figures=result.figures,
        )
        for name, metric in metrics.items():
            started = time.perf_counter()
            log.info(
                "%s: %s on %d %s images", result.info.model_name, name, context.count, data.split
            )
            result.data_used[name] = metric.data_used(context)
            result.options[name] = recorded[name]
            try:
                result.metrics[name] = _checked(metric.compute(context))
                headline = metric.headline(result.metrics[name])
                result.headline.update(headline)
                result.card[name] = (metric.card_values(result.metrics[name]), headline)
            except KeyboardInterrupt:
                raise
            except BaseException as error:  # a metric, built-in or plugin, may raise anything
                result.metrics.pop(name, None)
                result.errors[name] = failure_text(error)
            result.wall_time_s[name] = round(time.perf_counter() - started, 3)
            log.info("%s: %s took %.1f s", result.info.model_name, name, result.wall_time_s[name])
    return BenchReport(settings, str(device), metric_names, results, recorded)


def _checked(result: Any) -> dict[str, Any]:
    """A metric's result as the report can store it: a dict that JSON can write."""
    if not isinstance(result, dict):
        raise TypeError(f"compute returned a {type(result).__name__}, not a dict")
    json.dumps(result)  # TypeError here, not later when the whole report is written
    return result


def data_difference(info: CheckpointInfo, data: ImageData, override: str | None) -> str | None:
    """Why the benchmark data is not the data the checkpoint records, or None if it is.

    A moved or deleted data folder makes `checkpoint_data` fall back to ``$ZOO_DATA``, ./data/celeba
    or the synthetic faces; the numbers are then about other images, which the user must know.
    """
    recorded_root, recorded_fingerprint = info.data.get("root"), info.data.get("fingerprint")
    if recorded_root == data.root and recorded_fingerprint == data.fingerprint:
        return None
    trained = f"trained on {recorded_root} (fingerprint {str(recorded_fingerprint)[:12]})"
    if recorded_fingerprint == data.fingerprint:
        return f"{trained}, measured on the same data found at {data.root}"
    if override:
        reason = f"--data {override} was given"
    elif recorded_root == data.root:
        reason = "the folder's content changed since training"
    else:
        reason = "that folder is gone, so the default data was used; pass --data to choose"
    measured = f"{data.name} at {data.root} (fingerprint {data.fingerprint[:12]})"
    return f"{trained}, measured on {measured}: {reason}"


def benchmark_split(memo: Memo, info: CheckpointInfo, settings: BenchSettings) -> ImageData:
    """The benchmark split for a checkpoint, loaded once per (data, split, size): ``--split``,
    else the data's test split when it has one, else its valid split (said once)."""
    split, source = settings.split, None
    if split is None:
        source = checkpoint_source(info, settings.data, progress=settings.progress)
        size = int(info.preprocess.get("image_size", 0))
        split = held_out_split(source, size, progress=settings.progress)
        if split != "test":
            memo.get("no-test-note", str(source.root), build=lambda: _no_test_note(source.root))
    return memo.get(  # the source resolved above is not resolved again
        "split",
        settings.data or info.data.get("root"),
        split,
        json.dumps(info.preprocess, sort_keys=True),
        build=lambda: checkpoint_data(info, split, settings.data, source=source),
    )


def _no_test_note(root: Any) -> None:
    log.warning(
        "%s has no test split: measuring on its valid split; keep images you never tune on in "
        "a test split (partition 2) to benchmark on held-out faces",
        root,
    )
