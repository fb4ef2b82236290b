"""Plugins from the outside: the example distribution installed for real, and broken plugins."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from zoo import registry

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "plugins" / "zoo-vampprior"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    """The example plugin pip-installed into a private folder; the environment that sees it."""
    return pip_install_into(EXAMPLE, tmp_path_factory.mktemp("site"))


def pip_install_into(package: Path, target: Path) -> dict[str, str]:
    """`pip install` a plugin into a private folder; the environment in which it is installed."""
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
    command += ["--no-build-isolation", "--target", str(target), str(package)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    path = os.pathsep.join(filter(None, [str(target), str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def zoo_command(env: dict[str, str], *args: object, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "import cli; cli.main()", *map(str, args)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.long
def test_installed_plugin_works_with_every_command(installed, synthetic_faces, tmp_path):
    env = {**installed, "ZOO_CACHE_DIR": str(tmp_path / "cache")}
    listed = zoo_command(env, "list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "vampprior-cvae" in listed.stdout and "zoo-vampprior" in listed.stdout

    checked = zoo_command(env, "check-plugin", "vampprior-cvae", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "passes all 12 checks" in checked.stdout

    trained = zoo_command(
        env,
        "train",
        "vampprior-cvae",
        "--data",
        synthetic_faces,
        "--image-size",
        16,
        "--max-steps",
        3,
        "--batch-size",
        16,
        "--no-progress",
        "-o",
        "base_channels=4",
        "-o",
        "max_channels=8",
        "-o",
        "num_pseudo_inputs=5",
        cwd=tmp_path,
    )
    assert trained.returncode == 0, trained.stderr
    [checkpoint] = (tmp_path / "runs").glob("vampprior-cvae-*/model.safetensors")
    info = json.loads(zoo_info_json(env, checkpoint, tmp_path))
    assert info == {"model": "vampprior-cvae", "source": "zoo-vampprior"}

    generated = zoo_command(
        env,
        "generate",
        checkpoint,
        "-n",
        4,
        "--attr",
        "Smiling=1",
        "--out",
        tmp_path / "g.png",
        cwd=tmp_path,
    )
    assert generated.returncode == 0, generated.stderr
    assert (tmp_path / "g.png").stat().st_size > 0
    edited = zoo_command(
        env,
        "edit",
        checkpoint,
        "--set",
        "Smiling=1",
        "-n",
        2,
        "--out",
        tmp_path / "e.png",
        cwd=tmp_path,
    )
    assert edited.returncode == 0, edited.stderr
    benched = zoo_command(
        env,
        "bench",
        checkpoint,
        "--metric",
        "recon",
        "--metric",
        "throughput",
        "--n",
        8,
        "--throughput-batch-size",
        4,
        "--no-progress",
        "--out",
        tmp_path / "r.json",
        cwd=tmp_path,
    )
    assert benched.returncode == 0, benched.stderr
    result = json.loads((tmp_path / "r.json").read_text())["results"][0]
    assert result["model"] == "vampprior-cvae" and result["source"] == "zoo-vampprior"
    assert result["metrics"]["recon"]["n"] == 8


def zoo_info_json(env: dict[str, str], checkpoint: Path, cwd: Path) -> str:
    code = (
        "import json, zoo; i = zoo.read_info(__import__('sys').argv[1]); "
        "print(json.dumps({'model': i.model_name, 'source': i.source}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(checkpoint)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout


def test_the_plugins_own_tests_pass(installed):
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
        env=installed,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:]
    assert " passed" in done.stdout


def install_distribution(
    site: Path, name: str, modules: dict[str, str], entry_points: dict[str, dict[str, str]]
) -> dict[str, str]:
    """A distribution as pip leaves it (modules and a ``*.dist-info`` with METADATA and
    entry_points.txt) in `site`, without running pip; the environment that sees it."""
    site.mkdir(parents=True, exist_ok=True)
    for module, body in modules.items():
        (site / f"{module}.py").write_text(textwrap.dedent(body))
    info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "".join(
            f"[{group}]\n" + "".join(f"{key} = {value}\n" for key, value in points.items())
            for group, points in entry_points.items()
        )
    )
    path = os.pathsep.join(filter(None, [str(site), str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


BUGGY_METRIC = """
    from benchmarks.metric import Metric


    class Buggy(Metric):
        '''A third-party metric with a bug.'''

        title = "Buggy"

        def compute(self, context):
            return {"value": 1 / 0}

        def headline(self, result):
            return {"buggy": str(result["value"])}
