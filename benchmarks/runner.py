"""Run metrics over checkpoints and collect a report: the leaderboard behind `zoo bench`."""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import zoo
from benchmarks.metric import METRICS, BenchContext, BenchSettings, Metric
from zoo.checkpoint import CheckpointInfo, read_info
from zoo.device import pick_device
from zoo.errors import ZooError
from zoo.figures import Figure
from zoo.latent import load_split

log = logging.getLogger(__name__)

REPORT_FORMAT = "zoo-bench/1"


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
    figures: list[tuple[str, Figure]] = field(default_factory=list)
    figure_paths: list[str] = field(default_factory=list)  # filled when the report is written

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
            "figures": self.figure_paths,
        }


@dataclass
class BenchReport:
    settings: BenchSettings
    device: str
    metrics: list[str]
    results: list[ModelResult]
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

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
    checkpoints: list[Path], metric_names: list[str], settings: BenchSettings
) -> BenchReport:
    """Every metric on every checkpoint; a metric that cannot be computed is recorded, not fatal."""
    metrics: dict[str, Metric] = {name: METRICS.get(name)() for name in metric_names}
    device = pick_device(settings.device)
    tools: dict[str, Any] = {}
    results = []
    for checkpoint in checkpoints:
        model = zoo.load(checkpoint, device=device)
        result = ModelResult(Path(checkpoint), model.checkpoint_info)
        results.append(result)
        try:
            data = _split(tools, result.info, settings)
        except ZooError as error:
            result.errors = dict.fromkeys(metrics, str(error))
            continue
        context = BenchContext(
            model, Path(checkpoint), result.info, data, settings, device, tools, result.figures
        )
        for name, metric in metrics.items():
            started = time.perf_counter()
            log.info(
                "%s: %s on %d %s images", result.info.model_name, name, context.count, data.split
            )
            try:
                result.metrics[name] = metric.compute(context)
                result.headline.update(metric.headline(result.metrics[name]))
            except ZooError as error:
                result.errors[name] = str(error)
            log.info(
                "%s: %s took %.1f s", result.info.model_name, name, time.perf_counter() - started
            )
    return BenchReport(settings, str(device), list(metrics), results)


def _split(tools: dict[str, Any], info: CheckpointInfo, settings: BenchSettings):
    """The benchmark split for a checkpoint, loaded once per (data, split, size)."""
    key = f"split:{settings.data or info.data.get('root')}:{settings.split}:{info.preprocess}"
    if key not in tools:
        tools[key] = load_split(info, settings.data, settings.split)
    return tools[key]
