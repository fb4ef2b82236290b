"""A model card beside every checkpoint: ``README.md`` in the Hugging Face model-card format.

The card answers "what is this file?" for a person: YAML front matter (``library_name: zoo``,
tags, datasets, and a ``model-index`` with the benchmark numbers once there are some), then the
model family and paper, its config, the data it was trained on, the training summary, the
latest sample grid and the loss curves, the benchmark results and how to load it. Everything
comes from the checkpoint's own metadata and from ``bench_results.json`` in the same folder,
where `zoo bench` records each metric's numbers (a newer result of the same metric and
settings replaces the older one), so `zoo train` and `zoo bench` rewrite the same card.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from zoo.checkpoint import CheckpointInfo, atomic_write_text, read_info
from zoo.curves import CURVES_FILE
from zoo.errors import ZooError
from zoo.registry import MODELS

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
BENCH_FILE = "bench_results.json"
CARD_MARK = "library_name: zoo"


def card_path(checkpoint: Path) -> Path:
    return Path(checkpoint).with_name(CARD_FILE)


def read_bench_results(checkpoint: Path) -> dict[str, dict[str, Any]]:
    """The benchmark results recorded beside a checkpoint, by metric and settings ({} if none
    or unreadable: a damaged record is rewritten by the next `zoo bench`)."""
    path = Path(checkpoint).with_name(BENCH_FILE)
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return results if isinstance(results, dict) else {}


def record_bench_result(
    checkpoint: Path,
    metric: str,
    settings: dict[str, Any],
    values: dict[str, float],
    headline: dict[str, str],
    data: dict[str, Any],
) -> None:
    """Add one metric's numbers to the checkpoint's record, replacing an older result of the
    same metric and settings, and rewrite its card."""
    results = read_bench_results(checkpoint)
    key = json.dumps({"metric": metric, "settings": settings}, sort_keys=True)
    results[key] = {
        "metric": metric,
        "settings": settings,
        "values": values,
        "headline": headline,
        "data": data,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    atomic_write_text(Path(checkpoint).with_name(BENCH_FILE), json.dumps(results, indent=2) + "\n")
    write_card(checkpoint)


def write_card(checkpoint: Path) -> Path | None:
    """Write (or rewrite) the card beside ``checkpoint``; None when a README.md that zoo did
    not write is there already (it is left alone, with a warning)."""
    path = card_path(checkpoint)
    if path.is_file() and CARD_MARK not in path.read_text(errors="replace")[:2000]:
        log.warning("%s exists and is not a zoo model card; it is left as it is", path)
        return None
    atomic_write_text(path, render_card(read_info(Path(checkpoint))))
    return path


def _yaml(value: Any) -> str:
    """A scalar as YAML: JSON's quoting is valid YAML and keeps names with colons safe."""
    return json.dumps(value)


def front_matter(info: CheckpointInfo, results: dict[str, dict[str, Any]]) -> str:
    """The YAML header: what the Hub and tools index (library, tags, data, metrics)."""
    model_class = model_class_of(info)
    tags = ["zoo", info.model_name, "vae", "image-generation"]
    if model_class is not None and model_class.conditional:
        tags.append("conditional-generation")
    lines = ["---", f"library_name: {CARD_MARK.split(': ')[1]}", "tags:"]
    lines += [f"- {_yaml(tag)}" for tag in dict.fromkeys(tags)]
    lines += ["datasets:", f"- {_yaml(info.data.get('name', 'unknown'))}"]
    if results:
        lines += [
            "model-index:",
            f"- name: {_yaml(Path(info.path).parent.name)}",
            "  results:",
        ]
        for entry in results.values():
            data = entry.get("data", {})
            lines += [
                "  - task:",
                f"      type: {_yaml('image-generation')}",
                "    dataset:",
                f"      name: {_yaml(data.get('name', info.data.get('name', 'unknown')))}",
                f"      type: {_yaml(data.get('name', info.data.get('name', 'unknown')))}",
                f"      split: {_yaml(data.get('split', entry['settings'].get('split', '')))}",
                "    metrics:",
            ]
            for name, value in entry["values"].items():
                lines += [
                    f"    - type: {_yaml(entry['metric'])}",
                    f"      name: {_yaml(name)}",
                    f"      value: {_yaml(value)}",
                ]
    return "\n".join([*lines, "---"])


