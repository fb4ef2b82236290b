"""Checkpoints as single safetensors files: weights plus the metadata to rebuild the model.

Nothing here unpickles: every safetensors file zoo reads is opened by
`open_safetensors`, which names a pickle as such and never loads it. The model is
rebuilt from its registry name and config JSON stored in the file's metadata,
checked against the tensor shapes in the header before anything is allocated
(`load`); the training state for `--resume`
(optimizer moments, step, RNG) is a second safetensors file. Every write goes
to a temporary file that is fsynced and renamed (`zoo.files`), so a crash
mid-write leaves the previous file intact.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from zoo.errors import ZooError, error_reason, failure_text
from zoo.files import atomic_write_bytes
from zoo.model import GenerativeModel
from zoo.names import (
    check_attribute_names,
    is_distribution_name,
    is_entry_point,
    is_version,
    printable,
)
from zoo.registry import MODELS, get_model_class

FORMAT_VERSION = "1"
FORMAT_KEY = "zoo.format"
KIND_KEY = "zoo.kind"
MODEL_HINT = "zoo checkpoints are the model.safetensors written by `zoo train`"
PICKLE_PROTO = 0x80  # the first byte of every pickle of protocol 2 or later


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


def atomic_save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file so that readers only ever see the old or the new file
    (`zoo.files.atomic_write_bytes`; `WriteFailed` when the system refuses)."""
    cpu = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    atomic_write_bytes(Path(path), save(cpu, metadata=metadata))


def is_pickle(path: Path) -> bool:
    """Whether a file is a pickle, judged from its bytes without loading it: a pickle stream
    (first byte 0x80, the PROTO opcode of protocols 2-5) or torch.save's zip (a ``data.pkl``)."""
    try:
        with open(path, "rb") as handle:
            if handle.read(1) == bytes([PICKLE_PROTO]):
                return True
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            return any(name.rsplit("/", 1)[-1] == "data.pkl" for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


@contextmanager
def open_safetensors(path: Path, advice: str, what: str = "") -> Iterator[Any]:
    """`safe_open` for every safetensors file zoo reads, with one-line errors ending in `advice`:
    a missing file, a pickle (named as one: zoo never unpickles) or a file that is not
    safetensors. The pickle test runs only on files safetensors refused, so a valid file whose
    header length happens to start with 0x80 is never mistaken for one. `what` ("model file ")
    names the file in the missing-file message."""
    path = Path(path)
    if not path.is_file():
        state = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ZooError(f"{what}{path} {state}{advice}")
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as error:
        if is_pickle(path):
            raise ZooError(
                f"{path} is a pickle, not a safetensors file; zoo never unpickles{advice}"
            ) from None
        reason = error_reason(error)
        raise ZooError(f"{path} is not a readable safetensors file ({reason}){advice}") from None
    with handle:
        yield handle


def read_header(path: Path, kind: str, hint: str) -> dict[str, str]:
    """The metadata of a zoo safetensors file of the given kind, or a one-line error.

    `hint` ends every message with what to do instead (for example which command writes
    such a file).
    """
    path = Path(path)
    with open_safetensors(path, f"; {hint}", what=f"{kind} file ") as handle:
        metadata = handle.metadata() or {}
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


def _json_type(value: Any) -> str:
    """What JSON calls the type of a parsed value."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _json(path: Path, metadata: dict[str, str], key: str, default: Any) -> Any:
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
        "zoo.source_version": MODELS.version_of(model.model_name, source),
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
    config = _json(path, metadata, "zoo.config", {})
    non_finite = _non_finite(config, "")
    if non_finite is not None:
        raise ZooError(
            f"{path}: zoo.config field {non_finite[0]} is {non_finite[1]}, not a finite number; "
            "the file is damaged or was edited"
        )
    attr_names = check_attribute_names(
        _json(path, metadata, "zoo.attributes", []),
        f"{path}: metadata zoo.attributes",
        "the file is damaged or was edited",
    )
    return CheckpointInfo(
        path=path,
        model_name=metadata["zoo.model"],
        config=config,
        attr_names=attr_names,
        attr_rates=_json(path, metadata, "zoo.attribute_rates", []),
        preprocess=_json(path, metadata, "zoo.preprocess", {}),
        data=_json(path, metadata, "zoo.data", {}),
        training=_json(path, metadata, "zoo.training", {}),
        source=metadata.get("zoo.source", "zoo"),
        source_version=metadata.get("zoo.source_version", ""),
    )


def load(path: str | Path, device: str | torch.device = "cpu") -> GenerativeModel:
    """Rebuild a model from a checkpoint file alone, in eval mode.

    The returned model carries the file's metadata as ``model.checkpoint_info``.
    """
    info = read_info(Path(path))
    model_class = _model_class(info)
    expected_as = f"the {info.model_name} config"
    config, skeleton = _skeleton(model_class, info, expected_as)
    _check_shapes(_shapes(skeleton.state_dict()), header_shapes(info.path), info.path, expected_as)
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
        config = model_class.config_class.from_dict(info.config)
        with torch.device("meta"):
            return config, model_class(config)
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # whatever a crafted config makes model code raise
        raise ZooError(
            f"{info.path}: {expected_as} cannot be built ({failure_text(error)}); "
            "the file is damaged or was edited"
        ) from None


def _shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in tensors.items()}


def header_shapes(path: Path, advice: str = "") -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, read from the safetensors header alone."""
    with open_safetensors(path, advice) as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118


def read_tensors(path: Path, advice: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; one-line errors end with `advice` (", do this")."""
    with open_safetensors(path, advice) as handle:
        try:
            return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            reason = error_reason(error)
            raise ZooError(
                f"{path}: cannot read tensors ({reason}); the file is truncated or damaged{advice}"
            ) from None


def _check_shapes(
    expected: dict[str, tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
    path: Path,
    expected_as: str,
    advice: str = "",
) -> None:
    """Refuse a file whose tensor names or shapes differ from what `expected_as` builds."""
    problems = [
        f"{label}: {', '.join(names[:3])}"
        for label, names in (
            ("missing", [name for name in expected if name not in found]),
            ("unexpected", [name for name in found if name not in expected]),
            (
                "wrong shape",
                [name for name, shape in expected.items() if found.get(name, shape) != shape],
            ),
        )
        if names
    ]
    if problems:
        raise ZooError(
            f"{path}: tensors do not match {expected_as} ({'; '.join(problems)}); "
            f"the file is damaged or was edited{advice}"
        )


def load_matching_weights(
    module: torch.nn.Module, path: Path, expected_as: str, advice: str = ""
) -> None:
    """Load `path`'s tensors into `module`, refusing names or shapes that differ.

    `expected_as` names what the file should match ("the cvae config"); `advice`, appended
    to every error, says what to do instead.
    """
    tensors = read_tensors(path, advice)
    _check_shapes(_shapes(module.state_dict()), _shapes(tensors), path, expected_as, advice)
    module.load_state_dict(tensors)


def read_tensors_file(path: Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a zoo file of the given kind (concept vector, ...), checked."""
    metadata = read_header(Path(path), kind, f"use a {kind} file written by zoo")
    return read_tensors(Path(path)), metadata


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
    tensors = read_tensors(path)
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
