"""Latent-space experiments: conditional generation, interpolation, edits, concept vectors.

These are the experiments of the two designs behind zoo: the CVAE's label swap
(encode a face with its labels, change the labels, decode) and the Keras VAE's
latent arithmetic (a "smile vector" = mean latent of smiling faces minus the
mean of the others, added to a face's latent). Everything takes and returns
tensors; `zoo/grids.py` turns them into captioned PNG grids.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from zoo.data import ImageData, Preprocess, checkpoint_data, load_image_file
from zoo.errors import ZooError
from zoo.files import file_sha256, read_tensors_file, write_tensors_file
from zoo.metadata import CheckpointInfo
from zoo.model import GenerativeModel
from zoo.names import check_attribute_names

log = logging.getLogger(__name__)

CONCEPT_KIND = "concept vector"


# -- attribute assignments ------------------------------------------------------------------------

# The 13 attributes of the AttGAN / STGAN edit benchmarks on CelebA (and of `zoo demo`).
ATTGAN_ATTRIBUTES = (
    "Bald", "Bangs", "Black_Hair", "Blond_Hair", "Brown_Hair", "Bushy_Eyebrows", "Eyeglasses",
    "Male", "Mouth_Slightly_Open", "Mustache", "No_Beard", "Pale_Skin", "Young",
)  # fmt: skip


def parse_assignments(
    texts: list[str], attr_names: list[str], *, option: str = "--attr"
) -> dict[str, float]:
    """``["Smiling=1", "Male=0"]`` -> ``{"Smiling": 1.0, "Male": 0.0}``; a bare name means =1."""
    return dict(parse_assignment_list(texts, attr_names, option=option))


def parse_assignment_list(
    texts: list[str], attr_names: list[str], *, option: str = "--set"
) -> list[tuple[str, float]]:
    """Like `parse_assignments`, but keeps order and repeats (one grid row per edit)."""
    assignments: list[tuple[str, float]] = []
    for text in texts:
        name, sep, value = text.partition("=")
        name, value = name.strip(), value.strip()
        if not name:
            raise ZooError(f"{option} {text!r} names no attribute; write NAME=1 or NAME=0")
        check_attribute(name, attr_names, option=option)
        if not sep:
            value = "1"
        if value not in ("0", "1"):
            raise ZooError(f"{option} {text!r}: the value must be 0 or 1, not {value!r}")
        assignments.append((name, float(value)))
    return assignments


def check_attribute(name: str, attr_names: list[str], *, option: str = "--attr") -> None:
    """A one-line error for an attribute the model or data does not know, with the valid ones."""
    if name in attr_names:
        return
    if not attr_names:
        raise ZooError(f"{option} {name}: this model was trained without attributes")
    close = difflib.get_close_matches(name, attr_names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ZooError(
        f"{option}: unknown attribute {name!r}{hint}; valid names: {', '.join(attr_names)}"
    )


def describe_assignments(assignments: dict[str, float]) -> str:
    return ", ".join(f"{name}={value:g}" for name, value in assignments.items())


def base_attributes(
    n: int, info: CheckpointInfo, base: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Attribute vectors to start from: drawn from the training data's rates, or all zero."""
    count = len(info.attr_names)
    if base == "zero":
        return torch.zeros(n, count)
    if base == "prior":
        if len(info.attr_rates) != count:
            raise ZooError(f"{info.path} stores no attribute rates; use --base zero")
        rates = torch.tensor(info.attr_rates).expand(n, count)
        return torch.bernoulli(rates, generator=generator)
    raise ZooError(f"--base must be prior or zero, not {base!r}")


# CelebA attributes that cannot hold together. Setting one of them to 1 clears the ones listed
# for it, as AttGAN's test protocol does (He et al. 2019): a face made blond is no longer
# black-haired, one given a mustache no longer has "No_Beard", a bald one loses its bangs.
_HAIR = ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")
EXCLUDES: dict[str, tuple[str, ...]] = {
    **{colour: tuple(other for other in _HAIR if other != colour) for colour in _HAIR},
    "Straight_Hair": ("Wavy_Hair",),
    "Wavy_Hair": ("Straight_Hair",),
    "Mustache": ("No_Beard",),
    "No_Beard": ("Mustache",),
    "Bald": ("Bangs",),
    "Receding_Hairline": ("Bangs",),
    "Bangs": ("Bald", "Receding_Hairline"),
}


