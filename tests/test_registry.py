"""Registry: names, wildcards, errors, and plugins discovered through entry points."""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap
from pathlib import Path

import pytest

import zoo
from zoo import registry
from zoo.errors import ZooError


@pytest.fixture
def isolated_registry(monkeypatch):
    """Let a test register models and plugins without leaking them into other tests."""
    zoo.list_models()  # make sure built-ins are in before the snapshot
    monkeypatch.setattr(registry.MODELS, "entries", dict(registry.MODELS.entries))
    monkeypatch.setattr(registry.MODELS, "broken", {})
    monkeypatch.setattr(registry.MODELS, "plugins_loaded", False)
    return registry.MODELS


def _plugin_module(tmp_path: Path, monkeypatch, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)


def _inject_entry_points(monkeypatch, *specs: tuple[str, str]) -> None:
    points = [importlib.metadata.EntryPoint(n, v, registry.MODELS.group) for n, v in specs]
    real = importlib.metadata.entry_points

    def entry_points(**params):
        if params.get("group") == registry.MODELS.group:
            return importlib.metadata.EntryPoints(points)
        return real(**params)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


TINY_PLUGIN = """
    import zoo
    from zoo.models.vae import VAE

    class TinyPluginVAE(VAE):
        '''A VAE that arrives through an entry point.'''
"""


def test_builtins_and_wildcards():
    assert {"vae", "beta-vae", "cvae", "beta-cvae"} <= set(zoo.list_models())
    assert zoo.list_models("beta-*") == ["beta-cvae", "beta-tc-cvae", "beta-tcvae", "beta-vae"]
    assert zoo.list_models("*iwae") == ["ciwae", "iwae"]
    assert zoo.list_models("c?ae") == ["cvae"]


def test_beta_variants_only_change_the_default_beta():
    assert zoo.create_model("vae").config.beta == 1.0
    assert zoo.create_model("beta-vae").config.beta == 4.0
    assert zoo.create_model("beta-vae", beta=2).config.beta == 2.0
    assert zoo.create_model("cvae", num_attributes=3, beta=2).config.beta == 2.0
    assert zoo.create_model("beta-cvae", num_attributes=3).config.beta == 4.0


# docs/reliability.md: a model, metric or attribute name is unknown
def test_unknown_model_names_the_closest_match():
    with pytest.raises(ZooError, match="unknown model 'cvea'.*'cvae'.*Known models: .*beta-cvae"):
        zoo.create_model("cvea")


def test_entry_gives_the_registration_and_gets_errors():
    entry = registry.MODELS.entry("cvae")
    assert (entry.name, entry.cls, entry.source) == ("cvae", registry.MODELS.get("cvae"), "zoo")
    with pytest.raises(ZooError, match="unknown model 'cvea'.*'cvae'.*Known models: .*beta-cvae"):
        registry.MODELS.entry("cvea")


def test_unknown_config_field_is_named():
    with pytest.raises(ZooError, match="no field.*latnt_dim"):
        zoo.create_model("vae", latnt_dim=3)


def test_entry_point_plugin_is_discovered(isolated_registry, tmp_path, monkeypatch):
    _plugin_module(tmp_path, monkeypatch, "tiny_plugin", TINY_PLUGIN)
    _inject_entry_points(monkeypatch, ("tiny-plugin", "tiny_plugin:TinyPluginVAE"))
    assert "tiny-plugin" in zoo.list_models()
    model = zoo.create_model("tiny-plugin", image_size=16, base_channels=2, max_channels=4)
    assert model.model_name == "tiny-plugin"
    entry = next(e for e in registry.MODELS.all_entries() if e.name == "tiny-plugin")
    assert entry.source == "tiny_plugin:TinyPluginVAE"


# docs/reliability.md: a plugin raises or blocks at import (20 s limit)
def test_broken_plugin_is_reported_and_harmless(isolated_registry, tmp_path, monkeypatch):
    _plugin_module(tmp_path, monkeypatch, "raising_plugin", "raise RuntimeError('boom at import')")
    _plugin_module(tmp_path, monkeypatch, "tiny_plugin", TINY_PLUGIN)
    _inject_entry_points(
        monkeypatch,
        ("raising", "raising_plugin:Model"),
        ("not-a-model", "json:dumps"),
        ("tiny-plugin", "tiny_plugin:TinyPluginVAE"),
    )
    assert "tiny-plugin" in zoo.list_models()
    broken = {plugin.name: plugin for plugin in registry.MODELS.all_broken()}
    assert set(broken) == {"raising", "not-a-model"}
    assert "RuntimeError: boom at import" in broken["raising"].error
    assert "not a zoo.GenerativeModel subclass" in broken["not-a-model"].error
    with pytest.raises(ZooError, match="plugin raising_plugin:Model, which failed to load"):
        zoo.create_model("raising")


