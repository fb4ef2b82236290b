"""The study file (TOML) and the cells it names.

A study file holds plain values only; every option in it is an option of the zoo command it
goes to (`[train]` and the rows' extra keys: `zoo train`; `[bench]`: `zoo bench`;
`[classifier]`: `zoo train-classifier`), spelt as on the command line without the dashes, so
the study runs exactly the commands a user would type. Keys the commands do not have are
refused when the file is read, not when the first cell runs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zoo.errors import ZooError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover (Python 3.10)
    import tomli as tomllib

CELLS_DIR = "cells"
CELL_FILE = "cell.json"  # the cell's resolved settings and commands, beside its results
STUDY_COPY = "study.toml"  # the study file as last run, kept in the study folder
# options the study sets itself, per command: a study file cannot set them
OWNED = {
    "train": {"out", "resume", "seed", "progress", "help"},
    "bench": {"out", "runs", "progress", "help", "help_metric", "checkpoints"},
    "train-classifier": {"out", "resume", "progress", "help", "data", "image_size"},
}
PATH_KEYS = {"data", "classifier"}
# a model's name becomes a folder name: letters, digits, '.', '_', '-' (as registry names are)
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
STUDY_KEYS = {"name", "seeds", "baseline", "train", "grid", "models", "bench", "classifier"}
ROW_KEYS = {"name", "label", "option", "grid"}
# metrics whose scores need an attribute classifier (a ruler); a study trains one for them
CLASSIFIER_METRICS = {"edit", "fid", "kid", "prdc"}  # fid, kid, prdc: in its features


@dataclass(frozen=True)
class Cell:
    """One unit of work: a folder, its kind (``model`` or ``classifier``) and its commands.

    ``commands`` are zoo argument lists without the program; ``needs`` is the classifier cell
    whose weights the bench command reads (None: none, or a file the study names)."""

    name: str
    kind: str
    row: str
    label: str
    seed: int | None
    commands: dict[str, list[str]]
    settings: dict[str, Any]
    needs: str | None = None

    def folder(self, study_dir: Path) -> Path:
        return study_dir / CELLS_DIR / self.name

    def record(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Study:
    """A study file, read: its cells in run order (classifiers first) and its baseline row."""

    name: str
    cells: list[Cell]
    baseline: str | None
    rows: dict[str, str] = field(default_factory=dict)  # row key -> label, in the file's order
    grids: dict[str, dict[str, Any]] = field(default_factory=dict)  # row key -> its grid point

    def model_cells(self) -> list[Cell]:
        return [cell for cell in self.cells if cell.kind == "model"]


def short_hash(value: Any) -> str:
    """Eight hex digits of the canonical JSON of ``value``: a folder name that changes with
    any setting and with nothing else."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def flags(options: Mapping[str, Any]) -> list[str]:
    """Command-line arguments for ``options`` (names as in the file): ``--name value``,
    ``--name``/``--no-name`` for booleans, one ``--name value`` per item of a list."""
    arguments: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            arguments.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            for item in value:
                arguments += [flag, _text(item)]
        else:
            arguments += [flag, _text(value)]
    return arguments


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _seeds(value: Any, where: str) -> list[int]:
    if isinstance(value, bool):
        raise ZooError(f"{where}: seeds must be a count or a list of integers")
    if isinstance(value, int):
        if value < 1:
            raise ZooError(f"{where}: seeds = {value} must be at least 1")
        return list(range(value))
    if (
        isinstance(value, list)
        and value
        and all(isinstance(s, int) and not isinstance(s, bool) for s in value)
    ):
        if len(set(value)) != len(value):
            raise ZooError(f"{where}: seeds {value} repeat a seed")
        return list(value)
    raise ZooError(f"{where}: seeds must be a count or a non-empty list of integers")


