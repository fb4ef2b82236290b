"""Model checkpoints and training state, as zoo tensor files (`zoo.files`).

A checkpoint is one safetensors file: the weights plus the metadata to rebuild the model
(`zoo.metadata.CheckpointInfo`). `load` rebuilds the model from its registry name and config
JSON, checked against the tensor shapes in the header before anything is allocated. The
training state for `--resume` (optimizer moments, step, RNG) is a second safetensors file.
Both are written atomically, so a crash mid-write leaves the previous file intact.
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zoo.errors import ZooError, failure_text
from zoo.files import (
    check_shapes,
    header_shapes,
    read_header,
    read_tensors,
    shapes,
    write_tensors_file,
)
from zoo.hub import checkpoint_file
from zoo.metadata import MODEL_HINT, MODEL_KIND, CheckpointInfo, header_json
from zoo.model import GenerativeModel
from zoo.names import is_distribution_name, is_entry_point, is_version, printable
from zoo.registry import MODELS, get_model_class

STATE_KIND = "training state"


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
        "zoo.model": model.model_name,
        "zoo.source": source,
        "zoo.source_version": MODELS.version_of(model.model_name, source),
        "zoo.config": model.config.to_json(),
        "zoo.attributes": json.dumps(attr_names or []),
        "zoo.attribute_rates": json.dumps(attr_rates or []),
        "zoo.preprocess": json.dumps(preprocess or {}),
        "zoo.data": json.dumps(data or {}),
        "zoo.training": json.dumps(training or {}),
    }
    write_tensors_file(path, MODEL_KIND, state, metadata)


def read_info(path: str | Path) -> CheckpointInfo:
    """Read a checkpoint's metadata without loading its tensors. ``path`` may also be a run
    or exported folder, or ``hf-hub:ORG/NAME`` (`zoo.hub.checkpoint_file`)."""
    path = checkpoint_file(path)
    return CheckpointInfo.from_header(path, read_header(path, MODEL_KIND, MODEL_HINT))


def load(path: str | Path, device: str | torch.device = "cpu") -> GenerativeModel:
    """Rebuild a model from a checkpoint file alone, in eval mode.

    ``path`` is anything `read_info` takes. The returned model carries the file's metadata
    as ``model.checkpoint_info``.
    """
    info = read_info(path)
    model_class = _model_class(info)
    expected_as = f"the {info.model_name} config"
    config, skeleton = _skeleton(model_class, info, expected_as)
    check_shapes(shapes(skeleton.state_dict()), header_shapes(info.path), info.path, expected_as)
    model = model_class(config)
    model.load_state_dict(read_tensors(info.path))
    model.checkpoint_info = info
    return model.to(device).eval()


def _model_class(info: CheckpointInfo) -> type[GenerativeModel]:
    """The class that rebuilds the checkpoint's model; if a plugin provided it and is not
    installed, the error names the distribution (and version) to install. The ``pip install``
    advice is given only for a valid distribution name and version: the file is not trusted."""
    if info.source == "zoo" or MODELS.find(info.model_name):
        return get_model_class(info.model_name)
    source, version = printable(info.source), printable(info.source_version)
    plugin = f"{info.path}: model {printable(info.model_name)!r} comes from the plugin {source}"
    if is_entry_point(info.source):  # an entry point outside any distribution
        raise ZooError(f"{plugin}; make the entry point {source} importable again")
    if not is_distribution_name(info.source):
        raise ZooError(
            f"{info.path}: model {printable(info.model_name)!r} names {source!r} as its plugin, "
            "which is not a distribution name or entry point; the file is damaged or was edited"
        )
    wanted = info.source
    if is_version(info.source_version):
        wanted += f"=={info.source_version}"
    try:
        installed = importlib.metadata.version(info.source)
        advice = f"{info.source} {installed} is installed but does not provide it"
    except importlib.metadata.PackageNotFoundError:
        advice = "it is not installed"
    recorded = f" {version}" if version else ""
    raise ZooError(f"{plugin}{recorded}; {advice}; pip install '{wanted}'")


def _skeleton(
    model_class: type[GenerativeModel], info: CheckpointInfo, expected_as: str
) -> tuple[Any, GenerativeModel]:
    """(config, the model built on the meta device): its shapes, at no memory cost, so a config
    that asks for terabytes is refused before anything real is allocated."""
    try:
        config = model_class.config_class.from_saved(info.config)
        with torch.device("meta"):
            return config, model_class(config)
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # whatever a crafted config makes model code raise
        raise ZooError(
            f"{info.path}: {expected_as} cannot be built ({failure_text(error)}); "
            "the file is damaged or was edited"
        ) from None


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
        "step": str(step),
        "param_groups": json.dumps(optimizer_state["param_groups"]),
        "optimizer_scalars": json.dumps(scalars),
        "extra": json.dumps(extra or {}),
    }
    write_tensors_file(path, STATE_KIND, tensors, metadata)


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
    metadata = read_header(path, STATE_KIND, "resume from a run folder written by zoo train")
    tensors = read_tensors(path)
    state: dict[int, dict[str, Any]] = {}
    for index, values in header_json(path, metadata, "optimizer_scalars", {}).items():
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
            "param_groups": header_json(path, metadata, "param_groups", []),
        },
        rng_state=rng_state,
        extra=header_json(path, metadata, "extra", {}),
    )