def with_assignments(
    y: torch.Tensor, assignments: dict[str, float], attr_names: list[str]
) -> torch.Tensor:
    """A copy of ``y`` with the assigned attributes set in every row.

    An attribute set to 1 also clears the attributes `EXCLUDES` lists for it (unless they are
    assigned too), so the labels stay a combination the training data can hold.
    """
    y = y.clone()
    for name, value in assignments.items():
        if value >= 0.5:
            for other in EXCLUDES.get(name, ()):
                if other in attr_names and other not in assignments:
                    y[:, attr_names.index(other)] = 0.0
    for name, value in assignments.items():
        y[:, attr_names.index(name)] = value
    return y


def with_attribute(
    y: torch.Tensor, name: str, values: torch.Tensor, attr_names: list[str]
) -> torch.Tensor:
    """A copy of ``y`` with ``name`` set to each row's value in ``values`` (0 or 1), clearing
    the attributes that cannot hold with it where it is set (see `with_assignments`)."""
    on = with_assignments(y, {name: 1.0}, attr_names)
    off = with_assignments(y, {name: 0.0}, attr_names)
    return torch.where(values[:, None] > 0.5, on, off)


def scale_edit(y: torch.Tensor, new_y: torch.Tensor, intensity: float) -> torch.Tensor:
    """Labels ``intensity`` times as far from ``y`` as ``new_y`` is (AttGAN's test intensity):
    1 is the plain swap, 2 pushes a 0 -> 1 change to 2 and a 1 -> 0 change to -1."""
    return y + intensity * (new_y - y)


# -- generation -----------------------------------------------------------------------------------


@torch.inference_mode()
def decode(model: GenerativeModel, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """Decode in eval mode on the model's device; y is dropped for unconditional models."""
    y = y.to(model.device) if (y is not None and model.conditional) else None
    return model.decode(z.to(model.device), y).float().cpu()


@torch.inference_mode()
def encode_means(
    model: GenerativeModel, x: torch.Tensor, y: torch.Tensor | None, batch_size: int = 256
) -> torch.Tensor:
    """Posterior means, batched: the deterministic latent code of each image."""
    means = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size].to(model.device)
        yb = y[start : start + batch_size].to(model.device) if model.conditional else None
        means.append(model.encode(xb, yb).mean.float().cpu())
    return torch.cat(means)


