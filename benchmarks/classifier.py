"""The benchmark's ruler: a multi-label CNN that reads every attribute of the data from images.

It scores attribute edits (did Smiling flip, did the other attributes stay?) and its pooled
penultimate features give an offline Fréchet distance ("FD-attr"). It is a timm backbone trained
from scratch (``pretrained=False`` always: nothing is downloaded) with one logit per attribute,
stored as one safetensors file that rebuilds it.

Small images: a timm ImageNet backbone downsamples by 4 in its stem (a stride-2 conv, then a
stride-2 max-pool) and by 32 in all. Below ``SMALL_IMAGE_LIMIT`` (64) px the first stride-2
convolution is replaced by a 3x3 stride-1 one, so small images keep enough resolution (a 32 px
MNIST digit reaches the first stage at 16 x 16, as a 64 px face does with the native stem; a
16 px test face at 8 x 8). From 64 px on the backbone keeps its own stem.

Why not adapt the stem at 64 px too: it quadruples the cost of every stage and scored lower
(0.662 against 0.697 mean balanced accuracy after 4 epochs of the earlier plain-BCE recipe,
one thread).

The recipe is chosen for the edit benchmark, which needs the ruler to be right on rare
attributes (Bald is 2 % of faces, Mustache 4 %): a plain BCE classifier that never says "Bald"
is 98 % accurate and useless for judging an edit that adds baldness. Measured on the 2-core
AMD EPYC (Zen 4, AVX-512 BF16, no AMX), one job at a time, resnet18 trained on the 4,560 train
images of the CelebA sample and scored on its 780 valid images (mean balanced accuracy over
all 40 attributes / over the 13 edit attributes):

===========================================================  ======  ================  =========
recipe                                                       epochs  balanced 40 / 13  wall time
===========================================================  ======  ================  =========
Adam, plain BCE, flips (the earlier default)                 8       0.709 / 0.786     1.5 min
AdamW, positives weighted by negatives/positives, flips,     12      0.810 / 0.865     2.7 min
random shifts of 1/16 of the side (the default)
the same, 20 epochs, colour jitter, weight decay 0.05 (*)     20      - / 0.853         -
===========================================================  ======  ================  =========

(bf16 for all three; * a one-off experiment script, not a CLI option.) The class weighting
is what moves the rare attributes (balanced accuracy of Bald 0.50 -> 0.86, Pale_Skin
0.59 -> 0.86, Mustache 0.75 -> 0.95); 20 epochs overfit Bald again (0.62). So the
default is resnet18 with its own stem, ``DEFAULT_EPOCHS`` (12) epochs, ``pos_weight`` and
shifts: the standard backbone, 512-d features for FD-attr, a few minutes on the sample.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from zoo.checkpoint import (
    FORMAT_KEY,
    FORMAT_VERSION,
    KIND_KEY,
    atomic_save,
    finite_state_dict,
    load_matching_weights,
    read_header,
)
from zoo.data import SPLITS, ImageData, load_data
from zoo.device import autocast, pick_device, resolve_precision
from zoo.errors import ZooError, error_reason
from zoo.train import epoch_order, new_run_dir, training_progress

__all__ = [
    "CLASSIFIER_FILE",
    "KIND",
    "AttributeClassifier",
    "ClassifierInfo",
    "ClassifierSettings",
    "evaluate_classifier",
    "find_classifier",
    "load_classifier",
    "read_classifier_info",
    "save_classifier",
    "train_classifier",
]

log = logging.getLogger(__name__)

KIND = "attribute classifier"
CLASSIFIER_FILE = "classifier.safetensors"
METRICS_FILE = "metrics.jsonl"
SMALL_IMAGE_LIMIT = 64  # below this size the stride-2 stem conv becomes 3x3 stride 1
HELD_OUT_FRACTION = 0.1  # of the training split, when there is no evaluation split
DEFAULT_EPOCHS = 12
DEFAULT_LR = 1e-3
DEFAULT_SHIFT = 1 / 16  # random translation, as a fraction of the image side (4 px at 64 px)
DEFAULT_WEIGHT_DECAY = 0.0
TRAIN_HINT = "train one with `zoo train-classifier --data DIR`"


# -- the model -----------------------------------------------------------------------------------


def check_backbone(backbone: str, subject: str, fix: str) -> None:
    """Refuse a backbone name that timm does not define itself, before timm builds anything.

    ``timm.create_model`` fetches a config from the Hugging Face hub for an ``hf-hub:`` name even
    with ``pretrained=False``, and reads a folder for a ``local-dir:`` one; ``timm/...`` names
    and pretrained tags (``resnet18.a1_in1k``) stand for hub weights. A file must never cause a
    download or a read elsewhere, so only names `timm.list_models` lists (untagged
    architectures) reach timm.
    """
    if backbone not in timm.list_models():
        raise ZooError(
            f"{subject} {backbone!r} is not one of timm's own architectures "
            "(timm.list_models()); zoo never lets timm download or read other files, so hub "
            f"names (hf-hub:..., timm/...) and pretrained tags (name.tag) are refused; {fix}"
        )


def _first_conv(net: nn.Module) -> tuple[nn.Module, str, nn.Conv2d] | None:
    """The parent module, attribute name and module of a timm model's first convolution."""
    name = net.pretrained_cfg.get("first_conv") if hasattr(net, "pretrained_cfg") else None
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    if not name:
        return None
    *path, last = name.split(".")
    parent = net
    try:
        for part in path:
            parent = getattr(parent, part)
        conv = getattr(parent, last)
    except AttributeError:
        return None
    return (parent, last, conv) if isinstance(conv, nn.Conv2d) else None


