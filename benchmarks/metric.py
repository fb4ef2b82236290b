"""What a benchmark metric is, and the context it runs in.

A metric is a class registered under a name (built-ins here, third parties
through the ``zoo.metrics`` entry-point group). It receives a `BenchContext`
(one model, its checkpoint, the benchmark split, the settings) and returns a
JSON-serialisable dict of numbers with the settings that produced them. A
metric that cannot be computed raises `ZooError` with the reason; the runner
records it (any other exception too, with its type), goes on with the other
metrics and exits non-zero at the end. `select_metrics` says which metrics a plain
`zoo bench` runs: every registered one, built-ins first, plugins after.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from zoo.data import ImageData
from zoo.errors import ZooError
from zoo.figures import Figure
from zoo.metadata import CheckpointInfo
from zoo.model import GenerativeModel
from zoo.registry import PluginRegistry

log = logging.getLogger(__name__)


@dataclass
class BenchSettings:
    """Everything that defines a benchmark run; recorded with every number."""

    split: str | None = None  # None: the data's test split if it has one, else valid
    n: int | None = None  # images of the split to use (None: all)
    seed: int = 0
    batch_size: int = 64
    device: str = "auto"
    data: str | None = None  # override the checkpoints' own data
    fid_features: str = "inception"  # "inception" or "classifier"
    fid_weights: str | None = None
    classifiers: list[str] = field(default_factory=list)  # the ruler panel; default: found
    runs_dir: str = "runs"
    edit_strength: float = 1.0  # concept-vector multiplier (unconditional models)
    edit_intensity: float | None = None  # scale of every edit; None: tuned, else 1
    throughput_batch_size: int = 64
    precision: str = "auto"  # of the throughput measurements; quality metrics run in fp32
    throughput_repeats: int = 5
    progress: bool = True


@dataclass
class BenchContext:
    """One model under test, with the split it is measured on and shared, lazily built tools."""

    model: GenerativeModel
    checkpoint: Path
    info: CheckpointInfo
    data: ImageData  # the benchmark split, preprocessed as the model was trained
    settings: BenchSettings
    device: torch.device
    tools: dict[str, Any] = field(default_factory=dict)  # shared across models (classifier, ...)
    figures: list[tuple[str, Figure]] = field(default_factory=list)  # (name, picture) to write

    @property
    def labels(self) -> torch.Tensor | None:
        """The split's attributes in the model's order, for conditional models."""
        return self.data.labels(self.info.attr_names) if self.model.conditional else None

    @property
    def count(self) -> int:
        """How many images of the split the metrics use (``--n``, capped at the split size)."""
        return len(self.data) if self.settings.n is None else min(self.settings.n, len(self.data))

    def data_record(self, n: int | None = None) -> dict[str, Any]:
        """Which images a metric measured: the data's folder, fingerprint and split, and how
        many of its images (default: `count`), as results.json records it per metric."""
        return {
            "name": self.data.name,
            "path": self.data.root,
            "fingerprint": self.data.fingerprint,
            "split": self.data.split,
            "n": self.count if n is None else n,
        }

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """(index, images on the device, model-order labels on the device or None) batches."""
        labels = self.labels
        for start in range(0, self.count, self.settings.batch_size):
            index = torch.arange(start, min(start + self.settings.batch_size, self.count))
            images, _ = self.data.batch(index, self.device)
            y = labels[index].to(self.device) if labels is not None else None
            yield index, images, y

    def rulers(self) -> list[tuple[Any, Any]]:
        """The panel of (AttributeClassifier, ClassifierInfo) that scores this model, loaded once.

        ``--classifier PATH`` (repeatable) wins; otherwise every classifier under the runs
        folder trained on data with the same fingerprint and image size, newest first.
        """
        from benchmarks.classifier import find_classifiers, load_classifier

        size = int(self.info.preprocess.get("image_size", 0))
        paths = self.settings.classifiers or find_classifiers(
            self.info.data.get("fingerprint", ""), size, self.settings.runs_dir
        )
        if not paths:
            root = self.info.data.get("root", "DIR")
            raise ZooError(
                f"no attribute classifier for {root} at {size} px under {self.settings.runs_dir}/; "
                f"train one with: zoo train-classifier --data {root} --image-size {size}"
            )
        panel = []
        for path in paths:
            classifier, info = self.shared(
                f"classifier:{path}", lambda path=path: load_classifier(path, self.device)
            )
            if info.image_size != size:  # said once per classifier and size in a benchmark run
                note = f"classifier-size:{path}:{size}"
                self.shared(note, lambda info=info: self._resized_note(info, size))
            panel.append((classifier, info))
        return panel

    def classifier(self) -> tuple[Any, Any]:
        """The panel's first ruler (the first ``--classifier``, else the newest found): the one
        whose features give FD-attr."""
        return self.rulers()[0]

    def _resized_note(self, info: Any, size: int) -> None:
        root = self.info.data.get("root", "DIR")
        log.warning(
            "the classifier %s was trained on %d px images; this model's %d px images are "
            "resized for it, so its edit and FD-attr numbers are not a %d px classifier's; "
            "train one with: zoo train-classifier --data %s --image-size %d",
            info.path, info.image_size, size, size, root, size,
        )  # fmt: skip

    def shared(self, key: str, build: Callable[[], Any]) -> Any:
        """Build a tool once per benchmark run (e.g. the attribute classifier) and reuse it."""
        if key not in self.tools:
            self.tools[key] = build()
        return self.tools[key]


class Metric:
    """Base class of benchmark metrics. Subclasses set `title` and implement `compute`."""

    registry_name: ClassVar[str] = ""
    title: ClassVar[str] = ""

    @classmethod
    def check_registrable(cls) -> None:
        """Refuse, at registration, a metric that does not implement compute and headline."""
        missing = [
            name for name in ("compute", "headline") if getattr(cls, name) is getattr(Metric, name)
        ]
        if missing:
            raise ZooError(f"{cls.__qualname__} does not implement {' and '.join(missing)}")

    def compute(self, context: BenchContext) -> dict[str, Any]:
        raise NotImplementedError

    def headline(self, result: dict[str, Any]) -> dict[str, str]:
        """The few numbers that go into the leaderboard table, formatted, keyed by column."""
        raise NotImplementedError

    def card_values(self, result: dict[str, Any]) -> dict[str, float]:
        """The headline numbers unformatted, for a model card's ``model-index``: by default each
        headline that reads as a plain number; metrics override it to give full precision."""
        values = {}
        for name, text in self.headline(result).items():
            try:
                values[name] = float(text)
            except ValueError:
                continue
        return values

    def data_used(self, context: BenchContext) -> dict[str, Any]:
        """The images this metric measures (`BenchContext.data_record`); metrics that use
        another number of them override it."""
        return context.data_record()


METRICS: PluginRegistry[type[Metric]] = PluginRegistry(
    "zoo.metrics", "metric", Metric, "benchmarks.builtin"
)


BUILTIN_METRICS = ("fid", "recon", "edit", "throughput")  # in leaderboard order


def register_metric(name: str, *, source: str = "zoo") -> Callable[[type], type]:
    """Class decorator: make a `Metric` subclass available to ``zoo bench --metric name``."""
    return METRICS.register(name, source=source)


def select_metrics(requested: list[str] | None = None) -> list[str]:
    """The metrics a benchmark runs: those `requested`, each looked up now so a misspelt name
    fails before any model loads; by default every one, so plugins are never left out: the
    built-ins, then plugin metrics by name (one that failed to load is reported, not skipped)."""
    if requested:
        for name in requested:
            METRICS.get(name)
        return list(requested)
    plugins = {*METRICS.names(), *(plugin.name for plugin in METRICS.all_broken())}
    return [*BUILTIN_METRICS, *sorted(plugins - set(BUILTIN_METRICS))]
