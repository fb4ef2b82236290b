"""What defines a classifier training run (`zoo train-classifier`), with its defaults.

Apart from the trainer (`benchmarks.classifier_training`, which imports timm) so that the
CLI's help texts quote these defaults without loading a model library. The measurements
behind them are in `benchmarks.classifier_training`'s docstring.
"""

from __future__ import annotations

from dataclasses import dataclass

from zoo.errors import ZooError
from zoo.settings import SPLITS

DEFAULT_EPOCHS = 12
DEFAULT_LR = 1e-3
DEFAULT_SHIFT = 1 / 16  # random translation, as a fraction of the image side (4 px at 64 px)
DEFAULT_WEIGHT_DECAY = 0.0


@dataclass
class ClassifierSettings:
    """Everything that defines a classifier training run; stored in the file's training summary.

    Defaults: resnet18, ``DEFAULT_EPOCHS`` epochs of batch 64, AdamW at ``DEFAULT_LR`` with a
    cosine decay to zero, random horizontal flips and shifts, binary cross-entropy with the
    positives of each attribute weighted by its negatives/positives ratio (``balanced``), bf16
    autocast where `zoo.precision` finds it fast (``precision``). The measurements behind these
    choices are in the module docstring. ``max_steps`` caps the run (tests, smoke runs);
    ``flip`` turns the mirroring off (e.g. for digits), ``shift 0`` the translation. The loop,
    saves, resume and the non-finite rule (``on_nan``) are `zoo.run`'s, as for `zoo train`.
    """

    data: str | None = None
    split: str = "train"
    eval_split: str = "valid"
    image_size: int = 64
    backbone: str = "resnet18"
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = 64
    lr: float = DEFAULT_LR
    seed: int = 0
    device: str = "auto"
    out: str = "runs"
    progress: bool = True
    max_steps: int | None = None
    log_every: int = 25
    flip: bool = True
    shift: float = DEFAULT_SHIFT
    balanced: bool = True
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    precision: str = "auto"
    save_every: int = 1000
    on_nan: str = "stop"
    deterministic: bool = False

    def validate(self) -> None:
        if not 0 <= self.shift < 0.5:
            raise ZooError(f"--shift must be in [0, 0.5) of the image side, got {self.shift}")
        if self.weight_decay < 0:
            raise ZooError(f"--weight-decay must be non-negative, got {self.weight_decay}")
        if self.on_nan not in ("stop", "skip"):
            raise ZooError(f"--on-nan must be stop or skip, got {self.on_nan!r}")
        for name in ("epochs", "batch_size", "log_every", "save_every"):
            if getattr(self, name) < 1:
                raise ZooError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ZooError("--max-steps must be at least 1")
        if not self.lr > 0:
            raise ZooError("--lr must be positive")
        if self.image_size < 8:
            raise ZooError(f"--image-size must be at least 8, got {self.image_size}")
        for option, split in (("split", self.split), ("eval-split", self.eval_split)):
            if split not in SPLITS:
                raise ZooError(f"unknown --{option} {split!r}; use one of {', '.join(SPLITS)}")