class AttributeClassifier(nn.Module):
    """Multi-label attribute classifier: float N x C x H x W images in [0, 1] -> N x A logits.

    Images are resized to ``image_size`` (antialiased bilinear) when they differ and normalised
    inside the module, so callers pass the same tensors the generative models speak.
    ``small_stem`` (default: ``image_size < SMALL_IMAGE_LIMIT``) replaces the backbone's first
    stride-2 convolution by a 3x3 stride-1 one; it is stored in the file so loading never
    depends on the rule.
    """

    def __init__(
        self,
        backbone: str,
        attr_names: list[str],
        image_size: int,
        channels: int = 3,
        *,
        small_stem: bool | None = None,
    ) -> None:
        super().__init__()
        attr_names = [str(name) for name in attr_names]
        if not attr_names:
            raise ZooError(
                "an attribute classifier needs at least one attribute; the data has none"
            )
        if len(set(attr_names)) != len(attr_names):
            raise ZooError(f"attribute names {attr_names} repeat a name; list each once")
        if image_size < 8 or channels not in (1, 3):
            raise ZooError(
                f"cannot build a classifier for {channels}-channel {image_size}px images; "
                "need image_size >= 8 and 1 or 3 channels"
            )
        check_backbone(backbone, "timm backbone", "use a timm CNN name such as resnet18")
        try:
            net = timm.create_model(
                backbone, pretrained=False, num_classes=len(attr_names), in_chans=channels
            )
        except (RuntimeError, TypeError, ValueError) as error:
            reason = error_reason(error)
            raise ZooError(
                f"cannot build timm backbone {backbone!r} ({reason}); use a timm CNN name such "
                "as resnet18 (timm.list_models() lists them)"
            ) from None
        if small_stem is None:
            small_stem = image_size < SMALL_IMAGE_LIMIT
        self.stem = "native"
        found = _first_conv(net)
        if small_stem and found is not None and found[2].stride == (2, 2):
            parent, attribute, old = found
            setattr(
                parent,
                attribute,
                nn.Conv2d(
                    old.in_channels,
                    old.out_channels,
                    3,
                    stride=1,
                    padding=1,
                    bias=old.bias is not None,
                ),
            )
            kernel = "x".join(map(str, old.kernel_size))
            self.stem = f"3x3/1 (was {kernel}/2)"
        self.net = net
        self.backbone_name = backbone
        self.attr_names = attr_names
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.small_stem = self.stem != "native"
        self.num_features = int(net.num_features)
        mean = torch.tensor(net.pretrained_cfg.get("mean", (0.485, 0.456, 0.406)))
        std = torch.tensor(net.pretrained_cfg.get("std", (0.229, 0.224, 0.225)))
        if channels == 1:
            mean, std = mean.mean(0, keepdim=True), std.mean(0, keepdim=True)
        self.register_buffer("mean", mean[:channels].reshape(1, channels, 1, 1).float())
        self.register_buffer("std", std[:channels].reshape(1, channels, 1, 1).float())

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ZooError(
                f"the attribute classifier takes N x {self.channels} x H x W images, got "
                f"{tuple(x.shape)}; use a classifier trained on data with the same channels"
            )
        x = x.to(device=self.mean.device, dtype=self.mean.dtype)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(
                x,
                size=(self.image_size, self.image_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """N x num_features: the pooled penultimate activations (the input of the last layer)."""
        return self.net.forward_head(self.net.forward_features(self._prepare(x)), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N x A logits, one per attribute in ``attr_names`` order."""
        return self.net.get_classifier()(self.features(x))

    def _batched(self, fn: Any, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        if batch_size < 1:
            raise ZooError(f"batch size must be at least 1, got {batch_size}")
        was_training = self.training
        self.eval()
        try:
            parts = [fn(x[i : i + batch_size]).float().cpu() for i in range(0, len(x), batch_size)]
        finally:
            self.train(was_training)
        if parts:
            return torch.cat(parts)
        width = self.num_features if fn == self.features else len(self.attr_names)
        return torch.zeros(0, width)

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """N x A float in {0, 1} (logit > 0), in eval mode, batched on the module's device;
        returned on the CPU."""
        return self._batched(lambda b: (self(b) > 0).float(), x, batch_size)

    @torch.inference_mode()
    def extract_features(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """``features`` in eval mode, batched on the module's device; returned on the CPU."""
        return self._batched(self.features, x, batch_size)


# -- files ---------------------------------------------------------------------------------------


@dataclass
class ClassifierInfo:
    """What a classifier file says about itself, read from the header alone."""

    path: Path
    backbone: str
    attr_names: list[str]
    image_size: int
    channels: int
    data: dict[str, Any] = field(default_factory=dict)  # ImageData.describe() of the training data
    evaluation: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    small_stem: bool = False


def save_classifier(path: str | Path, classifier: AttributeClassifier, **metadata: Any) -> None:
    """Write weights and the metadata that rebuilds the classifier, atomically.

    Keyword metadata (``data``, ``evaluation``, ``training``, ...) is stored as JSON under
    ``zoo.<key>``. Refuses non-finite weights.
    """
    path = Path(path)
    state = finite_state_dict(classifier, path)
    header = {
        FORMAT_KEY: FORMAT_VERSION,
        KIND_KEY: KIND,
        "zoo.backbone": classifier.backbone_name,
        "zoo.attributes": json.dumps(classifier.attr_names),
        "zoo.image_size": str(classifier.image_size),
        "zoo.channels": str(classifier.channels),
        "zoo.small_stem": json.dumps(classifier.small_stem),
    }
    for key, value in metadata.items():
        name = f"zoo.{key}"
        if name in header:
            raise ZooError(f"metadata key {key!r} is reserved by the classifier file format")
        try:
            header[name] = json.dumps(value)
        except (TypeError, ValueError):
            raise ZooError(f"metadata {key!r} is not JSON-serialisable; pass plain data") from None
    atomic_save(path, state, header)


def _info_from_header(path: Path, metadata: dict[str, str]) -> ClassifierInfo:
    def value(key: str, default: Any = None) -> Any:
        if key not in metadata:
            if default is None:
                raise ZooError(f"{path} lacks {key} metadata; the file is damaged, {TRAIN_HINT}")
            return default
        try:
            return json.loads(metadata[key])
        except json.JSONDecodeError:
            raise ZooError(
                f"{path}: metadata {key} is not valid JSON; the file is damaged, {TRAIN_HINT}"
            ) from None

    try:
        info = ClassifierInfo(
            path=path,
            backbone=str(metadata["zoo.backbone"]),
            attr_names=[str(name) for name in value("zoo.attributes")],
            image_size=int(value("zoo.image_size")),
            channels=int(value("zoo.channels")),
            data=value("zoo.data", {}),
            evaluation=value("zoo.evaluation", {}),
            training=value("zoo.training", {}),
            small_stem=bool(value("zoo.small_stem", False)),
        )
    except (KeyError, TypeError, ValueError):
        raise ZooError(
            f"{path} has malformed classifier metadata; the file is damaged, {TRAIN_HINT}"
        ) from None
    check_backbone(info.backbone, f"{path} names timm backbone", TRAIN_HINT)
    return info


def read_classifier_info(path: str | Path) -> ClassifierInfo:
    """A classifier file's metadata without loading its tensors; ZooError if it is not one."""
    path = Path(path)
    return _info_from_header(
        path,
        read_header(path, KIND, f"pass the {CLASSIFIER_FILE} of a classifier run, or {TRAIN_HINT}"),
    )


def load_classifier(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[AttributeClassifier, ClassifierInfo]:
    """Rebuild a classifier from its file alone (no pickle), in eval mode on ``device``
    (``auto``, ``cpu``, ``cuda``, ...)."""
    info = read_classifier_info(path)
    classifier = AttributeClassifier(
        info.backbone,
        info.attr_names,
        info.image_size,
        info.channels,
        small_stem=info.small_stem,
    )
    load_matching_weights(classifier, info.path, f"a {info.backbone} classifier", f", {TRAIN_HINT}")
    return classifier.to(pick_device(str(device))).eval(), info


def find_classifier(
    fingerprint: str, image_size: int, runs_dir: str | Path = "runs"
) -> Path | None:
    """The newest ``runs_dir/*/classifier.safetensors`` trained on data with this fingerprint at
    this image size; reads headers only and skips files that are not readable classifiers."""
    matches = []
    for path in Path(runs_dir).glob(f"*/{CLASSIFIER_FILE}"):
        try:
            info = read_classifier_info(path)
            mtime = path.stat().st_mtime
        except (ZooError, OSError) as error:
            log.debug("skipping %s: %s", path, error)
            continue
        if info.data.get("fingerprint") == fingerprint and info.image_size == image_size:
            matches.append((mtime, str(path), path))
    return max(matches)[2] if matches else None


# -- evaluation ----------------------------------------------------------------------------------


def evaluate_classifier(classifier: Any, data: ImageData, batch_size: int = 256) -> dict[str, Any]:
    """Per-attribute accuracy and balanced accuracy of ``classifier`` on ``data``.

    Attributes are matched by name (the data may hold more, in any order); classifier attributes
    the data lacks are listed under ``missing``. Balanced accuracy is the mean of the true
    positive and true negative rates; when the split holds only one class of an attribute it is
    the rate of that class, and the attribute is listed under ``single_class``. ``classifier``
    needs only ``attr_names`` and ``predict(x, batch_size=...)``.
    """
    if len(data) == 0:
        raise ZooError(f"the {data.split} split of {data.root} has no images to evaluate on")
    names = [name for name in classifier.attr_names if name in data.attr_names]
    missing = [name for name in classifier.attr_names if name not in data.attr_names]
    if not names:
        raise ZooError(
            f"the data at {data.root} has none of the classifier's attributes "
            f"({', '.join(classifier.attr_names[:5])}, ...); evaluate on the data it was trained on"
        )
    predicted_columns = [classifier.attr_names.index(name) for name in names]
    true_columns = [data.attr_names.index(name) for name in names]
    predictions = []
    for start in range(0, len(data), batch_size):
        images, _ = data.batch(torch.arange(start, min(start + batch_size, len(data))))
        predictions.append(classifier.predict(images, batch_size=batch_size).cpu())
    predicted = torch.cat(predictions)[:, predicted_columns].bool()
    truth = data.attrs[:, true_columns].bool()

    accuracy, balanced, positive_rate, single_class = {}, {}, {}, {}
    for column, name in enumerate(names):
        guess, true = predicted[:, column], truth[:, column]
        accuracy[name] = (guess == true).double().mean().item()
        positive_rate[name] = true.double().mean().item()
        rates = [
            (guess[true == label] == label).double().mean().item()
            for label in (True, False)
            if (true == label).any()
        ]
        if len(rates) == 1:  # the split holds one class only: record which
            single_class[name] = "positive" if true.all() else "negative"
        balanced[name] = sum(rates) / len(rates)
    result: dict[str, Any] = {
        "split": data.split,
        "n": len(data),
        "accuracy": accuracy,
        "balanced_accuracy": balanced,
        "mean_accuracy": sum(accuracy.values()) / len(accuracy),
        "mean_balanced_accuracy": sum(balanced.values()) / len(balanced),
        "positive_rate": positive_rate,
        "single_class": single_class,
    }
    if missing:
        result["missing"] = missing
    return result


# -- training ------------------------------------------------------------------------------------


@dataclass
class ClassifierSettings:
    """Everything that defines a classifier training run; stored in the file's training summary.

    Defaults: resnet18, ``DEFAULT_EPOCHS`` epochs of batch 64, AdamW at ``DEFAULT_LR`` with a
    cosine decay to zero, random horizontal flips and shifts, binary cross-entropy with the
    positives of each attribute weighted by its negatives/positives ratio (``balanced``), bf16
    autocast where `zoo.device` finds it fast (``precision``). The measurements behind these
    choices are in the module docstring. ``max_steps`` caps the run (tests, smoke runs);
    ``flip`` turns the mirroring off (e.g. for digits), ``shift 0`` the translation.
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

    def validate(self) -> None:
        if not 0 <= self.shift < 0.5:
            raise ZooError(f"--shift must be in [0, 0.5) of the image side, got {self.shift}")
        if self.weight_decay < 0:
            raise ZooError(f"--weight-decay must be non-negative, got {self.weight_decay}")
        for name in ("epochs", "batch_size", "log_every"):
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


def positive_weights(attrs: torch.Tensor) -> torch.Tensor:
    """Per-attribute weight of the positive term of the loss: negatives / positives.

    With it, the logit threshold 0 sits near the point of equal true-positive and
    true-negative rates, which is what balanced accuracy and rare-attribute edits need
    (Bald is 2 % of CelebA: unweighted, the classifier learns to never say bald).
    """
    rate = attrs.float().mean(dim=0).clamp(1.0 / len(attrs), 1.0 - 1.0 / len(attrs))
    return (1.0 - rate) / rate


def random_shift(x: torch.Tensor, max_shift: float) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` of its side in x and y (edges repeated):
    faces in the data are aligned, edited and generated faces drift by a few pixels."""
    n = x.shape[0]
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = (torch.rand(n, 2) * 2 - 1).to(x.device) * 2 * max_shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


def _rows(data: ImageData, start: int, stop: int, split: str) -> ImageData:
    return dataclasses.replace(
        data,
        images=data.images[start:stop],
        attrs=data.attrs[start:stop],
        filenames=data.filenames[start:stop],
        split=split,
    )


def _training_and_evaluation_data(
    settings: ClassifierSettings,
) -> tuple[ImageData, ImageData, str | None]:
    """The training split and the evaluation data. When the evaluation split is empty, absent
    or shares images with the training split, the evaluation data is the last
    ``HELD_OUT_FRACTION`` of the training split, which then is not trained on; the third value
    says why, else it is None."""
    train = load_data(
        settings.data, settings.split, settings.image_size, progress=settings.progress
    )
    if not train.attr_names:
        raise ZooError(f"the data at {train.root} has no attributes to classify; use labelled data")
    reason = None
    if settings.eval_split == settings.split:
        reason = f"--eval-split is the training split {settings.split!r}"
    else:
        try:
            evaluation = load_data(
                settings.data, settings.eval_split, settings.image_size, progress=False
            )
        except ZooError as error:  # the source loaded fine, so the split is empty or absent
            reason = str(error).rstrip(".")
        else:  # e.g. MNIST with only its test files: "train" is the test set
            if not set(train.filenames).isdisjoint(evaluation.filenames):
                reason = (
                    f"the {settings.eval_split} split of {train.root} shares images with the "
                    f"{settings.split} split"
                )
    if reason is None:
        return train, evaluation, None
    held = max(1, round(len(train) * HELD_OUT_FRACTION))
    if len(train) - held < 2:
        raise ZooError(
            f"cannot hold out evaluation images from the {len(train)}-image {settings.split} split "
            f"of {train.root} ({reason}); use a larger split or one with a {settings.eval_split} "
            "split"
        )
    log.warning(
        "cannot evaluate on the %s split (%s); evaluating on the last %d images of the %s split "
        "instead, which are not trained on",
        settings.eval_split,
        reason,
        held,
        settings.split,
    )
    tail = _rows(train, len(train) - held, len(train), f"{settings.split}-tail")
    return _rows(train, 0, len(train) - held, settings.split), tail, reason


def train_classifier(settings: ClassifierSettings) -> tuple[Path, ClassifierInfo]:
    """Train an attribute classifier from scratch; write ``<out>/classifier-<time>/``.

    The run folder holds ``classifier.safetensors`` (weights, data identity, the evaluation on
    ``eval_split`` and a training summary) and ``metrics.jsonl`` (loss and images/s per logging
    window, evaluation after every epoch). Data order is a function of (seed, epoch) and flips
    use torch's seeded global RNG, so on CPU a run is reproducible.
    """
    settings.validate()
    started = time.perf_counter()
    device = pick_device(settings.device)
    train, evaluation_data, held_out_reason = _training_and_evaluation_data(settings)
    torch.manual_seed(settings.seed)
    classifier = AttributeClassifier(
        settings.backbone, train.attr_names, settings.image_size, train.preprocess.channels
    ).to(device)
    optimizer = torch.optim.AdamW(
        classifier.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    precision = resolve_precision(device, settings.precision)
    pos_weight = positive_weights(train.attrs).to(device) if settings.balanced else None
    size = len(train)
    # never a last batch of one image: batch norm cannot normalise it
    steps_per_epoch = (
        size // settings.batch_size
        if size % settings.batch_size == 1
        else (math.ceil(size / settings.batch_size))
    )
    total_steps = settings.epochs * steps_per_epoch
    if settings.max_steps is not None:
        total_steps = min(total_steps, settings.max_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )
    run_dir = new_run_dir(Path(settings.out), "classifier")
    log.info(
        "training a %s attribute classifier on %d images of %s (%s) for %d steps into %s",
        settings.backbone,
        size,
        train.root,
        settings.split,
        total_steps,
        run_dir,
    )

    step = 0
    images_seen = 0
    train_time = eval_time = 0.0
    window_loss = torch.zeros((), device=device)
    window_steps = window_images = 0
    window_start = time.perf_counter()
    last_loss = float("nan")
    last_rate = 0.0
    evaluation: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    classifier.train()
    with (
        training_progress(settings.progress) as progress,
        (run_dir / METRICS_FILE).open("w") as metrics,
    ):
        task = progress.add_task("classifier", total=total_steps, stats="")
        order = epoch_order(size, settings.seed, 0)
        while step < total_steps:
            if step % steps_per_epoch == 0:
                order = epoch_order(size, settings.seed, step // steps_per_epoch)
            start = (step % steps_per_epoch) * settings.batch_size
            x, y = train.batch(
                order[start : start + settings.batch_size], device, flip=settings.flip
            )
            if settings.shift:
                x = random_shift(x, settings.shift)
            with autocast(device, precision):
                logits = classifier(x)
            loss = F.binary_cross_entropy_with_logits(logits.float(), y, pos_weight=pos_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            images_seen += x.shape[0]
            window_loss += loss.detach()
            window_steps += 1
            window_images += x.shape[0]
            epoch_end = step % steps_per_epoch == 0
            finished = step == total_steps
            if window_steps >= settings.log_every or epoch_end or finished:
                elapsed = time.perf_counter() - window_start
                train_time += elapsed
                last_loss = (window_loss / window_steps).item()
                if not math.isfinite(last_loss):
                    raise ZooError(
                        f"classifier loss is not finite at step {step} ({last_loss}); nothing "
                        f"was saved; lower --lr (now {settings.lr:g})"
                    )
                last_rate = window_images / max(elapsed, 1e-9)
                record: dict[str, Any] = {
                    "step": step,
                    "epoch": round(step / steps_per_epoch, 4),
                    "loss": last_loss,
                    "lr": schedule.get_last_lr()[0],
                    "img_per_s": round(last_rate, 2),
                    "wall_time_s": round(train_time, 3),
                }
                if epoch_end or finished:
                    eval_start = time.perf_counter()
                    evaluation = evaluate_classifier(classifier, evaluation_data)
                    eval_time += time.perf_counter() - eval_start
                    classifier.train()
                    record["eval_split"] = evaluation["split"]
                    record["eval_mean_accuracy"] = evaluation["mean_accuracy"]
                    record["eval_mean_balanced_accuracy"] = evaluation["mean_balanced_accuracy"]
                    history.append(
                        {k: record[k] for k in ("step", "epoch", "loss")}
                        | {
                            "mean_accuracy": evaluation["mean_accuracy"],
                            "mean_balanced_accuracy": evaluation["mean_balanced_accuracy"],
                        }
                    )
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                stats = f"loss {last_loss:.4f}  {last_rate:6.1f} img/s"
                if evaluation:
                    stats += (
                        f"  {evaluation['split']} acc {evaluation['mean_accuracy']:.3f} "
                        f"bal {evaluation['mean_balanced_accuracy']:.3f}"
                    )
                progress.update(task, stats=stats)
                window_loss.zero_()
                window_steps = window_images = 0
                window_start = time.perf_counter()
            progress.update(task, completed=step)

    if held_out_reason is not None:
        evaluation["held_out"] = {
            "from_split": settings.split,
            "n": len(evaluation_data),
            "reason": held_out_reason,
        }
    summary = {
        "settings": dataclasses.asdict(settings),
        "steps": step,
        "epochs": round(step / steps_per_epoch, 4),
        "batch_size": settings.batch_size,
        "lr": settings.lr,
        "lr_schedule": "cosine to 0",
        "optimizer": f"AdamW (weight decay {settings.weight_decay:g})",
        "loss": "BCEWithLogits, positives weighted by negatives/positives"
        if settings.balanced
        else "BCEWithLogits",
        "flip": settings.flip,
        "shift": settings.shift,
        "precision": precision,
        "seed": settings.seed,
        "final_loss": last_loss,
        "history": history,
        "train_time_s": round(train_time, 2),
        "eval_time_s": round(eval_time, 2),
        "wall_time_s": round(time.perf_counter() - started, 2),
        "images_per_s": round(images_seen / max(train_time, 1e-9), 1),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "stem": classifier.stem,
        "num_features": classifier.num_features,
        "versions": {
            "zoo": zoo.__version__,
            "torch": torch.__version__,
            "timm": timm.__version__,
            "python": platform.python_version(),
        },
    }
    path = run_dir / CLASSIFIER_FILE
    classifier.eval()
    save_classifier(
        path, classifier, data=train.describe(), evaluation=evaluation, training=summary
    )
    log.info(
        "saved %s: %s mean accuracy %.3f, mean balanced accuracy %.3f",
        path,
        evaluation["split"],
        evaluation["mean_accuracy"],
        evaluation["mean_balanced_accuracy"],
    )
    return path, read_classifier_info(path)
