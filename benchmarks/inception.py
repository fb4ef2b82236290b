"""torch-fidelity's InceptionV3 weights for the standard FID: found, checked, read safely.

The weights file is never downloaded and never unpickled. It is looked for at
``--fid-weights``, ``$ZOO_FID_WEIGHTS`` or the torch hub cache (`inception_weights_path`); its
full sha256 is checked before anything parses it (`read_verified_weights`;
``$ZOO_FID_WEIGHTS_SHA256`` names another file's), and the verified bytes are read with
``torch.load(weights_only=True)`` (see `weights_only_inception_loading`). torch-fidelity
itself is the ``inception`` extra (`require_torch_fidelity`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import pickle
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from zoo.errors import ZooError, error_reason

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
)
INCEPTION_HINT = f"use {INCEPTION_FILE} from {INCEPTION_URL}"
# the released file's sha256 (torch.hub names downloads by its first 8 hex digits)
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
WEIGHTS_ENV = "ZOO_FID_WEIGHTS"
WEIGHTS_SHA256_ENV = "ZOO_FID_WEIGHTS_SHA256"  # the sha256 of a deliberately different file


def require_torch_fidelity() -> None:
    """Refuse, naming the extra, when torch-fidelity (the InceptionV3 code) is not installed."""
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ZooError(
            "the standard FID needs torch-fidelity's InceptionV3; install the inception "
            "extra: pip install 'zoo[inception]', or use --fid-features classifier"
        )


def hub_weights_path() -> Path:
    """Where torch-fidelity (through torch.hub) keeps the InceptionV3 weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def inception_weights_path(option: str | None = None) -> Path:
    """``--fid-weights``, else ``$ZOO_FID_WEIGHTS``, else the torch hub cache; ZooError if absent.

    A path given explicitly that does not exist is an error, never a fall-through.
    """
    hub = hub_weights_path()
    for source, value in (
        ("--fid-weights", option),
        (f"${WEIGHTS_ENV}", os.environ.get(WEIGHTS_ENV)),
    ):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise ZooError(
                    f"{source} {path} is not a file; point it at {INCEPTION_FILE} "
                    f"(from {INCEPTION_URL}) or leave it unset to use {hub}"
                )
            return path
    if hub.is_file():
        return hub
    raise ZooError(missing_weights_message(hub))


def missing_weights_message(hub: Path) -> str:
    return (
        f"FID needs torch-fidelity's InceptionV3 weights {INCEPTION_FILE}, which are not at {hub}: "
        f"download {INCEPTION_URL} and put it there (or anywhere, and pass --fid-weights PATH or "
        f"set {WEIGHTS_ENV}=PATH), or use --fid-features classifier (Fréchet distance in the "
        "attribute classifier's features; nothing to download)"
    )


def expected_weights_sha256() -> str:
    """The sha256 the weights file must have: ``$ZOO_FID_WEIGHTS_SHA256`` when a different file
    is used on purpose, else that of torch-fidelity's released file."""
    value = os.environ.get(WEIGHTS_SHA256_ENV, "").strip().lower()
    if not value:
        return INCEPTION_SHA256
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ZooError(
            f"${WEIGHTS_SHA256_ENV} must be the 64 hex digits of a sha256 (as `sha256sum FILE` "
            f"prints them), got {value[:80]!r}; fix it or unset it"
        )
    return value


def read_verified_weights(path: Path) -> tuple[bytes, str]:
    """The weights file's bytes and sha256, refused unless the sha256 is the expected one.

    The hash is of the very bytes that are then loaded, so a file swapped on disk after the
    check is never read, and a file of unknown origin never reaches a parser.
    """
    expected = expected_weights_sha256()
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ZooError(f"cannot read {path} ({error_reason(error)}); {INCEPTION_HINT}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        wanted = (
            f"that of torch-fidelity's released {INCEPTION_FILE}"
            if expected == INCEPTION_SHA256
            else f"the {expected} that ${WEIGHTS_SHA256_ENV} asks for"
        )
        raise ZooError(
            f"refusing {path}: its sha256 is not {wanted}, so it is not loaded; "
            f"{INCEPTION_HINT}, or, to use this file deliberately, set "
            f"{WEIGHTS_SHA256_ENV}={digest}"
        )
    return data, digest


