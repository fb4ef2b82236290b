"""Registries of named things, as timm does it: `register_model`, `create_model`, `list_models`.

Built-ins register themselves when their package is imported. Third parties
arrive through entry-point groups (``zoo.models`` for models, ``zoo.metrics``
for benchmark metrics); they are imported only when needed, each in isolation
and under a timeout, so a plugin that fails to import is reported as broken and
never takes the zoo down with it. Looking up a built-in name imports no plugin,
and looking up a plugin's name imports that entry point only: a plugin that is
slow or blocks at import costs only the commands that list every plugin
(`zoo list`, `zoo check-plugin`) or ask for it by name.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import importlib.metadata
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from zoo.errors import ZooError, failure_text
from zoo.model import GenerativeModel

PLUGIN_IMPORT_TIMEOUT_S = 20.0

T = TypeVar("T", bound=type)


@dataclass
class Entry(Generic[T]):
    """One registered class: what it is and which package provided it."""

    name: str
    cls: T
    source: str  # "zoo" for built-ins, else the distribution that provides it
    description: str = ""
    version: str = ""  # the providing distribution's version (plugins only)


@dataclass
class BrokenPlugin:
    """An entry point that could not be loaded, kept so listings can show why."""

    name: str
    source: str
    error: str


class PluginRegistry(Generic[T]):
    """Named subclasses of `base`: built-ins from `builtin_module`, plugins from `group`."""

    def __init__(self, group: str, kind: str, base: type, builtin_module: str):
        self.group = group
        self.kind = kind
        self.base = base
        self.builtin_module = builtin_module
        self.entries: dict[str, Entry[T]] = {}
        self.broken: dict[str, BrokenPlugin] = {}
        self.plugins_loaded = False

    def register(self, name: str, *, source: str = "zoo") -> Callable[[T], T]:
        """Class decorator: make the class available under `name`."""

        def decorate(cls: T) -> T:
            self.add(cls, name, source)
            return cls

        return decorate

    def add(self, cls: Any, name: str, source: str, version: str = "") -> None:
        base = self.base
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise ZooError(
                f"{self.kind} {name!r} from {source} is not a {base.__module__.split('.')[0]}."
                f"{base.__name__} subclass (got {cls!r}); subclass {base.__name__}"
            )
        existing = self.entries.get(name)
        if existing is not None and existing.cls is not cls:
            raise ZooError(
                f"{self.kind} name {name!r} is registered twice: by {existing.source} "
                f"({_qualname(existing.cls)}) and by {source} ({_qualname(cls)}); "
                "rename one of them"
            )
        check = getattr(cls, "check_registrable", None)
        if check is not None:
            check()
        cls.registry_name = name
        doc = (cls.__doc__ or "").strip().splitlines()
        self.entries[name] = Entry(name, cls, source, doc[0] if doc else "", version)

    def load_plugins(self, *, reload: bool = False) -> None:
        """Import built-ins, then every entry point of the group once; failures are recorded."""
        importlib.import_module(self.builtin_module)  # built-ins first: clashes name the plugin
        if self.plugins_loaded and not reload:
            return
        self.plugins_loaded = True
        for entry_point in importlib.metadata.entry_points(group=self.group):
            self._load(entry_point)

    def _load(self, entry_point: importlib.metadata.EntryPoint) -> None:
        """Import one entry point and register what it names, once; a failure is recorded."""
        dist = entry_point.dist
        source = dist.name if dist else entry_point.value
        done = self.entries.get(entry_point.name) or self.broken.get(entry_point.name)
        if done is not None and done.source == source:
            return
        try:
            cls = _load_with_timeout(entry_point)
            self.add(cls, entry_point.name, source, dist.version if dist else "")
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # a plugin may raise anything, SystemExit included
            self.broken[entry_point.name] = BrokenPlugin(
                entry_point.name, source, failure_text(error)
            )

    def find(self, name: str) -> bool:
        """Whether `name` is registered (or is a plugin that failed to load), importing only what
        it takes to know: the built-ins, then the entry points of that name, and only if those
        do not provide it every plugin (a plugin module may register more names than it has
        entry points)."""
        importlib.import_module(self.builtin_module)
        if name not in self.entries and name not in self.broken:
            for entry_point in importlib.metadata.entry_points(group=self.group):
                if entry_point.name == name:
                    self._load(entry_point)
        if name not in self.entries and name not in self.broken:
            self.load_plugins()
        return name in self.entries or name in self.broken

    def version_of(self, name: str, source: str) -> str:
        """The version of `source`, the distribution that provides `name`, as a checkpoint
        records it ("" for built-ins and for entry points outside any distribution)."""
        entry = self.entries.get(name)
        return entry.version if entry is not None and entry.source == source else ""

    def names(self, pattern: str = "*") -> list[str]:
        self.load_plugins()
        return sorted(name for name in self.entries if fnmatch.fnmatchcase(name, pattern))

    def all_entries(self) -> list[Entry[T]]:
        self.load_plugins()
        return [self.entries[name] for name in sorted(self.entries)]

    def all_broken(self) -> list[BrokenPlugin]:
        self.load_plugins()
        return [self.broken[name] for name in sorted(self.broken)]

    def get(self, name: str) -> T:
        """The class registered under `name`, or a one-line error listing the known names."""
        return self.entry(name).cls

    def entry(self, name: str) -> Entry[T]:
        """Everything registered under `name` (class, providing distribution, version), so
        callers need not read `entries`; the same one-line error as `get` for unknown names."""
        self.find(name)
        if name in self.entries:
            return self.entries[name]
        if name in self.broken:
            broken = self.broken[name]
            raise ZooError(
                f"{self.kind} {name!r} comes from plugin {broken.source}, which failed to load: "
                f"{broken.error}; fix or uninstall that package"
            )
        known = sorted(self.entries)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        plural = "metrics" if self.kind == "metric" else f"{self.kind}s"
        raise ZooError(f"unknown {self.kind} {name!r}.{hint} Known {plural}: {', '.join(known)}")


def _qualname(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _load_with_timeout(entry_point: importlib.metadata.EntryPoint) -> Any:
    """Load an entry point in a daemon thread so a plugin that blocks at import cannot hang us."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = entry_point.load()
        except BaseException as error:
            outcome["error"] = error

    worker = threading.Thread(target=run, name=f"zoo-plugin-{entry_point.name}", daemon=True)
    worker.start()
    worker.join(PLUGIN_IMPORT_TIMEOUT_S)
    if worker.is_alive():
        raise TimeoutError(f"import did not finish within {PLUGIN_IMPORT_TIMEOUT_S:.0f} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


MODELS: PluginRegistry[type[GenerativeModel]] = PluginRegistry(
    "zoo.models", "model", GenerativeModel, "zoo.models"
)


def register_model(name: str, *, source: str = "zoo") -> Callable[[T], T]:
    """Class decorator: make a `GenerativeModel` subclass buildable by `name`."""
    return MODELS.register(name, source=source)


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style wildcard, sorted: ``list_models("beta-*")``."""
    return MODELS.names(pattern)


def get_model_class(name: str) -> type[GenerativeModel]:
    return MODELS.get(name)


def create_model(name: str, **config: Any) -> GenerativeModel:
    """Build a registered model; keyword arguments override fields of its config dataclass."""
    model_class = get_model_class(name)
    return model_class(model_class.config_class.from_dict(config))