# docs/reliability.md: a plugin raises or blocks at import (20 s limit)
def test_plugin_blocking_at_import_times_out(isolated_registry, tmp_path, monkeypatch):
    _plugin_module(tmp_path, monkeypatch, "slow_plugin", "import time\ntime.sleep(30)\n")
    _inject_entry_points(monkeypatch, ("slow", "slow_plugin:Model"))
    assert registry.PLUGIN_IMPORT_TIMEOUT_S == 20  # the limit docs/plugins.md states
    monkeypatch.setattr(registry, "PLUGIN_IMPORT_TIMEOUT_S", 0.5)
    assert "vae" in zoo.list_models()
    assert "TimeoutError" in registry.MODELS.all_broken()[0].error


# docs/reliability.md: a plugin raises or blocks at import (20 s limit)
def test_name_clash_with_builtin_names_both_sources(isolated_registry, tmp_path, monkeypatch):
    _plugin_module(tmp_path, monkeypatch, "tiny_plugin", TINY_PLUGIN)
    _inject_entry_points(monkeypatch, ("cvae", "tiny_plugin:TinyPluginVAE"))
    zoo.list_models()
    [clash] = registry.MODELS.all_broken()
    assert "registered twice: by zoo" in clash.error
    assert "tiny_plugin:TinyPluginVAE" in clash.error
    assert zoo.create_model("cvae", num_attributes=2).conditional


def test_looking_up_a_builtin_imports_no_plugin(isolated_registry, tmp_path, monkeypatch):
    """A plugin that is slow or blocks at import costs only what needs every plugin (listing)
    or that plugin (its name): creating or loading a built-in model never imports it."""
    _plugin_module(tmp_path, monkeypatch, "unneeded_plugin", TINY_PLUGIN)
    _plugin_module(tmp_path, monkeypatch, "named_plugin", TINY_PLUGIN)
    _inject_entry_points(
        monkeypatch,
        ("unneeded", "unneeded_plugin:TinyPluginVAE"),
        ("named", "named_plugin:TinyPluginVAE"),
    )
    zoo.create_model("vae", image_size=16, base_channels=2, max_channels=4)
    registry.get_model_class("cvae")
    assert "unneeded_plugin" not in sys.modules and "named_plugin" not in sys.modules
    registry.get_model_class("named")  # a plugin's name imports that entry point only
    assert "named_plugin" in sys.modules and "unneeded_plugin" not in sys.modules
    assert "unneeded" in zoo.list_models() and "unneeded_plugin" in sys.modules


TINY_DISTRIBUTION = "tiny-zoo-plugin"


def _install(site: Path, monkeypatch) -> None:
    """TINY_PLUGIN as an installed distribution (a dist-info folder) on sys.path."""
    site.mkdir()
    (site / "tiny_plugin.py").write_text(textwrap.dedent(TINY_PLUGIN))
    info = site / "tiny_zoo_plugin-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {TINY_DISTRIBUTION}\nVersion: 0.3\n"
    )
    (info / "entry_points.txt").write_text(
        "[zoo.models]\ntiny-plugin = tiny_plugin:TinyPluginVAE\n"
    )
    monkeypatch.syspath_prepend(str(site))
    sys.modules.pop("tiny_plugin", None)


# docs/reliability.md: a checkpoint's model comes from a plugin that is not installed
def test_a_checkpoint_from_a_plugin_that_is_not_installed_names_the_distribution(
    isolated_registry, tmp_path, monkeypatch
):
    builtins = dict(registry.MODELS.entries)
    with monkeypatch.context() as installed:
        _install(tmp_path / "site", installed)
        model = zoo.create_model("tiny-plugin", image_size=16, base_channels=2, max_channels=4)
        entry = registry.MODELS.entry("tiny-plugin")
        assert (entry.source, entry.version) == (TINY_DISTRIBUTION, "0.3")
        path = tmp_path / "model.safetensors"
        zoo.save_checkpoint(path, model, source=entry.source)
        assert zoo.load(path).model_name == "tiny-plugin"
    info = zoo.read_info(path)
    assert (info.source, info.source_version) == (TINY_DISTRIBUTION, "0.3")
    # the distribution is gone: a fresh registry cannot find the model
    monkeypatch.setattr(registry.MODELS, "entries", dict(builtins))
    monkeypatch.setattr(registry.MODELS, "plugins_loaded", False)
    sys.modules.pop("tiny_plugin", None)
    with pytest.raises(ZooError) as caught:
        zoo.load(path)
    message = str(caught.value)
    assert "model 'tiny-plugin' comes from the plugin tiny-zoo-plugin 0.3" in message
    assert "it is not installed; pip install 'tiny-zoo-plugin==0.3'" in message
    assert str(path) in message and "\n" not in message
