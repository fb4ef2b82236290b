"""The experiments of `zoo generate / interpolate / edit / grid` as captioned grids.

Each function runs one experiment from `zoo.latent` and lays the results out as
rows with captions (attribute names and values), so the PNG reads on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from zoo.errors import ZooError
from zoo.grids import GridRow, save_captioned_grid
from zoo.latent import (
    Faces,
    base_attributes,
    check_attribute,
    decode,
    describe_assignments,
    edit_by_concept,
    edit_by_labels,
    encode_means,
    interpolate,
    labels_for,
    latent_grid,
    load_concept,
    scale_edit,
    with_assignments,
    with_attribute,
)
from zoo.metadata import CheckpointInfo
from zoo.model import GenerativeModel

COLUMNS = 8


@dataclass
class Figure:
    title: str
    rows: list[GridRow]
    column_labels: list[str] = field(default_factory=list)

    def save(self, path: Path) -> Path:
        return save_captioned_grid(
            self.rows, path, title=self.title, column_labels=self.column_labels or None
        )


def _info(model: GenerativeModel) -> CheckpointInfo:
    """The checkpoint's metadata: captions need its attribute names, concepts its path."""
    if model.checkpoint_info is None:
        raise ZooError(f"{model.model_name} was not loaded from a checkpoint; use zoo.load")
    return model.checkpoint_info


def _chunks(images: torch.Tensor) -> list[torch.Tensor]:
    return list(images.split(COLUMNS))


def concept_shift(
    model: GenerativeModel, assignments: dict[str, float], strength: float
) -> torch.Tensor:
    """Sum of +/- strength * concept vector for each assigned attribute (1 adds, 0 subtracts)."""
    shift = torch.zeros(model.latent_dim)
    for name, value in assignments.items():
        concept = load_concept(_info(model).path, name, model)
        shift += (1.0 if value else -1.0) * strength * concept.vector
    return shift


def _refuse_unconditional_labels(model: GenerativeModel, option: str) -> None:
    raise ZooError(
        f"{model.model_name} is unconditional, so {option} needs a concept vector; "
        f"compute one with: zoo concept {_info(model).path} --attr NAME"
    )


def generation_figure(
    model: GenerativeModel,
    *,
    n: int,
    assignments: dict[str, float],
    base: str = "prior",
    sweep: str | None = None,
    seed: int = 0,
    temperature: float = 1.0,
    strength: float = 1.5,
) -> Figure:
    """Samples from the prior. Conditional models take the assigned attributes (the rest
    drawn from the training data's rates, or zero); unconditional ones move along concept
    vectors. ``sweep`` shows each z with the attribute off and on."""
    info = _info(model)
    if n < 1:
        raise ZooError(f"-n must be at least 1, got {n}")
    if sweep is not None:
        check_attribute(sweep, info.attr_names, option="--sweep")
    generator = torch.Generator().manual_seed(seed)
    z = model.sample_prior(n, generator=generator, temperature=temperature).cpu()
    title = f"{model.model_name} samples, seed {seed}, temperature {temperature:g}"
    if model.conditional:
        y = with_assignments(
            base_attributes(n, info, base, generator), assignments, info.attr_names
        )
        others = "others drawn from data rates" if base == "prior" else "others 0"
        given = describe_assignments(assignments)
        if sweep is None:
            images = decode(model, z, y)
            label = f"{given}; {others}" if given else f"labels: {others}"
            return Figure(title, [GridRow(label, chunk) for chunk in _chunks(images)])
        off = decode(model, z, with_assignments(y, {sweep: 0.0}, info.attr_names))
        on = decode(model, z, with_assignments(y, {sweep: 1.0}, info.attr_names))
        return _sweep_figure(title, off, on, f"{sweep}=0 {given}", f"{sweep}=1 {given}")

    if assignments:
        z = z + concept_shift(model, assignments, strength)
    given = describe_assignments(assignments)
    label = f"concept {given} (strength {strength:g})" if given else "prior samples"
    if sweep is None:
        return Figure(title, [GridRow(label, chunk) for chunk in _chunks(decode(model, z, None))])
    vector = load_concept(info.path, sweep, model).vector
    off, on = decode(model, z - strength * vector, None), decode(model, z + strength * vector, None)
    return _sweep_figure(
        title, off, on, f"{sweep} concept -{strength:g}", f"{sweep} concept +{strength:g}"
    )


def _sweep_figure(
    title: str, off: torch.Tensor, on: torch.Tensor, off_label: str, on_label: str
) -> Figure:
    """Pairs of rows, the attribute off then on, for the same z in each column."""
    rows = []
    for off_chunk, on_chunk in zip(_chunks(off), _chunks(on), strict=True):
        rows += [GridRow(off_label, off_chunk), GridRow(on_label, on_chunk)]
    return Figure(f"{title}; same z in each pair of rows", rows)


def interpolation_figure(
    model: GenerativeModel,
    start: Faces,
    end: Faces,
    *,
    steps: int,
    spherical: bool,
    assignments: dict[str, float],
) -> Figure:
    """One row per pair: reconstruction of A, the path through latent space, reconstruction of B."""
    info = _info(model)
    y_start = labels_for(start, info, assignments) if model.conditional else None
    y_end = labels_for(end, info, assignments) if model.conditional else None
    rows = []
    for i in range(start.images.shape[0]):
        images = interpolate(
            model,
            start.images[i],
            end.images[i],
            y_start[i] if y_start is not None else None,
            y_end[i] if y_end is not None else None,
            steps,
            spherical=spherical,
        )
        rows.append(GridRow(f"{start.names[i]} -> {end.names[i]}", images))
    kind = "spherical" if spherical else "linear"
    labels = [f"t={t:.2f}" for t in torch.linspace(0, 1, steps).tolist()]
    return Figure(f"{model.model_name}: {kind} interpolation of posterior means", rows, labels)