def _table(data: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ZooError(f"{where}: [{key}] must be a table of options")
    return dict(value)


def _paths(options: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative data and classifier paths are relative to the study file, so a study runs the
    same from any working directory (and on a cluster's compute nodes)."""

    def resolve(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        prefix, sep, rest = value.partition(":")
        if sep and prefix == "mnist":
            return f"mnist:{(base / Path(rest).expanduser()).resolve()}"
        return str((base / Path(value).expanduser()).resolve())

    for key in PATH_KEYS & set(options):
        value = options[key]
        options[key] = [resolve(v) for v in value] if isinstance(value, list) else resolve(value)
    return options


def _check_options(
    options: Mapping[str, Any], command: str, known: Mapping[str, set[str]], where: str
) -> None:
    names = known[command]
    for key, value in options.items():
        name = key.replace("-", "_")
        if name in OWNED[command]:
            raise ZooError(f"{where}: {key} is set by the study itself; leave it out")
        if name not in names:
            raise ZooError(
                f"{where}: `zoo {command}` has no option {key!r} (see zoo {command} --help)"
            )
        if isinstance(value, dict) or (
            isinstance(value, list) and any(isinstance(item, dict | list) for item in value)
        ):
            raise ZooError(f"{where}: {key} must be a plain value or a list of them")


def _row_label(model: str, label: str | None, point: Mapping[str, Any]) -> str:
    return " ".join([label or model, *(f"{key}={_text(value)}" for key, value in point.items())])


def load_study(path: Path, known: Mapping[str, set[str]]) -> Study:
    """Read a study file; ``known`` holds each command's option names (underscored), from the
    command line itself. Every mistake is one `ZooError` line naming the file."""
    where = str(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ZooError(f"{where}: no such study file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ZooError(f"{where}: cannot read it ({error})") from None
    except tomllib.TOMLDecodeError as error:
        raise ZooError(f"{where}: not valid TOML ({error})") from None
    unknown = set(data) - STUDY_KEYS
    if unknown:
        raise ZooError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; a study has "
            f"{', '.join(sorted(STUDY_KEYS))}"
        )
    seeds = _seeds(data.get("seeds", 1), where)
    train = _paths(_table(data, "train", where), path.parent)
    bench = _paths(_table(data, "bench", where), path.parent)
    classifier_options = _table(data, "classifier", where)
    grid = _table(data, "grid", where)
    _check_options(train, "train", known, f"{where} [train]")
    _check_options(bench, "bench", known, f"{where} [bench]")
    _check_options(classifier_options, "train-classifier", known, f"{where} [classifier]")
    rows = data.get("models")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ZooError(f'{where}: name at least one model, as [[models]] name = "cvae"')

    metrics = bench.get("metric")
    metrics = [metrics] if isinstance(metrics, str) else metrics
    given_classifier = bench.get("classifier")
    wants_classifier = given_classifier is None and (
        metrics is None or bool(CLASSIFIER_METRICS & set(metrics)) or bool(classifier_options)
    )

    classifier_cells: dict[str, Cell] = {}
    model_cells: list[Cell] = []
    labels: dict[str, str] = {}
    grids: dict[str, dict[str, Any]] = {}
    for index, row in enumerate(rows):
        row_where = f"{where} [[models]] #{index + 1}"
        model = row.get("name")
        if not isinstance(model, str) or not MODEL_NAME.fullmatch(model):
            raise ZooError(
                f"{row_where}: needs name = a registered model (see zoo list), got {model!r}"
            )
        row_train = {k: v for k, v in row.items() if k not in ROW_KEYS}
        _check_options(row_train, "train", known, row_where)
        model_options = row.get("option", [])
        if not isinstance(model_options, list) or not all(
            isinstance(o, str) and "=" in o for o in model_options
        ):
            raise ZooError(f'{row_where}: option must be a list of "KEY=VALUE" strings')
        row_grid = row.get("grid", grid)
        if not isinstance(row_grid, dict):
            raise ZooError(f"{row_where}: grid must be a table of lists")
        for key, values in row_grid.items():
            if not isinstance(values, list) or not values:
                raise ZooError(f"{row_where}: grid {key} must be a non-empty list of values")
        names = list(row_grid)
        for values in itertools.product(*(row_grid[name] for name in names)):
            point = dict(zip(names, values, strict=True))
            options = {**train, **row_train}
            model_config = list(model_options)
            for key, value in point.items():
                if key.replace("-", "_") in known["train"] - OWNED["train"]:
                    options[key] = value
                else:  # a model config field: zoo train's -o KEY=VALUE
                    model_config.append(f"{key}={_text(value)}")
            classifier_name = None
            if wants_classifier:
                classifier_settings = {
                    "data": options.get("data"),
                    "image_size": options.get("image_size"),
                    "options": classifier_options,
                }
                classifier_name = f"classifier-{short_hash(classifier_settings)}"
                if classifier_name not in classifier_cells:
                    where_data = {
                        k: v
                        for k, v in (
                            ("data", options.get("data")),
                            ("image_size", options.get("image_size")),
                        )
                        if v is not None
                    }
                    classifier_cells[classifier_name] = Cell(
                        name=classifier_name,
                        kind="classifier",
                        row=classifier_name,
                        label=classifier_name,
                        seed=None,
                        commands={"train-classifier": flags({**where_data, **classifier_options})},
                        settings=classifier_settings,
                    )
            settings = {
                "model": model,
                "train": options,
                "model_options": model_config,
                "bench": bench,
                "classifier": classifier_name or given_classifier,
            }
            row_key = f"{model}-{short_hash(settings)}"
            label = _row_label(model, row.get("label"), point)
            if row_key in labels:
                raise ZooError(f"{row_where}: {label} repeats the row {labels[row_key]}")
            labels[row_key] = label
            grids[row_key] = dict(point)
            for seed in seeds:
                model_cells.append(
                    Cell(
                        name=f"{row_key}-s{seed}",
                        kind="model",
                        row=row_key,
                        label=label,
                        seed=seed,
                        commands={
                            "train": [
                                model,
                                *flags(options),
                                *(a for o in model_config for a in ("--option", o)),
                                "--seed",
                                str(seed),
                            ],
                            "bench": flags(bench),
                        },
                        settings={**settings, "seed": seed},
                        needs=classifier_name,
                    )
                )
    baseline = data.get("baseline")
    if baseline is not None:
        matches = [key for key, label in labels.items() if label == baseline]
        if not isinstance(baseline, str) or not matches:
            raise ZooError(
                f"{where}: baseline {baseline!r} is not a row; the rows are "
                + ", ".join(repr(label) for label in labels.values())
            )
        baseline = matches[0]
    name = data.get("name", path.stem)
    if not isinstance(name, str):
        raise ZooError(f"{where}: name must be a string")
    # seed by seed across rows, so a study stopped early still has whole pairs to compare
    model_cells.sort(key=lambda cell: seeds.index(cell.seed))
    return Study(
        name=name,
        cells=[*classifier_cells.values(), *model_cells],
        baseline=baseline,
        rows=labels,
        grids=grids,
    )
