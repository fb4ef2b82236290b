"""The interface contract every model must honour, as a suite a plugin author can run.

`zoo check-plugin NAME` builds the model at a tiny size and runs each check
below; a failure says what was expected and what came back. The built-in
models pass it, and the test suite runs it on all of them.
"""

from __future__ import annotations

import json
import tempfile
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from zoo.checkpoint import load, save_checkpoint
from zoo.errors import ZooError
from zoo.model import GenerativeModel, Posterior
from zoo.registry import get_model_class

TINY = {"image_size": 16, "base_channels": 4, "max_channels": 8, "latent_dim": 4}
BATCH = 3
ATTRIBUTES = 5


@dataclass
class CheckResult:
    name: str
    passed: bool
    detail: str


class ContractError(AssertionError):
    """A broken promise of the interface, with the expectation in the message."""


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise ContractError(message)


@dataclass
class Subject:
    """The model under test and a fixed batch to feed it."""

    name: str
    model: GenerativeModel
    x: torch.Tensor
    y: torch.Tensor | None

    def rebuild(self) -> GenerativeModel:
        return _build(self.name, self.model.config.to_dict())


def _build(name: str, overrides: dict) -> GenerativeModel:
    model_class = get_model_class(name)
    config = {**TINY, **overrides}
    if model_class.conditional:
        config.setdefault("num_attributes", ATTRIBUTES)
    return model_class(model_class.config_class.from_dict(config))


def _images(out: torch.Tensor, what: str, subject: Subject) -> None:
    expected = tuple(subject.x.shape)
    _expect(isinstance(out, torch.Tensor), f"{what} returned {type(out).__name__}, not a tensor")
    _expect(tuple(out.shape) == expected, f"{what} shape {tuple(out.shape)}, expected {expected}")
    _expect(out.dtype == torch.float32, f"{what} dtype {out.dtype}, expected torch.float32")
    _expect(bool(torch.isfinite(out).all()), f"{what} has NaN or Inf")
    _expect(
        out.min() >= 0 and out.max() <= 1, f"{what} leaves [0, 1]: {out.min():.3g}..{out.max():.3g}"
    )


def check_encode(subject: Subject) -> str:
    posterior = subject.model.encode(subject.x, subject.y)
    _expect(isinstance(posterior, Posterior), f"encode returned {type(posterior).__name__}")
    expected = (BATCH, subject.model.latent_dim)
    _expect(tuple(posterior.mean.shape) == expected, f"mean shape {tuple(posterior.mean.shape)}")
    _expect(tuple(posterior.logvar.shape) == expected, "logvar shape differs from mean")
    _expect(tuple(posterior.kl().shape) == (BATCH,), "kl() must give one value per image")
    return f"Posterior of {expected}"


def check_decode(subject: Subject) -> str:
    z = torch.randn(BATCH, subject.model.latent_dim)
    _images(subject.model.decode(z, subject.y), "decode", subject)
    return "images in [0, 1]"


def check_generate(subject: Subject) -> str:
    _images(subject.model.generate(BATCH, subject.y), "generate", subject)
    return "images in [0, 1]"


def check_reconstruct(subject: Subject) -> str:
    _images(subject.model.reconstruct(subject.x, subject.y), "reconstruct", subject)
    return "images in [0, 1]"


def check_loss(subject: Subject) -> str:
    losses = subject.model.loss(subject.x, subject.y)
    _expect(isinstance(losses, dict), "loss must return a dict")
    missing = {"loss", "recon", "kl"} - set(losses)
    _expect(not missing, f"loss dict lacks {', '.join(sorted(missing))}")
    for key, value in losses.items():
        _expect(isinstance(value, torch.Tensor) and value.dim() == 0, f"loss[{key!r}] not a scalar")
        _expect(bool(torch.isfinite(value)), f"loss[{key!r}] is not finite")
    return ", ".join(sorted(losses))


def check_config_json(subject: Subject) -> str:
    config = subject.model.config
    text = config.to_json()
    again = type(config).from_dict(json.loads(text))
    _expect(again == config, "config does not survive a JSON round trip")
    return f"{len(json.loads(text))} fields"


def check_checkpoint(subject: Subject) -> str:
    model = subject.model.eval()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.safetensors"
        save_checkpoint(path, model)
        loaded = load(path)
    z = torch.randn(BATCH, model.latent_dim)
    with torch.inference_mode():
        same_decode = torch.equal(model.decode(z, subject.y), loaded.decode(z, subject.y))
        same_recon = torch.equal(
            model.reconstruct(subject.x, subject.y), loaded.reconstruct(subject.x, subject.y)
        )
    _expect(same_decode and same_recon, "a loaded checkpoint decodes differently")
    return "identical outputs after save/load"