"""


# docs/reliability.md: a metric raises anything (a bug, in zoo or a plugin)
def test_a_metric_plugin_that_raises_is_recorded_and_the_others_still_run(tiny_vae, tmp_path):
    env = install_distribution(
        tmp_path / "site",
        "buggy-metric",
        {"buggy_metric": BUGGY_METRIC},
        {"zoo.metrics": {"buggy": "buggy_metric:Buggy"}},
    )
    env["ZOO_CACHE_DIR"] = str(tmp_path / "cache")
    out = tmp_path / "results.json"
    args = ["bench", tiny_vae, "--metric", "buggy", "--metric", "recon", "--n", 4]
    done = zoo_command(env, *args, "--no-progress", "--device", "cpu", "--out", out, cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert "not computed: vae buggy: ZeroDivisionError: division by zero" in done.stderr
    [result] = json.loads(out.read_text())["results"]
    assert result["errors"] == {"buggy": "ZeroDivisionError: division by zero"}
    assert result["metrics"]["recon"]["n"] == 4 and "buggy" not in result["metrics"]


MEAN_RECON_METRIC = """
    import torch

    from benchmarks.metric import Metric


    class MeanRecon(Metric):
        '''A third-party metric: the mean pixel value of the reconstructions.'''

        title = "Mean reconstruction"

        @torch.inference_mode()
        def compute(self, context):
            model = context.model.eval()
            total = sum(model.reconstruct(x, y).sum().item() for _, x, y in context.batches())
            pixels = context.count * model.config.channels * model.config.image_size**2
            return {"mean": total / pixels, "n": context.count}

        def headline(self, result):
            return {"mean recon": f"{result['mean']:.3f}"}
"""


def test_bench_without_metric_options_runs_the_plugin_metrics_after_the_builtins(
    tiny_vae, tmp_path
):
    env = install_distribution(
        tmp_path / "site",
        "mean-recon-metric",
        {"mean_recon_metric": MEAN_RECON_METRIC},
        {"zoo.metrics": {"mean-recon": "mean_recon_metric:MeanRecon"}},
    )
    env["ZOO_CACHE_DIR"] = str(tmp_path / "cache")
    env["TORCH_HOME"] = str(tmp_path / "torch")  # no FID weights: fid fails fast, is recorded
    env.pop("ZOO_FID_WEIGHTS", None)
    out = tmp_path / "results.json"
    args = ["bench", tiny_vae, "--n", 4, "--throughput-batch-size", 2, "--no-progress"]
    done = zoo_command(env, *args, "--device", "cpu", "--out", out, cwd=tmp_path)
    assert "Traceback" not in done.stderr, done.stderr
    report = json.loads(out.read_text())
    assert report["metrics"] == ["fid", "recon", "edit", "throughput", "mean-recon"]
    [result] = report["results"]
    mean_recon = result["metrics"]["mean-recon"]
    assert mean_recon["n"] == 4 and 0 < mean_recon["mean"] < 1
    assert "| mean recon |" in out.with_suffix(".md").read_text()  # a leaderboard column
    # the built-ins were all attempted: each either measured or said why not
    for name in ("fid", "recon", "edit", "throughput"):
        assert (name in result["metrics"]) != (name in result["errors"]), name
    assert "fid" in result["errors"] and done.returncode == 1


OPTION_METRIC = """
    from __future__ import annotations

    from dataclasses import dataclass

    from benchmarks.metric import Metric, option


    class Scaled(Metric):
        '''A third-party metric with options of its own: it reports them back.'''

        title = "Scaled"

        @dataclass(frozen=True)
        class Options:
            factor: float = option(1.5, "What the count is multiplied by.")
            steps: int = option(3, "A whole number.", low=1)
            label: str | None = option(None, "A name to carry.")
            loud: bool = option(False, "A switch.")

        def compute(self, context):
            options = context.options(self)
            return {
                "scaled": context.count * options.factor,
                "steps_twice": options.steps * 2,
                "label": options.label,
                "loud": options.loud,
            }

        def headline(self, result):
            return {"scaled": f"{result['scaled']:g}"}
