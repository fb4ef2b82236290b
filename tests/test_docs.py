"""The documentation: links that resolve, a README that stays a front door, set-up commands
that are what CI runs, and the metric plugin of docs/plugins.md working as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
README_MAX_LINES = 300

# [text](target) and ![alt](target); the target ends at the first space (a "title") or ")"
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def relative_links(text: str) -> list[str]:
    """Every Markdown link and image target outside code that points at a file of the
    repository: without http(s):, mailto: and pure #anchors, and with any #fragment removed."""
    targets = []
    for target in LINK.findall(CODE_SPAN.sub("", FENCE.sub("", text))):
        if re.match(r"(?i)(https?:|mailto:|#)", target):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def broken_links(page: Path) -> list[str]:
    return [
        target
        for target in relative_links(page.read_text(encoding="utf-8"))
        if not (page.parent / target).exists()
    ]


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file(page):
    assert broken_links(page) == []


def test_a_broken_link_is_caught(tmp_path):
    (tmp_path / "there.md").write_text("x")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md) [ok too](there.md#part) ![gone](docs/missing.png) [web](https://x.org)\n"
        "[mail](mailto:a@b.c) [anchor](#top) [gone too](nowhere.md#part)\n"
        "```\n[in code](not-a-link.md)\n```\n`[span](not-either.md)`\n"
    )
    assert broken_links(page) == ["docs/missing.png", "nowhere.md"]


def test_the_docs_pages_exist_and_the_readme_links_each():
    linked = {(README.parent / target).resolve() for target in relative_links(README.read_text())}
    assert DOCS, "docs/*.md is missing"
    assert [page for page in DOCS if page.resolve() not in linked] == []


def test_the_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def setup_commands() -> list[str]:
    """The fenced shell commands of the README's "Set up on a fresh machine" section."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Set up on a fresh machine\n", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.DOTALL)]


def test_the_readme_set_up_commands_are_what_ci_runs():
    main_job, tests = setup_commands()  # exactly two: the main job, then the tests
    assert main_job.startswith("pip install -e . && zoo train ") and "\n" not in main_job
    assert tests == "pip install -e '.[dev]' && python -m pytest"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == tests  # `.ci/run` ends by running exactly the README's test command


# -- the metric plugin of docs/plugins.md, installed from the page alone -----------------------


def doc_block(page: Path, after: str) -> str:
    """The first fenced code block after the text `after` on a docs page."""
    text = page.read_text(encoding="utf-8")
    rest = text[text.index(after) :]
    start = rest.index("```")
    body_start = rest.index("\n", start) + 1
    return rest[body_start : rest.index("```", body_start)]


def test_the_metric_plugin_of_the_docs_installs_and_benchmarks(tiny_vae, tmp_path):
    page = ROOT / "docs" / "plugins.md"
    package = tmp_path / "my-zoo-metric"
    package.mkdir()
    (package / "pyproject.toml").write_text(doc_block(page, "`my-zoo-metric/pyproject.toml`:"))
    (package / "my_zoo_metric.py").write_text(doc_block(page, "`my-zoo-metric/my_zoo_metric.py`:"))
    site = tmp_path / "site"
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
    command += ["--no-build-isolation", "--target", str(site), str(package)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)

    cache = str(tmp_path / "cache")
    path = os.pathsep.join(filter(None, [str(site), str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "ZOO_CACHE_DIR": cache}
    out = tmp_path / "results.json"
    args = ["bench", tiny_vae, "--metric", "recon-l1", "--n", 4]
    args += ["--option", "recon-l1.per_channel=true"]
    args += ["--device", "cpu", "--out", out, "--no-progress"]
    done = subprocess.run(
        [sys.executable, "-c", "import cli; cli.main()", *map(str, args)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    [result] = json.loads(out.read_text())["results"]
    metric = result["metrics"]["recon-l1"]
    assert metric["n"] == 4 and 0 <= metric["l1"] <= 1
    assert len(metric["l1_per_channel"]) == 3  # the option reached compute
    assert result["options"]["recon-l1"] == {"per_channel": True}
    assert "| recon L1 |" in out.with_suffix(".md").read_text()  # its leaderboard column
