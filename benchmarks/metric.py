"""What a benchmark metric is, and the context it runs in.

A metric is a class registered under a name (built-ins here, third parties
through the ``zoo.metrics`` entry-point group). It receives a `BenchContext`
(one model, its checkpoint, the benchmark split, the settings every metric shares) and
returns a JSON-serialisable dict of numbers with the settings that produced them. A
metric that cannot be computed raises `ZooError` with the reason; the runner
records it (any other exception too, with its type), goes on with the other
metrics and exits non-zero at the end. `select_metrics` says which metrics a plain
`zoo bench` runs: every registered one, built-ins first, plugins after.

What only one metric reads is that metric's own option, declared with it: a dataclass
`Metric.Options` whose fields (int, float, str or bool, each optionally ``| None``) carry
their default and help (`option`). ``zoo bench --option METRIC.NAME=VALUE`` sets one
(`resolve_options`), ``zoo bench --help-metric METRIC`` lists them (`option_rows`), and
``context.options(self)`` gives a metric its resolved instance; the runner records it
with the metric's result.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from zoo.errors import ZooError
from zoo.registry import PluginRegistry

if TYPE_CHECKING:  # types of BenchContext's fields only: the CLI imports this module at start
    from zoo.data import ImageData
    from zoo.figures import Figure
    from zoo.metadata import CheckpointInfo
    from zoo.model import GenerativeModel

log = logging.getLogger(__name__)


@dataclass
class BenchSettings:
    """What every metric of a benchmark run shares; recorded with every number. A metric's
    own settings are its `Metric.Options`."""

    split: str | None = None  # None: the data's test split if it has one, else valid
    n: int | None = None  # images of the split to use (None: all)
    seed: int = 0  # of the generated images
    batch_size: int = 64  # of evaluation
    device: str = "auto"
    data: str | None = None  # override the checkpoints' own data
    classifiers: list[str] = field(default_factory=list)  # the ruler panel; default: found
    runs_dir: str = "runs"
    progress: bool = True


class Memo:
    """What a benchmark run builds once and reuses across metrics and models (a classifier,
    an FID extractor, a data split, a note said once), keyed by its kind and the parts that
    identify it."""

    def __init__(self) -> None:
        self._values: dict[tuple[Hashable, ...], Any] = {}

    def get(self, kind: str, *parts: Hashable, build: Callable[[], Any]) -> Any:
        """The value of ``(kind, *parts)``, built by ``build`` the first time it is asked for."""
        key = (kind, *parts)
        if key not in self._values:
            self._values[key] = build()
        return self._values[key]


@dataclass
class BenchContext:
    """One model under test, with the split it is measured on and shared, lazily built tools."""

    model: GenerativeModel
    checkpoint: Path
    info: CheckpointInfo
    data: ImageData  # the benchmark split, preprocessed as the model was trained
    settings: BenchSettings
    device: torch.device
    metric_options: dict[str, Any] = field(default_factory=dict)  # by metric name; see options
    memo: Memo = field(default_factory=Memo)  # shared across models (classifier, ...)
    figures: list[tuple[str, Figure]] = field(default_factory=list)  # (name, picture) to write

    def options(self, metric: Metric | type[Metric]) -> Any:
        """The metric's `Metric.Options` for this run: as ``--option`` set them, else the
        defaults. A metric may read another's (throughput times FID's extractors)."""
        cls = metric if isinstance(metric, type) else type(metric)
        given = self.metric_options.get(cls.registry_name)
        return given if given is not None else cls.Options()

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
            classifier, info = self.memo.get(
                "classifier", path, build=lambda path=path: load_classifier(path, self.device)
            )
            if info.image_size != size:  # said once per classifier and size in a benchmark run
                self.memo.get(
                    "classifier-size-note",
                    path,
                    size,
                    build=lambda info=info: self._resized_note(info, size),
                )
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


OPTION_TYPES = (int, float, str, bool)


def option(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] = (),
    low: float | None = None,
    high: float | None = None,
) -> Any:
    """A field of a metric's `Metric.Options`: its default, the help ``--help-metric``
    shows, and optionally the values it takes (``choices``, or a number in [low, high])."""
    metadata = {"help": help, "choices": choices, "low": low, "high": high}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class _OptionType:
    """A metric option's declared type: int, float, str or bool, and whether None is allowed."""

    kind: type
    optional: bool

    @classmethod
    def of(cls, hint: Any) -> _OptionType | None:
        """The type a field hint declares, or None when it is not an option type."""
        allowed = typing.get_args(hint)
        if typing.get_origin(hint) not in (typing.Union, types.UnionType):
            allowed = (hint,)
        kinds = [kind for kind in allowed if kind is not type(None)]
        if len(kinds) != 1 or kinds[0] not in OPTION_TYPES:
            return None
        return cls(kinds[0], len(kinds) < len(allowed))

    def holds(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if self.kind is float:
            return isinstance(value, int | float) and not isinstance(value, bool)
        return type(value) is self.kind

    def describe(self) -> str:
        return self.kind.__name__ + (" or none" if self.optional else "")


def _option_fields(options: type) -> list[tuple[dataclasses.Field, _OptionType | None]]:
    hints = typing.get_type_hints(options)
    return [(f, _OptionType.of(hints[f.name])) for f in dataclasses.fields(options)]


class Metric:
    """Base class of benchmark metrics. Subclasses set `title` and implement `compute`, and
    declare their own settings as a nested ``@dataclass class Options`` of `option` fields."""

    @dataclass(frozen=True)
    class Options:
        """A metric without options of its own."""

    registry_name: ClassVar[str] = ""
    title: ClassVar[str] = ""

    @classmethod
    def check_registrable(cls) -> None:
        """Refuse, at registration, a metric that does not implement compute and headline, or
        whose Options are not a dataclass of defaulted int, float, str and bool fields."""
        missing = [
            name for name in ("compute", "headline") if getattr(cls, name) is getattr(Metric, name)
        ]
        if missing:
            raise ZooError(f"{cls.__qualname__} does not implement {' and '.join(missing)}")
        if not (isinstance(cls.Options, type) and dataclasses.is_dataclass(cls.Options)):
            raise ZooError(f"{cls.__qualname__}.Options is not a dataclass")
        for spec, kind in _option_fields(cls.Options):
            where = f"{cls.__qualname__}.Options.{spec.name}"
            if kind is None:
                raise ZooError(f"{where} is not an int, float, str or bool (optionally | None)")
            if spec.default is dataclasses.MISSING or not kind.holds(spec.default):
                raise ZooError(f"{where} needs a default of type {kind.describe()}")

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
# built-ins a plain `zoo bench` leaves out: they need ground truth or scikit-learn (the
# disentanglement scores, leakage) or extract another feature set (KID, precision/recall)
OPT_IN_METRICS = ("kid", "prdc", "leakage", "mig", "sap", "dci", "factorvae", "betavae")


def register_metric(name: str, *, source: str = "zoo") -> Callable[[type], type]:
    """Class decorator: make a `Metric` subclass available to ``zoo bench --metric name``."""
    return METRICS.register(name, source=source)


def select_metrics(requested: list[str] | None = None) -> list[str]:
    """The metrics a benchmark runs: those `requested`, each looked up now so a misspelt name
    fails before any model loads; by default every one but `OPT_IN_METRICS`, so plugins are
    never left out: the built-ins, then plugin metrics by name (one that failed to load is
    reported, not skipped)."""
    if requested:
        for name in requested:
            METRICS.get(name)
        return list(requested)
    plugins = {*METRICS.names(), *(plugin.name for plugin in METRICS.all_broken())}
    return [*BUILTIN_METRICS, *sorted(plugins - {*BUILTIN_METRICS, *OPT_IN_METRICS})]


# -- metric options from the command line --------------------------------------------------------


@dataclass(frozen=True)
class OptionValue:
    """One metric option as the user gave it: ``--option METRIC.NAME=VALUE``, or a flag kept
    as an alias of one (``--fid-features VALUE``); `given_as` names it in errors."""

    metric: str
    name: str
    value: str
    given_as: str

    @classmethod
    def parse(cls, text: str) -> OptionValue:
        key, sep, value = text.partition("=")
        metric, dot, name = key.strip().rpartition(".")
        if not (sep and dot and metric and name):
            raise ZooError(
                f"--option {text!r} is not METRIC.NAME=VALUE (for example --option "
                "fid.features=classifier; zoo bench --help-metric METRIC lists a metric's options)"
            )
        return cls(metric, name.replace("-", "_"), value, f"--option {metric}.{name}")


def resolve_options(given: Iterable[OptionValue]) -> dict[str, Any]:
    """Each named metric's `Metric.Options`, its defaults replaced by the given values (parsed
    to the fields' types and checked); an unknown metric or option, a value given twice or
    one that does not parse is one line naming what is allowed."""
    values: dict[str, dict[str, Any]] = {}
    spelt: dict[tuple[str, str], str] = {}
    for item in given:
        try:
            cls = METRICS.get(item.metric)
        except ZooError as error:
            raise ZooError(f"{item.given_as}: {error}") from None
        fields = {spec.name: (spec, kind) for spec, kind in _option_fields(cls.Options)}
        if item.name not in fields:
            known = f"its options: {', '.join(fields)}" if fields else "it has none"
            raise ZooError(
                f"{item.given_as}: metric {item.metric} has no option {item.name!r}; {known} "
                f"(zoo bench --help-metric {item.metric})"
            )
        earlier = spelt.setdefault((item.metric, item.name), item.given_as)
        if earlier != item.given_as or item.name in values.get(item.metric, {}):
            raise ZooError(
                f"{item.metric}.{item.name} is given twice ({earlier} and {item.given_as}); "
                "give it once"
            )
        spec, kind = fields[item.name]
        values.setdefault(item.metric, {})[item.name] = _parse(item, spec, kind)
    return {metric: METRICS.get(metric).Options(**named) for metric, named in values.items()}


def _parse(item: OptionValue, spec: dataclasses.Field, kind: _OptionType) -> Any:
    """``item.value`` as the field's type: int, float (finite), bool (true/false, yes/no,
    on/off, 1/0), str; ``none`` for an optional field; within its choices and range."""
    text = item.value.strip()
    if kind.optional and text.lower() in ("none", "null"):
        return None
    meta = spec.metadata
    try:
        if kind.kind is bool:
            value: Any = {"true": True, "yes": True, "on": True, "1": True}.get(text.lower())
            if value is None and text.lower() not in ("false", "no", "off", "0"):
                raise ValueError(text)
            value = bool(value)
        elif kind.kind is str:
            value = item.value
        else:
            value = kind.kind(text)
            if not math.isfinite(value):
                raise ValueError(text)
    except ValueError:
        raise ZooError(f"{item.given_as} must be {_what(kind, meta)}, got {item.value!r}") from None
    choices, low, high = meta.get("choices") or (), meta.get("low"), meta.get("high")
    if (
        (choices and value not in choices)
        or (low is not None and value < low)
        or (high is not None and value > high)
    ):
        raise ZooError(f"{item.given_as} must be {_what(kind, meta)}, got {item.value!r}")
    return value


def _what(kind: _OptionType, meta: Mapping[str, Any]) -> str:
    """What a field takes, as the end of "must be ...": "an int in [1, 65536]", "one of a, b"."""
    choices, low, high = meta.get("choices") or (), meta.get("low"), meta.get("high")
    if choices:
        text = "one of " + ", ".join(choices)
    else:
        text = {
            int: "an integer",
            float: "a finite number",
            bool: "true or false",
            str: "a string",
        }[kind.kind]
        if low is not None and high is not None:
            text += f" in [{low:g}, {high:g}]"
        elif low is not None:
            text += f" of at least {low:g}"
        elif high is not None:
            text += f" of at most {high:g}"
    return text + (" or none" if kind.optional else "")


def option_rows(name: str) -> list[tuple[str, str, str, str]]:
    """(option, what it takes, default, help) for each option of metric ``name``, the
    defaults read from its Options dataclass."""
    cls = METRICS.get(name)
    rows = []
    for spec, kind in _option_fields(cls.Options):
        default = "none" if spec.default is None else str(spec.default)
        help_text = str(spec.metadata.get("help", ""))
        rows.append((spec.name, _what(kind, spec.metadata), default, help_text))
    return rows
