"""`zoo export`: a checkpoint as a hub-ready folder (the layout and its checks: `zoo.hub`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from zoo.card import render_card, signed
from zoo.checkpoint import read_info
from zoo.errors import ZooError
from zoo.files import atomic_write_bytes, atomic_write_text
from zoo.hub import (
    CARD_FILE,
    CONFIG_FILE,
    EXTRAS,
    MODEL_FILE,
    checkpoint_file,
    export_config,
    is_export,
)


def export_folder(checkpoint: Path, out: Path) -> Path:
    """Write the hub-ready folder of ``checkpoint`` to ``out``; returns its model file.

    ``out`` must be new, empty or an earlier export: zoo never mixes its files with others."""
    source = checkpoint_file(checkpoint)
    info = read_info(source)  # refuses a file that is not a zoo checkpoint
    _check_target(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / MODEL_FILE, source.read_bytes())
    for name in EXTRAS:
        if (source.parent / name).is_file():
            atomic_write_bytes(out / name, (source.parent / name).read_bytes())
    samples = sorted((source.parent / "samples").glob("step_*.png"))
    if samples:  # the card shows the latest grid
        (out / "samples").mkdir(exist_ok=True)
        atomic_write_bytes(out / "samples" / samples[-1].name, samples[-1].read_bytes())
    atomic_write_text(out / CONFIG_FILE, json.dumps(export_config(info), indent=2) + "\n")
    atomic_write_text(out / CARD_FILE, signed(render_card(read_info(out / MODEL_FILE))))
    return out / MODEL_FILE


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ZooError(f"{out} is a file; give a folder to export into")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not is_export(out):
        raise ZooError(
            f"{out} is not empty and is not an earlier zoo export; give a new or empty folder"
        )
    stale = out / "samples"
    if stale.is_dir():  # an earlier export's grid would sit beside the new one
        shutil.rmtree(stale)
