"""Where data comes from: --data, then $ZOO_DATA, then ./data/celeba, then synthetic faces."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from zoo.data import Source, load_data, resolve_source, synth
from zoo.errors import ZooError
from zoo.files import cache_dir


def warnings_in(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_spec_beats_environment_which_beats_the_default_folder(make_celeba, tmp_path, monkeypatch):
    explicit, from_env = make_celeba("explicit"), make_celeba("env")
    default = make_celeba("work/data/celeba")
    monkeypatch.chdir(tmp_path / "work")
    assert resolve_source(None) == ("celeba", default.resolve())
    monkeypatch.setenv("ZOO_DATA", str(from_env))
    assert resolve_source(None) == ("celeba", from_env.resolve())
    assert resolve_source(str(explicit)) == ("celeba", explicit.resolve())
    monkeypatch.setenv("ZOO_DATA", "mnist:" + str(tmp_path))
    (tmp_path / "t10k-images-idx3-ubyte.gz").touch()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").touch()
    assert resolve_source(None) == ("mnist", tmp_path.resolve())


# docs/reliability.md: `--data` is missing or not a CelebA folder
@pytest.mark.parametrize(
    ("remove", "expected"),
    [
        ("list_attr_celeba.txt", "is not a CelebA folder: list_attr_celeba.txt is missing"),
        ("list_eval_partition.txt", "list_eval_partition.txt is missing"),
        ("img_align_celeba", "img_align_celeba/ is missing"),
    ],
)
def test_an_explicit_folder_that_is_not_celeba_is_an_error(make_celeba, remove, expected):
    root = make_celeba()
    target = root / remove
    if target.is_dir():
        for child in target.iterdir():
            child.unlink()
        target.rmdir()
    else:
        target.unlink()
    with pytest.raises(ZooError) as error:
        resolve_source(str(root))
    message = str(error.value)
    assert expected in message and "--data" in message and "synthetic faces" in message
    assert "\n" not in message


# docs/reliability.md: `--data` is missing or not a CelebA folder
def test_an_explicit_folder_that_does_not_exist_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(ZooError, match=r"nowhere does not exist; point --data"):
        resolve_source(None)
    with pytest.raises(ZooError, match="needs a folder"):
        resolve_source("mnist:")


# docs/reliability.md: `--data` is missing or not a CelebA folder
def test_a_zipped_image_folder_gets_a_hint(make_celeba):
    root = make_celeba()
    for child in (root / "img_align_celeba").iterdir():
        child.unlink()
    (root / "img_align_celeba").rmdir()
    (root / "img_align_celeba.zip").touch()
    with pytest.raises(ZooError, match="unzip img_align_celeba.zip there first"):
        resolve_source(str(root))


def test_without_any_celeba_synthetic_faces_are_made_once_and_announced_per_resolution(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ZOO_SYNTHETIC_N", "20")
    with caplog.at_level(logging.WARNING, logger="zoo"):
        kind, folder = resolve_source(None, progress=False)
    assert kind == "celeba"
    assert folder == cache_dir() / "synthetic-faces-v1-n20-s64-seed0"
    assert len(list((folder / "img_align_celeba").iterdir())) == 20
    (warning,) = warnings_in(caplog)
    assert "no CelebA found" in warning and "synthetic faces" in warning
    assert "--data DIR" in warning and "ZOO_DATA" in warning

    def no_drawing(*args):
        raise AssertionError("generated again")

    monkeypatch.setattr(synth, "render_faces", no_drawing)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="zoo"):  # a command passes its resolved source on
        data = load_data(Source(kind, folder), "train", 32, progress=False)
    assert data.name == "synthetic-faces" and len(data) == 16
    assert warnings_in(caplog) == []
    with caplog.at_level(logging.WARNING, logger="zoo"):  # the next command: no drawing, a notice
        assert resolve_source(None, progress=False) == (kind, folder)
    assert len(warnings_in(caplog)) == 1
    assert not [p.name for p in cache_dir().iterdir() if p.name.startswith(".")]


def test_an_incomplete_default_folder_falls_back_naming_what_is_missing(
    make_celeba, tmp_path, monkeypatch, caplog
):
    default = make_celeba("work/data/celeba")
    (default / "list_eval_partition.txt").unlink()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("ZOO_SYNTHETIC_N", "10")
    with caplog.at_level(logging.WARNING, logger="zoo"):
        assert resolve_source(None, progress=False)[1].name.startswith("synthetic-faces")
    (warning,) = warnings_in(caplog)
    assert "has no list_eval_partition.txt" in warning
    monkeypatch.setenv("ZOO_SYNTHETIC_N", "5")
    with pytest.raises(ZooError, match="ZOO_SYNTHETIC_N='5' must be a whole number >= 10"):
        resolve_source(None)


def test_cache_dir_order(monkeypatch, tmp_path):
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "zoo-cache"))
    assert cache_dir() == (tmp_path / "zoo-cache").resolve()
    monkeypatch.delenv("ZOO_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == (tmp_path / "xdg" / "zoo").resolve()
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == Path(tmp_path / "home" / ".cache" / "zoo")


# docs/reliability.md: `$ZOO_CACHE_DIR` is a file, or a path under a file
@pytest.mark.parametrize("below", ["", "sub/folder"])
def test_a_cache_dir_that_is_a_file_is_one_line(make_celeba, tmp_path, monkeypatch, below):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file")
    monkeypatch.setenv("ZOO_CACHE_DIR", str(blocker / below))
    with pytest.raises(ZooError) as error:
        load_data(str(make_celeba()), "all", 16, progress=False)
    message = str(error.value)
    assert f"{blocker} is a file, not a folder; set ZOO_CACHE_DIR to a folder" in message
    result = CliRunner().invoke(app, ["data", "prepare", "--data", str(make_celeba("other"))])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "is a file, not a folder" in result.output


def test_zoo_train_resolves_its_data_once(tmp_path, monkeypatch, caplog):
    """One notice per command: a second resolution (as train once made, hidden by a
    module-level set) would announce the fallback twice."""
    from zoo.train import Trainer, TrainSettings

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ZOO_SYNTHETIC_N", "20")
    resolve_source(None, progress=False)  # draw the faces outside the measured command
    caplog.clear()
    settings = TrainSettings(
        model="vae", image_size=16, max_steps=1, batch_size=8, out=str(tmp_path / "runs")
    )
    with caplog.at_level(logging.WARNING, logger="zoo"):
        Trainer(settings, progress=False)
    assert len([w for w in warnings_in(caplog) if "no CelebA found" in w]) == 1
