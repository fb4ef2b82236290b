"""A model card beside every checkpoint: ``README.md`` in the Hugging Face model-card format.

The card answers "what is this file?" for a person: YAML front matter (``library_name: zoo``,
tags, datasets, and a ``model-index`` with the benchmark numbers once there are some), then the
model family and paper, its config, the data it was trained on, the training summary, the
latest sample grid and the loss curves, the benchmark results and how to load it. Everything
comes from the checkpoint's own metadata and from ``bench_results.json`` in the same folder,
where `zoo bench` records each metric's numbers (a newer result of the same metric and
settings replaces the older one), so `zoo train` and `zoo bench` rewrite the same card.

Every name in it (run folder, model, attributes, plugin, data) comes from files, so it is
escaped for Markdown and written to the YAML as a string that reads back exactly
(`zoo.names`). The card ends with a signature line holding the sha256 of the text above it:
zoo rewrites a card only while that matches, so a card a person wrote, or edited, is left
alone. Results and cards are updated under a lock in the run folder, so two `zoo bench`
processes on one checkpoint keep both results.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from zoo.checkpoint import read_info
from zoo.curves import CURVES_FILE
from zoo.errors import ZooError
from zoo.files import WriteFailed, atomic_write_text, exclusive_lock
from zoo.hub import is_export
from zoo.metadata import CheckpointInfo
from zoo.names import code_fence, markdown_code, markdown_text, printable, yaml_string
from zoo.registry import MODELS

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
BENCH_FILE = "bench_results.json"
LOCK_FILE = ".zoo-card.lock"
MAX_BENCH_BYTES = 8 * 1024 * 1024  # thousands of results; anything larger is not zoo's record
SIGNATURE = re.compile(rb"<!-- zoo model card, sha256:([0-9a-f]{64})[^\n]*-->\n?\Z")
SIGNATURE_NOTE = "zoo rewrites this card while the text above is unchanged; edit it to keep it"


def card_path(checkpoint: Path) -> Path:
    return Path(checkpoint).with_name(CARD_FILE)


def signed(text: str) -> str:
    """``text`` with zoo's signature line: the sha256 of everything above it."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return f"{text}<!-- zoo model card, sha256:{digest}: {SIGNATURE_NOTE} -->\n"


def is_zoo_card(data: bytes) -> bool:
    """Whether a README is a card zoo wrote and nobody changed since (its signature holds)."""
    match = SIGNATURE.search(data)
    return bool(match) and hashlib.sha256(data[: match.start()]).hexdigest() == match[1].decode()


@contextlib.contextmanager
def run_folder_lock(checkpoint: Path) -> Iterator[None]:
    """Processes updating one checkpoint's results and card take turns."""
    with exclusive_lock(Path(checkpoint).with_name(LOCK_FILE)):
        yield


# -- bench_results.json ----------------------------------------------------------------------------


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _valid_entry(entry: Any) -> bool:
    """One result as `record_bench_result` writes it: texts, flat settings, finite numbers."""
    if not isinstance(entry, dict):
        return False
    fields = {"metric": str, "settings": dict, "values": dict, "headline": dict, "data": dict}
    if not all(isinstance(entry.get(k), kind) for k, kind in fields.items()):
        return False
    return (
        isinstance(entry.get("date"), str)
        and all(_scalar(v) for v in (*entry["settings"].values(), *entry["data"].values()))
        and all(isinstance(k, str) and _finite(v) for k, v in entry["values"].items())
        and all(isinstance(v, str) for v in entry["headline"].values())
    )


def load_bench_results(path: Path) -> tuple[dict[str, dict[str, Any]], str | None]:
    """The valid results of a ``bench_results.json`` and what is wrong with the file (None
    when nothing is, or when there is no file)."""
    try:
        size = path.stat().st_size
        if size > MAX_BENCH_BYTES:
            return {}, f"it is {size:,} bytes, far more than zoo writes"
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return {}, None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        return {}, f"it is not readable JSON ({type(error).__name__})"
    if not isinstance(data, dict):
        return {}, "it does not hold a JSON object"
    results = {key: entry for key, entry in data.items() if _valid_entry(entry)}
    if len(results) < len(data):
        return results, f"{len(data) - len(results)} of its {len(data)} results are malformed"
    return results, None


def read_bench_results(checkpoint: Path) -> dict[str, dict[str, Any]]:
    """The benchmark results recorded beside a checkpoint, by metric and settings; a damaged
    file gives its readable results and one warning (the next `zoo bench` keeps it aside)."""
    path = Path(checkpoint).with_name(BENCH_FILE)
    results, problem = load_bench_results(path)
    if problem:
        log.warning("%s is damaged (%s); %d readable result(s) shown", path, problem, len(results))
    return results