"""


@pytest.fixture
def option_plugin(tmp_path) -> dict[str, str]:
    """A metric distribution whose metric declares options, installed as pip would."""
    env = install_distribution(
        tmp_path / "site",
        "scaled-metric",
        {"scaled_metric": OPTION_METRIC},
        {"zoo.metrics": {"scaled": "scaled_metric:Scaled"}},
    )
    return {**env, "ZOO_CACHE_DIR": str(tmp_path / "cache")}


def test_a_plugin_metric_gets_its_options_from_the_command_line(option_plugin, tiny_vae, tmp_path):
    """``--option scaled.NAME=VALUE`` reaches the plugin's compute parsed to each field's type
    (a float multiplies, an int doubles, a bool is a bool), unset fields keep the dataclass
    defaults, and results.json records the options beside the result."""
    out = tmp_path / "results.json"
    args = ["bench", tiny_vae, "--metric", "scaled", "--n", 4, "--no-progress", "--out", out]
    given = ["--option", "scaled.factor=2.5", "--option", "scaled.loud=yes"]
    done = zoo_command(option_plugin, *args, *given, "--device", "cpu", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    [result] = json.loads(out.read_text())["results"]
    assert result["metrics"]["scaled"] == {
        "scaled": 10.0, "steps_twice": 6, "label": None, "loud": True,
    }  # fmt: skip
    assert result["options"]["scaled"] == {
        "factor": 2.5, "steps": 3, "label": None, "loud": True,
    }  # fmt: skip
    # another option given: the first two are back at the dataclass's defaults
    given = ["--option", "scaled.steps=7", "--option", "scaled.label=hello"]
    done = zoo_command(option_plugin, *args, *given, "--device", "cpu", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    [result] = json.loads(out.read_text())["results"]
    assert result["metrics"]["scaled"] == {
        "scaled": 6.0, "steps_twice": 14, "label": "hello", "loud": False,
    }  # fmt: skip


@pytest.mark.long
def test_help_metric_lists_a_plugin_metrics_options_and_bad_ones_are_one_line(
    option_plugin, tmp_path
):
    shown = zoo_command(option_plugin, "bench", "--help-metric", "scaled", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith("scaled (scaled-metric): A third-party metric with options")
    assert lines[1] == "options, set with --option scaled.NAME=VALUE:"
    assert lines[2:] == [
        "  scaled.factor: a finite number; default 1.5",
        "      What the count is multiplied by.",
        "  scaled.steps: an integer of at least 1; default 3",
        "      A whole number.",
        "  scaled.label: a string or none; default none",
        "      A name to carry.",
        "  scaled.loud: true or false; default False",
        "      A switch.",
    ]
    for option, said in (
        (
            "scaled.factr=2",
            "error: --option scaled.factr: metric scaled has no option 'factr'; "
            "its options: factor, steps, label, loud (zoo bench --help-metric scaled)",
        ),
        ("scaled.loud=maybe", "--option scaled.loud must be true or false, got 'maybe'"),
    ):  # fmt: skip; an int's refusal is tested in process (test_bench.py)
        # checked before anything loads: the checkpoint does not exist
        refused = zoo_command(option_plugin, "bench", "m.safetensors", "--option", option,
                              cwd=tmp_path)  # fmt: skip
        assert refused.returncode == 1, refused.stdout
        [line] = refused.stderr.strip().splitlines()
        assert said in line, line


# docs/reliability.md: a plugin is slow or blocks at import
def test_a_plugin_is_imported_only_by_the_commands_that_need_it(tiny_vae, tmp_path):
    """A plugin's import cost (here: it leaves a mark, then fails) is paid by `zoo list`, not by
    commands on a built-in model."""
    marker = tmp_path / "imported"
    env = install_distribution(
        tmp_path / "site",
        "heavy-plugin",
        {"heavy_plugin": f"open({str(marker)!r}, 'a').write('x')\nraise ImportError('heavy')\n"},
        {"zoo.models": {"heavy": "heavy_plugin:Model"}},
    )
    env["ZOO_CACHE_DIR"] = str(tmp_path / "cache")
    generated = zoo_command(env, "generate", tiny_vae, "-n", 2, "--out", "g.png", cwd=tmp_path)
    assert generated.returncode == 0, generated.stderr
    assert not marker.exists()
    listed = zoo_command(env, "list", cwd=tmp_path)
    assert listed.returncode == 0 and "heavy" in listed.stdout.split("failed to load")[1]
    assert marker.read_text() == "x"


# -- broken plugins ------------------------------------------------------------------------------

BROKEN = {
    "raising_plugin": "raise ImportError('needs a package that is not installed')",
    "methodless_plugin": """
        import zoo

        class NoDecoder(zoo.GenerativeModel):
            def encode(self, x, y=None):
                raise NotImplementedError
    """,
    "encodeless_plugin": """
        import zoo

        class NoEncoder(zoo.GenerativeModel):
            def decode_logits(self, z, y=None):
                raise NotImplementedError
    """,
    "misshapen_plugin": """
        import torch
        from zoo.models.vae import VAE

        class Misshapen(VAE):
            def decode(self, z, y=None):
                return super().decode(z, y)[:, :, :-1]  # one row short
    """,
    "nan_plugin": """
        import torch
        from zoo.models.vae import VAE

        class NaNDecoder(VAE):
            def decode_logits(self, z, y=None):
                return torch.full_like(super().decode_logits(z, y), float("nan"))
    """,
}


@pytest.fixture
def broken_plugins(monkeypatch, tmp_path):
    for module, body in BROKEN.items():
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    points = [
        importlib.metadata.EntryPoint("raising", "raising_plugin:Model", "zoo.models"),
        importlib.metadata.EntryPoint("methodless", "methodless_plugin:NoDecoder", "zoo.models"),
        importlib.metadata.EntryPoint("encodeless", "encodeless_plugin:NoEncoder", "zoo.models"),
        importlib.metadata.EntryPoint("misshapen", "misshapen_plugin:Misshapen", "zoo.models"),
        importlib.metadata.EntryPoint("nan", "nan_plugin:NaNDecoder", "zoo.models"),
        importlib.metadata.EntryPoint("vae", "misshapen_plugin:Misshapen", "zoo.models"),
    ]
    real = importlib.metadata.entry_points
    monkeypatch.setattr(
        importlib.metadata,
        "entry_points",
        lambda **p: (
            importlib.metadata.EntryPoints(points) if p.get("group") == "zoo.models" else real(**p)
        ),
    )
    registry.MODELS.names()
    monkeypatch.setattr(registry.MODELS, "entries", dict(registry.MODELS.entries))
    monkeypatch.setattr(registry.MODELS, "broken", {})
    monkeypatch.setattr(registry.MODELS, "plugins_loaded", False)


# docs/reliability.md: a plugin raises or blocks at import (20 s limit)
def test_broken_plugins_are_named_and_zoo_list_still_works(broken_plugins):
    result = CliRunner().invoke(app, ["list"])
    assert result.exit_code == 0, result.output
    assert "cvae" in result.output and "misshapen" in result.output
    failed = result.output.split("plugins that failed to load")[1]
    assert "raising" in failed and "methodless" in failed and "encodeless" in failed
    errors = {plugin.name: plugin.error for plugin in registry.MODELS.all_broken()}
    assert "needs a package that is not installed" in errors["raising"]
    assert "does not implement decode_logits" in errors["methodless"]
    assert "NoEncoder does not implement encode" in errors["encodeless"]
    assert "registered twice: by zoo" in errors["vae"]  # the clash with the built-in vae


# docs/reliability.md: a plugin returns wrong shapes or NaN
@pytest.mark.parametrize(
    ("name", "failure"),
    [("misshapen", "expected (3, 3, 16, 16)"), ("nan", "decode has NaN or Inf")],
)
def test_check_plugin_names_the_broken_promise(broken_plugins, name, failure):
    result = CliRunner().invoke(app, ["check-plugin", name])
    assert result.exit_code == 1
    assert failure in result.output and "FAIL" in result.output
    assert f"{name} fails" in result.output


def test_every_builtin_model_passes_the_conformance_suite():
    for name in registry.MODELS.names():
        if registry.MODELS.entry(name).source != "zoo":
            continue
        result = CliRunner().invoke(app, ["check-plugin", name])
        assert result.exit_code == 0, result.output


def _plugin_guide_block(after: str) -> str:
    """The first fenced code block after the line `after` in the plugin guide, docs/plugins.md
    (the example lived in the README until the README became a front door)."""
    text = (ROOT / "docs" / "plugins.md").read_text()
    rest = text[text.index(after) :]
    start = rest.index("```")
    body_start = rest.index("\n", start) + 1
    return rest[body_start : rest.index("```", body_start)]


def test_the_plugin_guide_example_installs_and_conforms(tmp_path):
    package = tmp_path / "my-zoo-model"
    package.mkdir()
    (package / "pyproject.toml").write_text(_plugin_guide_block("`pyproject.toml`:"))
    (package / "my_zoo_model.py").write_text(_plugin_guide_block("`my_zoo_model.py`:"))
    env = pip_install_into(package, tmp_path / "site")
    checked = zoo_command(env, "check-plugin", "mlp-vae", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "my-zoo-model" in checked.stdout and "passes all 12 checks" in checked.stdout