def model_class_of(info: CheckpointInfo) -> Any:
    """The checkpoint's registered model class, or None for a plugin not installed here (its
    card and `zoo info` still show everything the file says)."""
    try:
        return MODELS.get(info.model_name)
    except ZooError:  # a plugin model that is not installed here: the card still renders
        return None


def render_card(info: CheckpointInfo) -> str:
    """The card's Markdown for a checkpoint, from its metadata and recorded results."""
    checkpoint = Path(info.path)
    run_dir = checkpoint.parent
    results = read_bench_results(checkpoint)
    model_class = model_class_of(info)
    family = getattr(model_class, "family", "") or info.model_name
    paper = getattr(model_class, "paper", "")
    training, data = info.training, info.data
    sections = [
        front_matter(info, results),
        f"# {run_dir.name}: `{info.model_name}` ({family})",
        f"A {family} trained with zoo on {data.get('name', 'its data')}."
        + (f" Method: {paper}." if paper else "")
        + f" Model class from `{info.source}`.",
        "## Config\n\n```json\n" + json.dumps(info.config, indent=2) + "\n```",
        "## Data\n\n"
        + "\n".join(
            [
                f"- name: {data.get('name', '?')}",
                f"- split: {data.get('split', '?')} ({data.get('n', '?')} images)",
                f"- fingerprint: `{data.get('fingerprint', '?')}`",
                f"- preprocessing: {json.dumps(info.preprocess)}",
                f"- attributes ({len(info.attr_names)}): {', '.join(info.attr_names) or 'none'}",
            ]
        ),
        "## Training\n\n"
        + "\n".join(
            f"- {key}: {json.dumps(value)}" for key, value in training.items() if key != "versions"
        )
        + f"\n- versions: {json.dumps(training.get('versions', {}))}",
    ]
    pictures = []
    samples = sorted((run_dir / "samples").glob("step_*.png"))
    if samples:
        pictures.append(f"Latest sample grid:\n\n![samples]({samples[-1].relative_to(run_dir)})")
    if (run_dir / CURVES_FILE).is_file():
        pictures.append(f"Loss curves:\n\n![curves]({CURVES_FILE})")
    if pictures:
        sections.append("## Pictures\n\n" + "\n\n".join(pictures))
    if results:
        rows = [
            "| metric | numbers | split | n | settings | date |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for entry in results.values():
            used = entry.get("data", {})
            numbers = ", ".join(f"{k} {v}" for k, v in entry["headline"].items())
            settings = ", ".join(
                f"{k}={str(v)[:12] if k == 'data' else v}"
                for k, v in entry["settings"].items()
                if v is not None and k != "split"
            )
            rows.append(
                f"| {entry['metric']} | {numbers} | {used.get('split', '?')} | "
                f"{used.get('n', '?')} | {settings} | {entry['date']} |"
            )
        sections.append("## Results (zoo bench)\n\n" + "\n".join(rows))
    sections.append(
        "## How to load\n\n"
        f"From this folder (`{run_dir.name}`); the file alone rebuilds the model, no pickle:"
        "\n\n```python\nimport zoo\n\n"
        f'model = zoo.load("{checkpoint.name}")\n'
        + (
            "images = model.generate(8, y)  # y: 8 x A labels in {0, 1}, in the order above\n"
            if info.attr_names and getattr(model_class, "conditional", True)
            else "images = model.generate(8)\n"
        )
        + "```\n\n"
        f"```sh\nzoo generate {checkpoint.name} -n 16 --out samples.png\n"
        f"zoo info {checkpoint.name}\n```"
    )
    return "\n\n".join(sections) + "\n"