def _keep_aside(path: Path, problem: str, carried: int) -> None:
    """Move a damaged results file out of the way, under a name that says so, with one line."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    suffix = 1
    while aside.exists():
        suffix += 1
        aside = path.with_name(f"{path.name}.damaged-{stamp}-{suffix}")
    try:
        os.replace(path, aside)
    except OSError as error:
        raise WriteFailed(aside, error) from None
    log.warning(
        "%s was damaged (%s); kept as %s, its %d readable result(s) carried over",
        path,
        problem,
        aside.name,
        carried,
    )


def record_bench_result(
    checkpoint: Path,
    metric: str,
    settings: dict[str, Any],
    values: dict[str, float],
    headline: dict[str, str],
    data: dict[str, Any],
) -> None:
    """Add one metric's numbers to the checkpoint's record, replacing an older result of the
    same metric and settings, and rewrite its card; under the run folder's lock."""
    path = Path(checkpoint).with_name(BENCH_FILE)
    key = json.dumps({"metric": metric, "settings": settings}, sort_keys=True)
    entry = {
        "metric": metric,
        "settings": settings,
        "values": values,
        "headline": headline,
        "data": data,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    with run_folder_lock(checkpoint):
        results, problem = load_bench_results(path)
        if problem:
            _keep_aside(path, problem, len(results))
        results[key] = entry
        atomic_write_text(path, json.dumps(results, indent=2) + "\n")
        _write_card(checkpoint)


def write_card(checkpoint: Path) -> Path | None:
    """Write (or rewrite) the card beside ``checkpoint``; None when a README.md that zoo did
    not write, or one edited since, is there (it is left alone, with a warning)."""
    with run_folder_lock(checkpoint):
        return _write_card(checkpoint)


def _write_card(checkpoint: Path) -> Path | None:
    path = card_path(checkpoint)
    with contextlib.suppress(FileNotFoundError):
        if not is_zoo_card(path.read_bytes()):
            log.warning("%s was not written by zoo, or was edited since; it is left as it is", path)
            return None
    atomic_write_text(path, signed(render_card(read_info(Path(checkpoint)))))
    return path


def front_matter(info: CheckpointInfo, results: dict[str, dict[str, Any]]) -> str:
    """The YAML header: what the Hub and tools index (library, tags, data, metrics). Every
    string is double-quoted YAML that reads back exactly (`yaml_string`)."""
    model_class = about(info).model_class
    tags = ["zoo", info.model_name, "vae", "image-generation"]
    if model_class is not None and model_class.conditional:
        tags.append("conditional-generation")
    dataset = str(info.data.get("name", "unknown"))
    lines = ["---", "library_name: zoo", "tags:"]
    lines += [f"- {yaml_string(tag)}" for tag in dict.fromkeys(tags)]
    lines += ["datasets:", f"- {yaml_string(dataset)}"]
    if results:
        lines += [
            "model-index:",
            f"- name: {yaml_string(Path(info.path).parent.name)}",
            "  results:",
        ]
        for entry in results.values():
            data = entry["data"]
            name = str(data.get("name") or dataset)
            split = str(data.get("split") or entry["settings"].get("split") or "")
            lines += [
                "  - task:",
                f"      type: {yaml_string('image-generation')}",
                "    dataset:",
                f"      name: {yaml_string(name)}",
                f"      type: {yaml_string(name)}",
                f"      split: {yaml_string(split)}",
                "    metrics:",
            ]
            for metric_name, value in entry["values"].items():
                lines += [
                    f"    - type: {yaml_string(entry['metric'])}",
                    f"      name: {yaml_string(metric_name)}",
                    f"      value: {json.dumps(value)}",
                ]
    return "\n".join([*lines, "---"])


@dataclass(frozen=True)
class About:
    """What a checkpoint is, beyond its header: what `zoo info` and the model card both say."""

    model_class: Any  # None for a plugin model not installed here
    family: str  # "" when the class does not say (or is not installed)
    paper: str
    source: str  # the distribution that provides the class, with the version recorded


def about(info: CheckpointInfo) -> About:
    """The checkpoint's registered model class and what it says of itself; a plugin not
    installed here still gets everything the file says."""
    try:
        model_class = MODELS.get(info.model_name)
    except ZooError:  # a plugin model that is not installed here: the card still renders
        model_class = None
    return About(
        model_class=model_class,
        family=getattr(model_class, "family", "") or "",
        paper=getattr(model_class, "paper", "") or "",
        source=" ".join(filter(None, [info.source, info.source_version])),
    )


def _code_block(language: str, body: str) -> str:
    fence = code_fence(body)
    return f"{fence}{language}\n{body}\n{fence}"


def _value(value: Any) -> str:
    """A metadata value as inline code: JSON for numbers and structures, text as itself."""
    return markdown_code(value if isinstance(value, str) else json.dumps(value))


def _results_table(results: dict[str, dict[str, Any]]) -> str:
    rows = [
        "| metric | numbers | split | n | settings | date |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for entry in results.values():
        used = entry["data"]
        numbers = ", ".join(f"{k} {v}" for k, v in entry["headline"].items())
        settings = ", ".join(
            f"{k}={str(v)[:12] if k == 'data' else v}"
            for k, v in entry["settings"].items()
            if v is not None and k != "split"
        )
        cells = [
            markdown_code(entry["metric"]),
            markdown_text(numbers),
            markdown_code(str(used.get("split", "?"))),
            markdown_code(str(used.get("n", "?"))),
            markdown_code(settings),
            markdown_text(entry["date"]),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "## Results (zoo bench)\n\n" + "\n".join(rows)


def _how_to_load(info: CheckpointInfo, model_class: Any) -> str:
    name = Path(info.path).name
    conditional = info.attr_names and getattr(model_class, "conditional", True)
    python = f"import zoo\n\nmodel = zoo.load({name!r})\n" + (
        "images = model.generate(8, y)  # y: 8 x A labels in {0, 1}, in the order above"
        if conditional
        else "images = model.generate(8)"
    )
    quoted = shlex.quote(printable(name))  # a name the file system allows but UTF-8 does not
    shell = f"zoo generate {quoted} -n 16 --out samples.png\nzoo info {quoted}"
    exported = is_export(Path(info.path).parent)
    hub = (
        "\n\nUploaded as a hub model repo (this folder is one, written by `zoo export`), it loads "
        "with `zoo.load(\"hf-hub:ORG/NAME\")` (`pip install 'zoo[hub]'`)."
        if exported
        else ""
    )
    return (
        f"## How to load\n\nFrom this folder ({markdown_code(Path(info.path).parent.name)}); "
        "the file alone rebuilds the model, no pickle:\n\n"
        + _code_block("python", python)
        + "\n\n"
        + _code_block("sh", shell)
        + hub
    )


def render_card(info: CheckpointInfo) -> str:
    """The card's Markdown for a checkpoint, from its metadata and recorded results."""
    run_dir = Path(info.path).parent
    results = read_bench_results(Path(info.path))
    described = about(info)
    model_class, family, paper = described.model_class, described.family, described.paper
    family = family or info.model_name
    training, data = info.training, info.data
    attributes = ", ".join(markdown_code(name) for name in info.attr_names) or "none"
    sections = [
        front_matter(info, results),
        f"# {markdown_code(run_dir.name)}: {markdown_code(info.model_name)} "
        f"({markdown_text(family)})",
        f"A {markdown_text(family)} trained with zoo on "
        f"{markdown_code(str(data.get('name', 'its data')))}."
        + (f" Method: {markdown_text(paper)}." if paper else "")
        + f" Model class from {markdown_code(info.source)}.",
        "## Config\n\n" + _code_block("json", json.dumps(info.config, indent=2)),
        "## Data\n\n"
        + "\n".join(
            [
                f"- name: {_value(data.get('name', '?'))}",
                f"- split: {_value(data.get('split', '?'))} ({_value(data.get('n', '?'))} images)",
                f"- fingerprint: {_value(data.get('fingerprint', '?'))}",
                f"- preprocessing: {_value(info.preprocess)}",
                f"- attributes ({len(info.attr_names)}): {attributes}",
            ]
        ),
        "## Training\n\n"
        + "\n".join(
            f"- {markdown_text(key)}: {_value(value)}"
            for key, value in training.items()
            if key != "versions"
        )
        + f"\n- versions: {_value(training.get('versions', {}))}",
    ]
    pictures = []
    samples = sorted((run_dir / "samples").glob("step_*.png"))
    if samples:  # zoo names these files itself (step_0000030.png): nothing to escape
        pictures.append(f"Latest sample grid:\n\n![samples](samples/{samples[-1].name})")
    if (run_dir / CURVES_FILE).is_file():
        pictures.append(f"Loss curves:\n\n![curves]({CURVES_FILE})")
    if pictures:
        sections.append("## Pictures\n\n" + "\n\n".join(pictures))
    if results:
        sections.append(_results_table(results))
    sections.append(_how_to_load(info, model_class))
    return "\n\n".join(sections) + "\n"
