"""The layering that pyproject.toml declares (import-linter contracts), and no import cycles.

A new import from a lower layer to a higher one, from the library into the harness or the
CLI, or one that closes a cycle, fails here. docs/layout.md says what each layer holds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
LINT = (
    "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
)


def lint(project: Path) -> subprocess.CompletedProcess[str]:
    """import-linter on the project in `project` (its pyproject.toml and packages only)."""
    env = {**os.environ, "PYTHONPATH": str(project)}
    return subprocess.run(
        [sys.executable, "-c", LINT], cwd=project, env=env, capture_output=True, text=True
    )


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Every cycle a depth-first walk of the module graph meets (empty: the graph is a DAG)."""
    state: dict[str, str] = {}
    path: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if state.get(imported) == "open":
                found.append([*path[path.index(imported) :], imported])
            elif imported not in state:
                visit(imported)
        path.pop()
        state[module] = "done"

    for module in sorted(graph.modules):
        if module not in state:
            visit(module)
    return found


def test_the_import_contracts_in_pyproject_hold():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_zoo_and_benchmarks_have_no_import_cycle():
    assert cycles(grimp.build_graph("zoo", "benchmarks")) == []


def test_an_upward_import_or_one_into_the_harness_breaks_the_contracts(tmp_path):
    """The contracts can fail: a copy of the project with a file helper that imports the
    trainer, and an error type that imports the harness."""
    for name in ("zoo", "benchmarks"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "zoo" / "files.py", "a") as handle:
        handle.write("\n\ndef _upward():\n    from zoo import train  # noqa\n")
    with open(tmp_path / "zoo" / "errors.py", "a") as handle:
        handle.write("\n\ndef _into_the_harness():\n    import benchmarks.fid  # noqa\n")
    result = lint(tmp_path)
    assert result.returncode != 0
    assert "zoo.files -> zoo.train" in result.stdout
    assert "zoo.errors -> benchmarks.fid" in result.stdout
