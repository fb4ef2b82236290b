"""What a zoo file says about itself: the header keys every zoo safetensors file carries, and
`CheckpointInfo`, a model checkpoint's header parsed and checked.

A leaf: it reads no file (`zoo.files` does) and builds no model (`zoo.checkpoint` does), so
the data, the figures and the benchmarks can speak of a checkpoint without importing models.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoo.errors import ZooError
from zoo.names import check_attribute_names

FORMAT_VERSION = "1"
FORMAT_KEY = "zoo.format"
KIND_KEY = "zoo.kind"
MODEL_KIND = "model"
MODEL_HINT = "zoo checkpoints are the model.safetensors written by `zoo train`"


@dataclass
class CheckpointInfo:
    """What a checkpoint says about itself, read from the header alone."""

    path: Path
    model_name: str
    config: dict[str, Any]
    attr_names: list[str] = field(default_factory=list)
    attr_rates: list[float] = field(default_factory=list)
    preprocess: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    source: str = "zoo"  # the distribution that provided the model class
    source_version: str = ""  # its version when the file was written (plugins only)

    @classmethod
    def from_header(cls, path: Path, metadata: dict[str, str]) -> CheckpointInfo:
        """Parse a model file's header, refusing a damaged or edited one in one line."""
        if "zoo.model" not in metadata or "zoo.config" not in metadata:
            raise ZooError(f"{path} lacks zoo.model or zoo.config metadata; the file is damaged")
        config = header_json(path, metadata, "zoo.config", {})
        non_finite = _non_finite(config, "")
        if non_finite is not None:
            raise ZooError(
                f"{path}: zoo.config field {non_finite[0]} is {non_finite[1]}, not a finite "
                "number; the file is damaged or was edited"
            )
        attr_names = check_attribute_names(
            header_json(path, metadata, "zoo.attributes", []),
            f"{path}: metadata zoo.attributes",
            "the file is damaged or was edited",
        )
        return cls(
            path=path,
            model_name=metadata["zoo.model"],
            config=config,
            attr_names=attr_names,
            attr_rates=header_json(path, metadata, "zoo.attribute_rates", []),
            preprocess=header_json(path, metadata, "zoo.preprocess", {}),
            data=header_json(path, metadata, "zoo.data", {}),
            training=header_json(path, metadata, "zoo.training", {}),
            source=metadata.get("zoo.source", "zoo"),
            source_version=metadata.get("zoo.source_version", ""),
        )


def _json_type(value: Any) -> str:
    """What JSON calls the type of a parsed value."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def header_json(path: Path, metadata: dict[str, str], key: str, default: Any) -> Any:
    """Metadata `key` parsed as JSON of the same type as `default` (its value when absent)."""
    if key not in metadata:
        return default
    try:
        value = json.loads(metadata[key])
    except json.JSONDecodeError:
        raise ZooError(f"{path}: metadata {key} is not valid JSON; the file is damaged") from None
    if not isinstance(value, type(default)):
        raise ZooError(
            f"{path}: metadata {key} is a JSON {_json_type(value)}, not a JSON "
            f"{_json_type(default)}; the file is damaged or was edited"
        )
    return value


def _non_finite(value: Any, name: str) -> tuple[str, float] | None:
    """The first (field, value) in a parsed JSON value that is NaN or infinite, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return name, value
    if isinstance(value, (dict, list)):
        children = value.items() if isinstance(value, dict) else enumerate(value)
        for key, child in children:
            found = _non_finite(child, f"{name}.{key}" if name else str(key))
            if found is not None:
                return found
    return None