# -- interpolation --------------------------------------------------------------------------------


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between rows a and b at fractions t (falls back to lerp when
    the vectors are (anti)parallel, where the great circle is undefined)."""
    t = t.view(-1, 1)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1, 1).view(-1, 1)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    if (sin.abs() < 1e-6).any():
        return torch.lerp(a, b, t)
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / sin


def interpolate(
    model: GenerativeModel,
    x_from: torch.Tensor,
    x_to: torch.Tensor,
    y_from: torch.Tensor | None,
    y_to: torch.Tensor | None,
    steps: int,
    *,
    spherical: bool = False,
) -> torch.Tensor:
    """Decode ``steps`` evenly spaced points between the posterior means of two images.

    The first and last images are exactly the reconstructions of the two inputs; for
    conditional models the attribute vectors are interpolated alongside z.
    """
    if steps < 2:
        raise ZooError(f"--steps must be at least 2, got {steps}")
    z_ends = encode_means(
        model,
        torch.stack([x_from, x_to]),
        torch.stack([y_from, y_to]) if model.conditional else None,
    )
    t = torch.linspace(0, 1, steps)
    a, b = z_ends[0].expand(steps, -1), z_ends[1].expand(steps, -1)
    z = slerp(a, b, t) if spherical else torch.lerp(a, b, t.view(-1, 1))
    y = (
        torch.lerp(y_from.expand(steps, -1), y_to.expand(steps, -1), t.view(-1, 1))
        if (model.conditional)
        else None
    )
    return decode(model, z, y)


# -- edits ----------------------------------------------------------------------------------------


def edit_by_labels(
    model: GenerativeModel,
    x: torch.Tensor,
    y: torch.Tensor,
    new_y: torch.Tensor,
    intensity: float = 1.0,
) -> torch.Tensor:
    """The CVAE label swap: encode with the true labels, decode the same z with new labels
    (the change scaled by ``intensity``, see `scale_edit`)."""
    if not model.conditional:
        raise ZooError(
            f"{model.model_name} is unconditional: edit it with a concept vector (--concept)"
        )
    return decode(model, encode_means(model, x, y), scale_edit(y, new_y, intensity))


def edit_by_concept(
    model: GenerativeModel,
    x: torch.Tensor,
    y: torch.Tensor | None,
    vector: torch.Tensor,
    strength: float,
) -> torch.Tensor:
    """Latent arithmetic: decode z + strength * v, keeping any labels as they are."""
    z = encode_means(model, x, y)
    return decode(model, z + strength * vector.to(z), y)


# -- concept vectors ------------------------------------------------------------------------------


@dataclass
class Concept:
    """Mean posterior mean of images with an attribute minus that of images without it."""

    attribute: str
    vector: torch.Tensor
    count_with: int
    count_without: int
    data_fingerprint: str
    data_root: str
    split: str  # the split averaged over; "" when the file does not record it (unknown)
    checkpoint_digest: str


def compute_concept(
    model: GenerativeModel, data: ImageData, attribute: str, info: CheckpointInfo
) -> Concept:
    """Encode a split and take the difference of class means of the posterior means."""
    check_attribute(attribute, data.attr_names, option="--attr")
    has = data.attrs[:, data.attr_names.index(attribute)] > 0.5
    count_with, count_without = int(has.sum()), int((~has).sum())
    if count_with == 0 or count_without == 0:
        raise ZooError(
            f"the {data.split} split of {data.root} has {count_with} images with {attribute} and "
            f"{count_without} without; a concept vector needs both (try --split all)"
        )
    y = data.labels(info.attr_names) if model.conditional else None
    means = torch.zeros(2, model.latent_dim)
    for start in range(0, len(data), 512):
        index = torch.arange(start, min(start + 512, len(data)))
        x, _ = data.batch(index)
        z = encode_means(model, x, y[index] if y is not None else None)
        means[0] += z[has[index]].sum(dim=0)
        means[1] += z[~has[index]].sum(dim=0)
    vector = means[0] / count_with - means[1] / count_without
    return Concept(
        attribute=attribute,
        vector=vector,
        count_with=count_with,
        count_without=count_without,
        data_fingerprint=data.fingerprint,
        data_root=data.root,
        split=data.split,
        checkpoint_digest=file_digest(info.path),
    )


def file_digest(path: Path) -> str:
    """The short sha256 a concept vector records of the checkpoint it was computed from."""
    return file_sha256(Path(path))[:16]


def concept_path(checkpoint: Path, attribute: str) -> Path:
    """Concept vectors live beside the checkpoint: ``<run>/concepts/<attribute>.safetensors``,
    for plain attribute names only (a name with ``/`` or ``..`` would leave the folder)."""
    check_attribute_names([attribute], "concept vector", "use an attribute of the model")
    return Path(checkpoint).parent / "concepts" / f"{attribute}.safetensors"


def save_concept(path: Path, concept: Concept) -> None:
    metadata = {
        "attribute": concept.attribute,
        "count_with": str(concept.count_with),
        "count_without": str(concept.count_without),
        "data_fingerprint": concept.data_fingerprint,
        "data_root": concept.data_root,
        "split": concept.split,
        "checkpoint_digest": concept.checkpoint_digest,
    }
    write_tensors_file(path, CONCEPT_KIND, {"vector": concept.vector}, metadata)


def load_concept(checkpoint: Path, attribute: str, model: GenerativeModel) -> Concept:
    """The stored concept vector for ``attribute``, or a one-line error saying how to make it."""
    path = concept_path(checkpoint, attribute)
    if not path.is_file():
        raise ZooError(
            f"no concept vector for {attribute} beside {checkpoint} ({path} is missing); "
            f"compute it with: zoo concept {checkpoint} --attr {attribute}"
        )
    tensors, metadata = read_tensors_file(path, CONCEPT_KIND)
    vector = tensors.get("vector")
    if vector is None or vector.shape != (model.latent_dim,):
        raise ZooError(f"{path} does not hold a {model.latent_dim}-d concept vector; recompute it")
    concept = Concept(
        attribute=metadata.get("attribute", attribute),
        vector=vector.float(),
        count_with=int(metadata.get("count_with", 0)),
        count_without=int(metadata.get("count_without", 0)),
        data_fingerprint=metadata.get("data_fingerprint", ""),
        data_root=metadata.get("data_root", ""),
        split=metadata.get("split", ""),
        checkpoint_digest=metadata.get("checkpoint_digest", ""),
    )
    if concept.checkpoint_digest != file_digest(checkpoint):
        log.warning(
            "the %s concept vector was computed for an earlier version of %s; "
            "recompute it with zoo concept",
            attribute,
            checkpoint,
        )
    return concept


# -- the 2-d latent grid --------------------------------------------------------------------------


def latent_grid(model: GenerativeModel, n: int, y: torch.Tensor | None = None) -> torch.Tensor:
    """Decode an n x n grid of a 2-d latent, spaced by the prior's quantiles (5% to 95%).

    Rows run from high z2 (top) to low, columns from low z1 (left) to high, as in the
    Keras example; returns n*n images in row-major order.
    """
    if model.latent_dim != 2:
        raise ZooError(
            f"zoo grid needs a model with a 2-d latent; this {model.model_name} has "
            f"{model.latent_dim} (train one with --latent-dim 2)"
        )
    if n < 2:
        raise ZooError(f"--n must be at least 2, got {n}")
    quantiles = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, n))
    z2, z1 = torch.meshgrid(quantiles.flip(0), quantiles, indexing="ij")
    z = torch.stack([z1.reshape(-1), z2.reshape(-1)], dim=1)
    labels = y.expand(n * n, -1) if (y is not None and model.conditional) else None
    return decode(model, z, labels)


# -- images to work on ----------------------------------------------------------------------------


@dataclass
class Faces:
    """Images to edit or interpolate, with their labels when they come from a dataset."""

    images: torch.Tensor
    attrs: torch.Tensor | None
    names: list[str]


def faces_from_split(
    info: CheckpointInfo,
    data: ImageData,
    *,
    indices: list[int] | None = None,
    count: int = 8,
    seed: int = 0,
) -> Faces:
    """Chosen images of a split (by index, or ``count`` drawn with ``seed``) with their labels."""
    if indices is None:
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(len(data), generator=generator)[: min(count, len(data))].tolist()
    bad = [i for i in indices if not 0 <= i < len(data)]
    if bad:
        raise ZooError(
            f"index {bad[0]} is outside the {data.split} split, which has {len(data)} images"
        )
    index = torch.tensor(indices, dtype=torch.long)
    images, _ = data.batch(index)
    attrs = data.labels(info.attr_names)[index] if info.attr_names else None
    return Faces(images, attrs, [data.filenames[i] for i in indices])


def faces_from_files(paths: list[Path], info: CheckpointInfo) -> Faces:
    """User images, cropped and resized exactly like the training data; labels unknown."""
    preprocess = Preprocess.from_dict(info.preprocess)
    images = torch.stack([load_image_file(path, preprocess) for path in paths])
    return Faces(images, None, [Path(path).name for path in paths])


def labels_for(faces: Faces, info: CheckpointInfo, assignments: dict[str, float]) -> torch.Tensor:
    """Labels for encoding: the data's own, or for image files the training data's most
    common value of each attribute; ``assignments`` (--attr) override either."""
    if faces.attrs is not None:
        y = faces.attrs
    else:
        modes = [1.0 if rate > 0.5 else 0.0 for rate in info.attr_rates]
        if len(modes) != len(info.attr_names):
            modes = [0.0] * len(info.attr_names)
        y = torch.tensor(modes).expand(faces.images.shape[0], -1)
    return with_assignments(y, assignments, info.attr_names)


def interpolation_endpoints(
    info: CheckpointInfo,
    from_files: list[Path],
    to_files: list[Path],
    from_indices: list[int],
    to_indices: list[int],
    *,
    data: str | None = None,
    split: str = "valid",
) -> tuple[Faces, Faces]:
    """The (start, end) faces of the interpolation rows, paired in the order given: the image
    files if any are named (the indices are then ignored), else images of the split by index.
    An end without a partner is an error, never a silently shorter figure."""
    files = bool(from_files or to_files)
    starts, ends = (from_files, to_files) if files else (from_indices, to_indices)
    if not starts or len(starts) != len(ends):
        raise ZooError(
            "give pairs of endpoints: --from A.jpg --to B.jpg, or --from-index I --to-index J, "
            "with as many starts as ends"
        )
    if files:
        return faces_from_files(from_files, info), faces_from_files(to_files, info)
    split_data = checkpoint_data(info, split, data)
    return (
        faces_from_split(info, split_data, indices=from_indices),
        faces_from_split(info, split_data, indices=to_indices),
    )