def edit_figure(
    model: GenerativeModel,
    faces: Faces,
    *,
    label_edits: list[tuple[str, float]],
    concepts: list[str],
    strength: float,
    intensity: float = 1.0,
) -> Figure:
    """Originals and reconstructions on top, then one row per edit.

    A label edit is the CVAE label swap (its change scaled by ``intensity``); a concept edit
    adds strength * concept vector. On an unconditional model a label edit goes through the
    concept vector (1 adds it, 0 subtracts it, times ``intensity``), so both kinds of model
    answer the same request.
    """
    info = _info(model)
    if not label_edits and not concepts:
        raise ZooError("nothing to edit: pass --set NAME=0|1 and/or --concept NAME")
    for name in concepts:
        check_attribute(name, info.attr_names, option="--concept")
    y = labels_for(faces, info, {}) if model.conditional else None
    reconstruction = decode(model, encode_means(model, faces.images, y), y)
    rows = [GridRow("original", faces.images), GridRow("reconstruction", reconstruction)]
    times = f" x{intensity:g}" if intensity != 1 else ""
    for name, value in label_edits:
        if model.conditional:
            new_y = with_assignments(y, {name: value}, info.attr_names)
            edited = edit_by_labels(model, faces.images, y, new_y, intensity)
            rows.append(GridRow(f"labels {name}={value:g}{times}", edited))
        else:
            shift = concept_shift(model, {name: value}, strength * intensity)
            rows.append(
                GridRow(
                    f"concept {name}={value:g} ({'+' if value else '-'}{strength * intensity:g} v)",
                    edit_by_concept(model, faces.images, None, shift, 1.0),
                )
            )
    for name in concepts:
        vector = load_concept(info.path, name, model).vector
        rows.append(
            GridRow(
                f"concept {name} {strength:+g} v",
                edit_by_concept(model, faces.images, y, vector, strength),
            )
        )
    names = [name if len(name) <= 10 else name[:9] + "~" for name in faces.names]
    return Figure(f"{model.model_name}: attribute edits", rows, names)


def flip_figure(
    model: GenerativeModel,
    faces: Faces,
    attributes: list[str],
    *,
    intensity: float | dict[str, float] = 1.0,
) -> Figure:
    """One row per face: original, reconstruction, then each attribute flipped on its own.

    The AttGAN picture behind the edit benchmark. Each row's caption lists which of the
    attributes the face has, so a column removes it where listed and adds it elsewhere.
    ``intensity`` is one scale for every edit or one per attribute (tuned intensities).
    """
    scales = intensity if isinstance(intensity, dict) else dict.fromkeys(attributes, intensity)
    info = _info(model)
    if not model.conditional:
        raise ZooError(f"{model.model_name} is unconditional: it has no labels to flip")
    for name in attributes:
        check_attribute(name, info.attr_names, option="attribute")
    y = labels_for(faces, info, {})
    z = encode_means(model, faces.images, y)
    columns = [faces.images, decode(model, z, y)]
    for name in attributes:
        column = info.attr_names.index(name)
        new_y = with_attribute(y, name, 1 - y[:, column], info.attr_names)
        columns.append(decode(model, z, scale_edit(y, new_y, scales[name])))
    rows = []
    for i, filename in enumerate(faces.names):
        has = [name for name in attributes if y[i, info.attr_names.index(name)] > 0.5]
        caption = f"{filename} has {', '.join(has) or 'none of them'}"
        rows.append(GridRow(caption, torch.stack([images[i] for images in columns])))
    if len(set(scales.values())) > 1:
        times = " at its tuned intensity"
    else:
        times = "".join(f" x{value:g}" for value in set(scales.values()) if value != 1)
    title = (
        f"{model.model_name}: each attribute flipped alone{times} (label swap); "
        "a column removes the attribute where the row lists it and adds it elsewhere"
    )
    headers = [name if scales[name] == 1 else f"{name} x{scales[name]:g}" for name in attributes]
    return Figure(title, rows, ["original", "reconstruction", *headers])


def latent_grid_figure(
    model: GenerativeModel, *, n: int, assignments: dict[str, float], base: str = "zero"
) -> Figure:
    """The Keras-example manifold: an n x n grid over a 2-d latent at the prior's quantiles."""
    info = _info(model)
    y = None
    if model.conditional:
        y = with_assignments(base_attributes(1, info, base), assignments, info.attr_names)
    elif assignments:
        _refuse_unconditional_labels(model, "--attr")
    images = latent_grid(model, n, y)
    quantiles = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, n))
    rows = [
        GridRow(f"z2={z2:+.2f}", images[i * n : (i + 1) * n])
        for i, z2 in enumerate(quantiles.flip(0).tolist())
    ]
    given = f" with {describe_assignments(assignments)}" if assignments else ""
    title = f"{model.model_name}: 2-d latent at prior quantiles 5%..95%{given} (columns: z1)"
    return Figure(title, rows, [f"{z1:+.2f}" for z1 in quantiles.tolist()])