def load_weights_only(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    """The state dict in ``data`` (the bytes of ``path``, named in errors), read with
    ``weights_only=True``: tensors and plain containers, never code."""
    try:
        with warnings.catch_warnings():
            # the weights-only unpickler warns about pickle protocols it was not written for
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported (global: GLOBAL [\w.]+|operand \d+)", str(error))
        reason = f"unsupported {found.group(1)}" if found else "objects other than tensors"
        raise ZooError(
            f"refusing {path}: it is not a plain tensor file ({reason}); zoo only loads weights "
            f"with weights_only=True and never runs code from a file; {INCEPTION_HINT}"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        reason = error_reason(error)
        raise ZooError(
            f"{path} is not a readable PyTorch weights file ({reason}); {INCEPTION_HINT}"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(value, torch.Tensor) for value in state.values()
    ):
        raise ZooError(
            f"{path} holds a {type(state).__name__}, not a state dict of tensors; {INCEPTION_HINT}"
        )
    return state


class _WeightsOnlyTorch:
    """Stands in for the name ``torch`` inside torch-fidelity's InceptionV3 module: everything is
    the real torch except ``load``, which reads the verified bytes through `load_weights_only`
    and records the path it was asked for."""

    def __init__(self, path: Path, data: bytes) -> None:
        self.path, self.data = path, data
        self.loaded: list[Path] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def load(self, f: Any, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        # whatever torch-fidelity asks for (it passes weights_only=False), read tensors only
        self.loaded.append(Path(f))
        return load_weights_only(self.path, self.data)


def _refuse_download(*args: Any, **kwargs: Any) -> None:
    raise ZooError(
        f"zoo never downloads the FID weights; put {INCEPTION_FILE} at {hub_weights_path()} "
        f"or pass --fid-weights PATH"
    )


_PATCH_LOCK = threading.Lock()


@contextmanager
def weights_only_inception_loading(path: Path, data: bytes) -> Iterator[_WeightsOnlyTorch]:
    """Make torch-fidelity's InceptionV3 read ``data`` (the verified bytes of ``path``) with
    ``weights_only=True``.

    ``FeatureExtractorInceptionV3.__init__`` (which torchmetrics' ``NoTrainInceptionV3``
    inherits) unpickles its weights file (``weights_only=False``): a crafted file would run code.
    For the duration of the block, that module's global ``torch`` is a `_WeightsOnlyTorch`
    proxy whose ``load`` reads tensors only, and its ``load_state_dict_from_url`` refuses to
    download. Only that module's globals change (under a lock, restored on exit); torch.load
    elsewhere in the process is untouched. The proxy records its calls so the caller can check
    the weights really went through it (tests/test_fid.py proves a pickle bomb stays inert).
    """
    import torch_fidelity.feature_extractor_inceptionv3 as inception_module

    # Check before anything is read that the constructor still loads through the module-level
    # names replaced below (``torch.load``, ``load_state_dict_from_url``).
    names = ("torch", "load_state_dict_from_url")
    used = set(inception_module.FeatureExtractorInceptionV3.__init__.__code__.co_names)
    if not {*names, "load"} <= used:  # pragma: no cover - a torch-fidelity we do not know
        raise RuntimeError(
            "torch-fidelity's InceptionV3 no longer loads its weights through torch.load; "
            "benchmarks/inception.py's weights-only guard must be updated before it can be used"
        )
    proxy = _WeightsOnlyTorch(path, data)
    with _PATCH_LOCK:
        saved = [getattr(inception_module, name) for name in names]
        inception_module.torch = proxy
        inception_module.load_state_dict_from_url = _refuse_download
        try:
            yield proxy
        finally:
            for name, value in zip(names, saved, strict=True):
                setattr(inception_module, name, value)


def inception_fid(weights: Path) -> tuple[FrechetInceptionDistance, str]:
    """torchmetrics' standard FID (2048-d pool features) on the weights at ``weights``, and
    their sha256, checked (`read_verified_weights`) before anything parses the file.

    It takes uint8 images (``normalize=False``; see `to_uint8_rgb`) and keeps its real
    statistics across ``reset()`` so they can be restored from the cache.
    """
    data, digest = read_verified_weights(weights)
    with weights_only_inception_loading(weights, data) as guard:
        try:
            metric = FrechetInceptionDistance(
                feature=2048,
                feature_extractor_weights_path=str(weights),
                normalize=False,
                reset_real_features=False,
            )
        except RuntimeError as error:  # load_state_dict: missing, unexpected or misshapen keys
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            detail = lines[1] if len(lines) > 1 else (lines[0] if lines else "")
            raise ZooError(
                f"{weights} does not hold torch-fidelity's InceptionV3 weights "
                f"({detail[:160]}); {INCEPTION_HINT}"
            ) from None
    if guard.loaded != [Path(weights)]:  # pragma: no cover - torch-fidelity changed its loading
        raise RuntimeError(
            f"InceptionV3 weights were not read through the weights-only guard: {guard.loaded}"
        )
    return metric, digest