def check_conditional_contract(subject: Subject) -> str:
    model = subject.model.eval()
    z = torch.randn(BATCH, model.latent_dim)
    if model.conditional:
        try:
            model.decode(z, None)
        except ZooError:
            pass
        else:
            raise ContractError("conditional model accepted y=None; it must require labels")
        other = 1.0 - subject.y
        _expect(
            not torch.allclose(model.decode(z, subject.y), model.decode(z, other)),
            "conditional model ignores y: decode gives the same images for other labels",
        )
        return "requires y and uses it"
    y = torch.ones(BATCH, ATTRIBUTES)
    _expect(torch.equal(model.decode(z, None), model.decode(z, y)), "unconditional model uses y")
    return "ignores y"


def check_determinism(subject: Subject) -> str:
    model = subject.model.eval()
    draws = [
        model.generate(BATCH, subject.y, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    _expect(torch.equal(*draws), "generate differs under the same generator seed")
    torch.manual_seed(11)
    first = subject.rebuild()
    torch.manual_seed(11)
    second = subject.rebuild()
    same = all(
        torch.equal(a, b)
        for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    )
    _expect(same, "two builds under the same torch seed have different weights")
    return "same seed, same samples and weights"


def check_gradients(subject: Subject) -> str:
    model = subject.model.train()
    model.zero_grad(set_to_none=True)
    model.loss(subject.x, subject.y)["loss"].backward()
    starved = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    _expect(not starved, f"no gradient reaches {', '.join(starved[:3])}")
    bad = [
        name
        for name, p in model.named_parameters()
        if p.grad is not None and not torch.isfinite(p.grad).all()
    ]
    _expect(not bad, f"non-finite gradient in {', '.join(bad[:3])}")
    model.zero_grad(set_to_none=True)
    return f"{sum(1 for _ in model.parameters())} parameter tensors"


def check_extreme_inputs(subject: Subject) -> str:
    model = subject.model.eval()
    y = subject.y
    for name, x in (("black", torch.zeros_like(subject.x)), ("white", torch.ones_like(subject.x))):
        _images(model.reconstruct(x, y), f"reconstruct of a {name} batch", subject)
        losses = model.loss(x, y)
        _expect(
            all(torch.isfinite(v) for v in losses.values()), f"loss not finite on {name} images"
        )
    for scale in (1e3, -1e3):
        z = torch.full((BATCH, model.latent_dim), scale)
        _images(model.decode(z, y), f"decode of z={scale:g}", subject)
    return "finite on black/white images and |z| = 1e3"


CHECKS: list[tuple[str, Callable[[Subject], str]]] = [
    ("encode", check_encode),
    ("decode", check_decode),
    ("generate", check_generate),
    ("reconstruct", check_reconstruct),
    ("loss", check_loss),
    ("config JSON round trip", check_config_json),
    ("checkpoint round trip", check_checkpoint),
    ("conditional contract", check_conditional_contract),
    ("determinism under a seed", check_determinism),
    ("gradients reach every parameter", check_gradients),
    ("no NaN on extreme inputs", check_extreme_inputs),
]


def check_model(name: str) -> list[CheckResult]:
    """Run every check on model `name`; a check that raises fails with the reason."""
    model_class = get_model_class(name)
    torch.manual_seed(0)
    try:
        model = _build(name, {})
    except Exception as error:  # a plugin may fail to build in any way
        return [CheckResult("build at a tiny size", False, _reason(error))]
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, 3, TINY["image_size"], TINY["image_size"], generator=generator)
    y = (torch.rand(BATCH, ATTRIBUTES, generator=generator) > 0.5).float()
    subject = Subject(name, model, x, y if model_class.conditional else None)
    results = [
        CheckResult(
            "build at a tiny size",
            True,
            f"{sum(p.numel() for p in model.parameters()):,} parameters",
        )
    ]
    for check_name, check in CHECKS:
        try:
            with nullcontext() if check is check_gradients else torch.no_grad():
                detail = check(subject)
            results.append(CheckResult(check_name, True, detail))
        except Exception as error:
            results.append(CheckResult(check_name, False, _reason(error)))
    return results


def _reason(error: Exception) -> str:
    if isinstance(error, (ContractError, ZooError)):
        return str(error)
    frame = traceback.extract_tb(error.__traceback__)[-1]
    return f"{type(error).__name__}: {error} (at {Path(frame.filename).name}:{frame.lineno})"
