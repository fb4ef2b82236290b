"""The model registry: `register_model`, `create_model`, `list_models`, as timm does it.

Built-in models register themselves when `zoo.models` is imported. Third-party
models arrive through the entry-point group ``zoo.models``; they are loaded on
first use, each in isolation, so a plugin that fails to import is reported as
broken and never takes the zoo down with it.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib.metadata
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from zoo.errors import ZooError

if TYPE_CHECKING:
    from zoo.model import GenerativeModel

ENTRY_POINT_GROUP = "zoo.models"
PLUGIN_IMPORT_TIMEOUT_S = 20.0


@dataclass
class ModelEntry:
    """One registered model: what builds it and where it came from."""

    name: str
    model_class: type[GenerativeModel]
    source: str  # "zoo" for built-ins, else the distribution that provides it
    family: str = ""
    description: str = ""


@dataclass
class BrokenPlugin:
    """A plugin entry point that could not be loaded, kept so `zoo list` can show why."""

    name: str
    source: str
    error: str


@dataclass
class _Registry:
    entries: dict[str, ModelEntry] = field(default_factory=dict)
    broken: dict[str, BrokenPlugin] = field(default_factory=dict)
    plugins_loaded: bool = False


_registry = _Registry()


def register_model(
    name: str, *, source: str = "zoo"
) -> Callable[[type[GenerativeModel]], type[GenerativeModel]]:
    """Class decorator: make a `GenerativeModel` subclass buildable by `name`.

    The class gets ``model_name`` set, so a checkpoint can record which entry built it.
    """

    def decorate(model_class: type[GenerativeModel]) -> type[GenerativeModel]:
        _add(model_class, name, source)
        return model_class

    return decorate


def _add(model_class: Any, name: str, source: str) -> None:
    from zoo.model import GenerativeModel

    if not (isinstance(model_class, type) and issubclass(model_class, GenerativeModel)):
        raise ZooError(
            f"model {name!r} from {source} is not a zoo.GenerativeModel subclass "
            f"(got {model_class!r}); subclass zoo.GenerativeModel"
        )
    existing = _registry.entries.get(name)
    if existing is not None and existing.model_class is not model_class:
        raise ZooError(
            f"model name {name!r} is registered twice: by {existing.source} "
            f"({_qualname(existing.model_class)}) and by {source} ({_qualname(model_class)}); "
            "rename one of them"
        )
    model_class.model_name = name
    doc = (model_class.__doc__ or "").strip().splitlines()
    _registry.entries[name] = ModelEntry(
        name=name,
        model_class=model_class,
        source=source,
        family=getattr(model_class, "family", "") or model_class.__name__,
        description=doc[0] if doc else "",
    )


def _qualname(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _load_with_timeout(entry_point: importlib.metadata.EntryPoint) -> Any:
    """Load an entry point in a daemon thread so a plugin that blocks at import cannot hang us."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = entry_point.load()
        except BaseException as error:  # a plugin may raise anything, SystemExit included
            outcome["error"] = error

    worker = threading.Thread(target=run, name=f"zoo-plugin-{entry_point.name}", daemon=True)
    worker.start()
    worker.join(PLUGIN_IMPORT_TIMEOUT_S)
    if worker.is_alive():
        raise TimeoutError(f"import did not finish within {PLUGIN_IMPORT_TIMEOUT_S:.0f} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def load_plugins(*, reload: bool = False) -> None:
    """Import every ``zoo.models`` entry point once; failures are recorded, never raised."""
    import zoo.models  # noqa: F401  (built-ins register first, so clashes name the plugin)

    if _registry.plugins_loaded and not reload:
        return
    _registry.plugins_loaded = True
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        source = entry_point.dist.name if entry_point.dist else entry_point.value
        if (
            entry_point.name in _registry.entries
            and _registry.entries[entry_point.name].source == source
        ):
            continue
        try:
            model_class = _load_with_timeout(entry_point)
            _add(model_class, entry_point.name, source)
        except BaseException as error:
            if isinstance(error, KeyboardInterrupt):
                raise
            message = str(error).splitlines()[0] if str(error) else ""
            _registry.broken[entry_point.name] = BrokenPlugin(
                name=entry_point.name,
                source=source,
                error=f"{type(error).__name__}: {message}".rstrip(": "),
            )


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style wildcard, sorted: ``list_models("beta-*")``."""
    load_plugins()
    return sorted(name for name in _registry.entries if fnmatch.fnmatchcase(name, pattern))


def model_entries() -> list[ModelEntry]:
    load_plugins()
    return [_registry.entries[name] for name in sorted(_registry.entries)]


def broken_plugins() -> list[BrokenPlugin]:
    load_plugins()
    return [_registry.broken[name] for name in sorted(_registry.broken)]


def get_model_class(name: str) -> type[GenerativeModel]:
    """The class registered under `name`, or a one-line error listing the known names."""
    load_plugins()
    if name in _registry.entries:
        return _registry.entries[name].model_class
    if name in _registry.broken:
        broken = _registry.broken[name]
        raise ZooError(
            f"model {name!r} comes from plugin {broken.source}, which failed to load: "
            f"{broken.error}; fix or uninstall that package"
        )
    known = sorted(_registry.entries)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ZooError(f"unknown model {name!r}.{hint} Known models: {', '.join(known)}")


def create_model(name: str, **config: Any) -> GenerativeModel:
    """Build a registered model; keyword arguments override fields of its config dataclass."""
    model_class = get_model_class(name)
    return model_class(model_class.config_class.from_dict(config))
