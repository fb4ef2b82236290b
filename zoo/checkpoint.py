"""Checkpoints as single safetensors files: weights plus the metadata to rebuild the model.

Nothing here unpickles. The model is rebuilt from its registry name and config
JSON stored in the file's metadata; the training state for `--resume`
(optimizer moments, step, RNG) is a second safetensors file. Every write goes
to a temporary file that is fsynced and renamed, so a crash mid-write leaves
the previous file intact.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from zoo.errors import ZooError, error_reason
from zoo.model import GenerativeModel
from zoo.registry import get_model_class

FORMAT_VERSION = "1"
FORMAT_KEY = "zoo.format"
KIND_KEY = "zoo.kind"
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
    source: str = "zoo"


TEMPORARY_NAME = re.compile(r"\..+\.tmp-\d+")


def temporary_path(path: Path) -> Path:
    """Where a write goes before its rename: ``.NAME.tmp-PID`` beside the file."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete the ``.NAME.tmp-PID`` files that killed writes left in ``folder`` (nothing else)."""
    stale = [p for p in folder.iterdir() if p.is_file() and TEMPORARY_NAME.fullmatch(p.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file so that readers only ever see the old or the new content."""
    temporary = temporary_path(path)
    try:
        with open(temporary, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file so that readers only ever see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    try:
        save_file(
            {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()},
            str(temporary),
            metadata=metadata,
        )
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def read_header(path: Path, kind: str, hint: str) -> dict[str, str]:
    """The metadata of a zoo safetensors file of the given kind, or a one-line error.

    `hint` ends every message with what to do instead (for example which command writes
    such a file).
    """
    path = Path(path)
    if not path.is_file():
        raise ZooError(f"{kind} file {path} does not exist; {hint}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        reason = error_reason(error)
        raise ZooError(f"{path} is not a readable safetensors file ({reason}); {hint}") from None
    version = metadata.get(FORMAT_KEY)
    if version is None:
        raise ZooError(
            f"{path} is a safetensors file but not a zoo {kind} (no {FORMAT_KEY} metadata); {hint}"
        )
    if version != FORMAT_VERSION:
        raise ZooError(
            f"{path} has zoo format {version!r}, this zoo reads format {FORMAT_VERSION!r}; "
            f"use the zoo version that wrote it"
        )
    found = metadata.get(KIND_KEY, "model")
    if found != kind:
        raise ZooError(f"{path} is a zoo {found} file, expected a zoo {kind} file; {hint}")
    return metadata


def _json(path: Path, metadata: dict[str, str], key: str, default: Any) -> Any:
    if key not in metadata:
        return default
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError:
        raise ZooError(f"{path}: metadata {key} is not valid JSON; the file is damaged") from None


def finite_state_dict(module: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """The module's tensors for saving to `path`, refusing NaN or Inf: a file never holds them."""
    state = module.state_dict()
    bad = [name for name, tensor in state.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise ZooError(f"refusing to save {path}: non-finite values in {', '.join(bad[:3])}")
    return state


def save_checkpoint(
    path: Path,
    model: GenerativeModel,
    *,
    attr_names: list[str] | None = None,
    attr_rates: list[float] | None = None,
    preprocess: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    source: str = "zoo",
) -> None:
    """Save weights and everything needed to rebuild and use the model. Refuses NaN weights."""
    state = finite_state_dict(model, path)
    metadata = {
        FORMAT_KEY: FORMAT_VERSION,
        KIND_KEY: "model",
        "zoo.model": model.model_name,
        "zoo.source": source,
        "zoo.config": model.config.to_json(),
        "zoo.attributes": json.dumps(attr_names or []),
        "zoo.attribute_rates": json.dumps(attr_rates or []),
        "zoo.preprocess": json.dumps(preprocess or {}),
        "zoo.data": json.dumps(data or {}),
        "zoo.training": json.dumps(training or {}),
    }
    atomic_save(path, state, metadata)


def read_info(path: Path) -> CheckpointInfo:
    """Read a checkpoint's metadata without loading its tensors."""
    path = Path(path)
    metadata = read_header(path, "model", MODEL_HINT)
    if "zoo.model" not in metadata or "zoo.config" not in metadata:
        raise ZooError(f"{path} lacks zoo.model or zoo.config metadata; the file is damaged")
    return CheckpointInfo(
        path=path,
        model_name=metadata["zoo.model"],
        config=_json(path, metadata, "zoo.config", {}),
        attr_names=_json(path, metadata, "zoo.attributes", []),
        attr_rates=_json(path, metadata, "zoo.attribute_rates", []),
        preprocess=_json(path, metadata, "zoo.preprocess", {}),
        data=_json(path, metadata, "zoo.data", {}),
        training=_json(path, metadata, "zoo.training", {}),
        source=metadata.get("zoo.source", "zoo"),
    )


def load(path: str | Path, device: str | torch.device = "cpu") -> GenerativeModel:
    """Rebuild a model from a checkpoint file alone, in eval mode.

    The returned model carries the file's metadata as ``model.checkpoint_info``.
    """
    info = read_info(Path(path))
    model_class = get_model_class(info.model_name)
    model = model_class(model_class.config_class.from_dict(info.config))
    load_matching_weights(model, info.path, f"the {info.model_name} config")
    model.checkpoint_info = info
    return model.to(device).eval()


def _read_tensors(path: Path, advice: str = "") -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        reason = error_reason(error)
        raise ZooError(
            f"{path}: cannot read tensors ({reason}); the file is truncated or damaged{advice}"
        ) from None


def load_matching_weights(
    module: torch.nn.Module, path: Path, expected_as: str, advice: str = ""
) -> None:
    """Load `path`'s tensors into `module`, refusing names or shapes that differ.

    `expected_as` names what the file should match ("the cvae config"); `advice`, appended
    to every error, says what to do instead.
    """
    tensors = _read_tensors(path, advice)
    expected = module.state_dict()
    problems = [
        f"{label}: {', '.join(names[:3])}"
        for label, names in (
            ("missing", [name for name in expected if name not in tensors]),
            ("unexpected", [name for name in tensors if name not in expected]),
            (
                "wrong shape",
                [
                    name
                    for name, tensor in expected.items()
                    if name in tensors and tensors[name].shape != tensor.shape
                ],
            ),
        )
        if names
    ]
    if problems:
        raise ZooError(
            f"{path}: tensors do not match {expected_as} ({'; '.join(problems)}); "
            f"the file is damaged or was edited{advice}"
        )
    module.load_state_dict(tensors)


def read_tensors_file(path: Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a zoo file of the given kind (concept vector, ...), checked."""
    metadata = read_header(Path(path), kind, f"use a {kind} file written by zoo")
    return _read_tensors(Path(path)), metadata


# -- training state for --resume ----------------------------------------------------------------


def save_train_state(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    step: int,
    rng_state: dict[str, torch.Tensor],
    extra: dict[str, Any] | None = None,
) -> None:
    """Save weights, optimizer moments, the step counter and RNG states without pickle.

    The weights are stored here too, so the state a run resumes from is one file written in
    one atomic step, whatever happened to ``model.safetensors`` around it.
    """
    optimizer_state = optimizer.state_dict()
    tensors = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in optimizer_state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    for name, state in rng_state.items():
        tensors[f"rng.{name}"] = state
    metadata = {
        FORMAT_KEY: FORMAT_VERSION,
        KIND_KEY: "training state",
        "step": str(step),
        "param_groups": json.dumps(optimizer_state["param_groups"]),
        "optimizer_scalars": json.dumps(scalars),
        "extra": json.dumps(extra or {}),
    }
    atomic_save(path, tensors, metadata)


@dataclass
class TrainState:
    step: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    rng_state: dict[str, torch.Tensor]
    extra: dict[str, Any]


def load_train_state(path: Path) -> TrainState:
    """Read what `save_train_state` wrote, as an optimizer state dict ready to load."""
    path = Path(path)
    metadata = read_header(path, "training state", "resume from a run folder written by zoo train")
    tensors = _read_tensors(path)
    state: dict[int, dict[str, Any]] = {}
    for index, values in _json(path, metadata, "optimizer_scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    rng_state, model_state = {}, {}
    for name, tensor in tensors.items():
        group, _, rest = name.partition(".")
        if group == "model":
            model_state[rest] = tensor
        elif group == "optimizer":
            index, _, key = rest.partition(".")
            state.setdefault(int(index), {})[key] = tensor
        elif group == "rng":
            rng_state[rest] = tensor
    return TrainState(
        step=int(metadata.get("step", "0")),
        model_state=model_state,
        optimizer_state={
            "state": state,
            "param_groups": _json(path, metadata, "param_groups", []),
        },
        rng_state=rng_state,
        extra=_json(path, metadata, "extra", {}),
    )
