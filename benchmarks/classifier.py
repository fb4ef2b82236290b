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

The training recipe and the measurements behind it are in `benchmarks.classifier_training`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from zoo.checkpoint import finite_state_dict
from zoo.data import ImageData
from zoo.device import pick_device
from zoo.errors import ZooError, error_reason
from zoo.files import load_matching_weights, read_header, write_tensors_file
from zoo.names import check_attribute_names

__all__ = [
    "CLASSIFIER_FILE",
    "KIND",
    "AttributeClassifier",
    "ClassifierInfo",
    "evaluate_classifier",
    "find_classifiers",
    "load_classifier",
    "read_classifier_info",
    "ruler_record",
    "save_classifier",
    "weights_digest",
]

log = logging.getLogger(__name__)

KIND = "attribute classifier"
CLASSIFIER_FILE = "classifier.safetensors"
SMALL_IMAGE_LIMIT = 64  # below this size the stride-2 stem conv becomes 3x3 stride 1
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
        return torch.cat(parts) if parts else torch.zeros(0, len(self.attr_names))

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """N x A float in {0, 1} (logit > 0), in eval mode, batched on the module's device;
        returned on the CPU."""
        return self._batched(lambda b: (self(b) > 0).float(), x, batch_size)


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
    weights_sha256: str = ""  # of the tensors, set by `load_classifier`: a copy has the same one


def save_classifier(path: str | Path, classifier: AttributeClassifier, **metadata: Any) -> None:
    """Write weights and the metadata that rebuilds the classifier, atomically.

    Keyword metadata (``data``, ``evaluation``, ``training``, ...) is stored as JSON under
    ``zoo.<key>``. Refuses non-finite weights.
    """
    path = Path(path)
    state = finite_state_dict(classifier, path)
    header = {
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
    write_tensors_file(path, KIND, state, header)


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
    check_attribute_names(
        info.attr_names, f"{path}: metadata zoo.attributes", f"the file is damaged, {TRAIN_HINT}"
    )
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
    info.weights_sha256 = weights_digest(classifier)
    return classifier.to(pick_device(str(device))).eval(), info


def find_classifiers(
    fingerprint: str, image_size: int, runs_dir: str | Path = "runs"
) -> list[Path]:
    """Every ``runs_dir/*/classifier.safetensors`` trained on data with this fingerprint at
    this image size, newest first; reads headers only and skips files that are not readable
    classifiers."""
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
    return [path for _, _, path in sorted(matches, reverse=True)]


def weights_digest(module: nn.Module) -> str:
    """sha256 of a module's tensors (names and bytes): the identity of a ruler, which a renamed
    copy of its file or an edited header keeps."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def ruler_record(info: ClassifierInfo) -> dict[str, Any]:
    """What a ruler is, as reports record it: its file, weights, architecture, the recipe it
    was trained with (seed, class weighting, augmentation) and its own accuracy."""
    settings = info.training.get("settings", {})
    return {
        "path": str(info.path),
        "weights_sha256": info.weights_sha256,
        "backbone": info.backbone,
        "image_size": info.image_size,
        "seed": settings.get("seed"),
        "balanced": settings.get("balanced"),
        "flip": settings.get("flip"),
        "shift": settings.get("shift"),
        "trained_on": {key: info.data.get(key) for key in ("name", "fingerprint", "split", "n")},
        "evaluation": {
            key: info.evaluation.get(key)
            for key in ("split", "n", "mean_accuracy", "mean_balanced_accuracy")
        },
    }


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
