"""Hub-ready folders: a checkpoint as a Hugging Face model repo, loadable offline.

`zoo.export.export_folder` writes what ``huggingface_hub.upload_folder`` takes as a model
repo, the way timm and diffusers models travel: ``model.safetensors`` (the zoo file, byte for byte),
``config.json`` (what `zoo.load` needs, readable without zoo) and the model card
``README.md`` with its ``model-index``. `checkpoint_file` turns whatever a user names into
the one file zoo reads: a ``model.safetensors``, a run folder, an exported folder, or
``hf-hub:ORG/NAME[@REVISION]``, resolved through ``huggingface_hub`` (the ``hub`` extra),
which honours ``HF_HUB_OFFLINE`` and its local cache. An exported folder is checked before
use: its ``config.json`` must agree with the file's own metadata, and every file must lie
inside the folder (inside the repo's cache folder for the hub), so an edited or mixed folder
is refused in one line instead of loading something other than it says.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from zoo.errors import ZooError
from zoo.files import read_header
from zoo.metadata import MODEL_HINT, MODEL_KIND, CheckpointInfo
from zoo.names import printable

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
EXPORT_FORMAT = "zoo-hub/1"
HUB_PREFIX = "hf-hub:"
MAX_CONFIG_BYTES = 1024 * 1024
# copied beside the file when the run has them, so the card shows its results and pictures
EXTRAS = ("bench_results.json", "curves.png", "edit_intensity.json")
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
REVISION = re.compile(r"[\w.-]{1,100}")
# the header fields config.json repeats, each compared on load
AGREEING = ("model", "source", "config", "attributes", "preprocess")


def export_config(info: CheckpointInfo) -> dict[str, Any]:
    """config.json for a checkpoint."""
    return {
        "format": EXPORT_FORMAT,
        "library_name": "zoo",
        "model": info.model_name,
        "source": info.source,
        "config": info.config,
        "attributes": info.attr_names,
        "preprocess": info.preprocess,
        "image_size": info.config.get("image_size"),
        "channels": info.config.get("channels"),
        "latent_dim": info.config.get("latent_dim"),
        "value_range": [0.0, 1.0],
        "weights": MODEL_FILE,
    }


def checkpoint_file(ref: str | Path) -> Path:
    """The ``model.safetensors`` that ``ref`` names: the file, a run or exported folder that
    holds one, or ``hf-hub:ORG/NAME[@REVISION]``. Refuses in one line what it cannot use."""
    text = str(ref)
    if text.startswith(HUB_PREFIX):
        folder, root = _hub_snapshot(text[len(HUB_PREFIX) :])
        return _folder_file(folder, root, named=text)
    path = Path(ref)
    if path.is_dir():
        return _folder_file(path, path, named=str(path))
    return path


def _folder_file(folder: Path, root: Path, named: str) -> Path:
    """The model file of a run or exported folder, checked to stay inside ``root``."""
    weights = folder / MODEL_FILE
    if not weights.exists():
        raise ZooError(
            f"{named} holds no {MODEL_FILE}; name a zoo run folder, a folder written by "
            "`zoo export`, or the file itself"
        )
    _inside(weights, root, named)
    config = folder / CONFIG_FILE
    for path in (weights, config):
        if path.exists() and not path.is_file():  # a folder, a FIFO or a device: never read
            raise ZooError(f"{named}: {path.name} is not a regular file")
    if config.exists():
        _inside(config, root, named)
        exported = read_config(config)
        if exported.get("format") == EXPORT_FORMAT:
            _check_agreement(exported, weights, config)
        # any other config.json is a run folder's training settings: not ours to check
    return weights


def _inside(path: Path, root: Path, named: str) -> None:
    """Refuse a file (or a link) that leads out of the folder it was named by."""
    if not path.resolve().is_relative_to(root.resolve()):
        raise ZooError(
            f"{named}: {path.name} leads outside the folder (to {printable(str(path.resolve()))})"
            "; zoo reads only files inside the folder it is given"
        )


def is_export(folder: Path) -> bool:
    """Whether ``folder`` holds a config.json written by `zoo export` (read, never trusted)."""
    config = folder / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return read_config(config).get("format") == EXPORT_FORMAT
    except ZooError:
        return False


def read_config(path: Path) -> dict[str, Any]:
    """A folder's config.json as a dict, refusing (in one line) what is not zoo's JSON."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ZooError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes; it is not zoo's")
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ZooError(f"{path} cannot be read as JSON ({error}); export the model again") from None
    if not isinstance(values, dict):
        raise ZooError(f"{path} must hold a JSON object; export the model again")
    return values


def _check_agreement(exported: dict[str, Any], weights: Path, config: Path) -> None:
    """config.json must say what the file's header says, field by field."""
    stored = export_config(
        CheckpointInfo.from_header(weights, read_header(weights, MODEL_KIND, MODEL_HINT))
    )
    for key in AGREEING:
        if exported.get(key) != stored[key]:
            raise ZooError(
                f"{config} disagrees with {weights.name} on {key!r}; the folder was edited or "
                "mixed from two models: export the checkpoint again with `zoo export`"
            )


def _hub_snapshot(spec: str) -> tuple[Path, Path]:
    """(snapshot folder, the repo's cache folder) of ORG/NAME[@REVISION], via huggingface_hub."""
    repo_id, _, revision = spec.partition("@")
    if not REPO_ID.fullmatch(repo_id) or (revision and not REVISION.fullmatch(revision)):
        raise ZooError(
            f"{HUB_PREFIX}{printable(spec)} is not a hub model id; write {HUB_PREFIX}ORG/NAME "
            f"or {HUB_PREFIX}ORG/NAME@REVISION"
        )
    try:
        import huggingface_hub
        from huggingface_hub import constants
        from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise ZooError(
            f"loading {HUB_PREFIX}{repo_id} needs huggingface_hub; install the hub extra: "
            "pip install 'zoo[hub]'"
        ) from None
    try:
        folder = Path(
            huggingface_hub.snapshot_download(
                repo_id,
                revision=revision or None,
                allow_patterns=[MODEL_FILE, CONFIG_FILE, CARD_FILE, *EXTRAS],
                library_name="zoo",
            )
        )
    except LocalEntryNotFoundError:
        cache = constants.HF_HUB_CACHE
        raise ZooError(
            f"{HUB_PREFIX}{spec} is not in the local hub cache ({cache})"
            " and the hub cannot be reached (HF_HUB_OFFLINE or no network); download it where "
            "there is a network, or load an exported folder by its path"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise ZooError(f"{HUB_PREFIX}{spec} cannot be fetched: {error}") from None
    # snapshots/<commit>/ lives in models--ORG--NAME/, whose blobs/ the files link to
    return folder, folder.parent.parent
