"""What defines a training run, and the data vocabulary its options use, with their defaults.

A leaf apart from the trainer (`zoo.train`) and the data (`zoo.data`), so the command line's
help texts quote these defaults without importing torchvision or the models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from zoo.errors import ZooError

SPLITS = ("train", "valid", "test", "all")
IMAGE_SIZE = 64  # a source's default model input size; MNIST's digits are 28 px
MNIST_IMAGE_SIZE = 32


@dataclass
class TrainSettings:
    """Everything that defines a training run; saved as ``config.json`` in the run."""

    model: str
    model_config: dict[str, Any] = field(default_factory=dict)
    data: str | None = None
    split: str = "train"
    image_size: int | None = None
    attributes: list[str] | None = None
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    out: str = "runs"
    sample_every: int | None = None
    save_every: int = 1000
    log_every: int = 25
    kl_warmup_steps: int = 0
    flip: bool = True
    strict: bool = False
    on_nan: str = "stop"
    compile: bool = False
    deterministic: bool = False
    tensorboard: bool = False

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ZooError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ZooError("--max-steps must be at least 1")
        if self.lr <= 0:
            raise ZooError("--lr must be positive")
        if self.on_nan not in ("stop", "skip"):
            raise ZooError(f"--on-nan must be stop or skip, got {self.on_nan!r}")
