"""Animated GIFs of edits and latent traversals, as the editing and disentanglement papers
show them: one row of faces, the attribute (or one z dimension) sweeping off to on and back.

A conditional model sweeps the label itself (from the attribute off to ``intensity`` times
on, the other labels as the face has them); an unconditional one walks its concept vector
from ``-strength`` to ``+strength``. A traversal sets one dimension of each face's posterior
mean (or of prior draws) from ``-span`` to ``+span``, the others fixed. Pillow writes the
GIF; every frame is a captioned grid (`zoo.grids.captioned_grid`) naming the value shown.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from zoo.errors import ZooError
from zoo.files import atomic_write_bytes
from zoo.grids import GridRow, captioned_grid
from zoo.latent import (
    Faces,
    check_attribute,
    decode,
    encode_means,
    labels_for,
    load_concept,
    with_assignments,
)
from zoo.model import GenerativeModel


def there_and_back(frames: int) -> torch.Tensor:
    """Values from 0 up to 1 and back down, 0 and 1 once each: ``frames`` of them, rounded
    down to even, so the loop has no repeated frame where it turns or restarts."""
    up = torch.linspace(0, 1, max(frames, 2) // 2 + 1)
    return torch.cat([up, up.flip(0)[1:-1]])


def attribute_frames(
    model: GenerativeModel,
    faces: Faces,
    attribute: str,
    *,
    frames: int = 24,
    intensity: float = 1.0,
    strength: float = 1.5,
) -> list[GridRow]:
    """One captioned row per frame: ``attribute`` swept from off to on and back."""
    info = model.checkpoint_info
    if info is None:
        raise ZooError(f"{model.model_name} was not loaded from a checkpoint; use zoo.load")
    check_attribute(attribute, info.attr_names)
    steps = there_and_back(frames)
    if model.conditional:
        y = labels_for(faces, info, {})
        z = encode_means(model, faces.images, y)
        off = with_assignments(y, {attribute: 0.0}, info.attr_names)
        on = with_assignments(y, {attribute: 1.0}, info.attr_names)
        return [
            GridRow(
                f"{attribute} = {intensity * t:.2f}",
                decode(model, z, off + intensity * t * (on - off)),
            )
            for t in steps.tolist()
        ]
    vector = load_concept(info.path, attribute, model).vector
    z = encode_means(model, faces.images, None)
    return [
        GridRow(
            f"z {(2 * t - 1) * strength:+.2f} v({attribute})",
            decode(model, z + (2 * t - 1) * strength * vector.to(z), None),
        )
        for t in steps.tolist()
    ]


def traversal_frames(
    model: GenerativeModel,
    z: torch.Tensor,
    y: torch.Tensor | None,
    dim: int,
    *,
    frames: int = 24,
    span: float = 3.0,
) -> list[GridRow]:
    """One captioned row per frame: z[:, dim] from -span to +span and back, the rest fixed."""
    if not 0 <= dim < model.latent_dim:
        raise ZooError(
            f"--traverse {dim} is not a latent dimension; {model.model_name} has "
            f"{model.latent_dim} (0 to {model.latent_dim - 1})"
        )
    rows = []
    for t in there_and_back(frames).tolist():
        value = (2 * t - 1) * span
        moved = z.clone()
        moved[:, dim] = value
        rows.append(GridRow(f"z[{dim}] = {value:+.2f}", decode(model, moved, y)))
    return rows


def animation_rows(
    model: GenerativeModel,
    faces: Faces,
    *,
    attr: str | None,
    traverse: int | None,
    prior_seed: int | None = None,
    frames: int = 24,
    intensity: float = 1.0,
    strength: float = 1.5,
    span: float = 3.0,
) -> tuple[list[GridRow], str]:
    """The frames of `zoo animate` and what they show: ``attr`` swept on ``faces``, or the
    ``traverse`` dimension on their posterior means (on prior draws seeded by
    ``prior_seed`` when given; a conditional model keeps the faces' labels)."""
    if attr is not None:
        rows = attribute_frames(
            model, faces, attr, frames=frames, intensity=intensity, strength=strength
        )
        return rows, f"{attr} swept on {len(faces.names)} faces"
    if traverse is None:
        raise ZooError("give one of --attr NAME (an edit) or --traverse DIM (a latent traversal)")
    info = model.checkpoint_info
    y = labels_for(faces, info, {}) if model.conditional and info is not None else None
    if prior_seed is None:
        z, drawn = encode_means(model, faces.images, y), f"{len(faces.names)} faces"
    else:
        generator = torch.Generator().manual_seed(prior_seed)
        z = torch.randn(len(faces.names), model.latent_dim, generator=generator)
        drawn = f"{len(faces.names)} prior draws"
    rows = traversal_frames(model, z, y, traverse, frames=frames, span=span)
    return rows, f"z[{traverse}] traversed on {drawn}"


def save_gif(rows: list[GridRow], path: Path, *, title: str, frame_ms: int = 80) -> Path:
    """Write the frames as a looping GIF (written atomically): each frame is one captioned
    row; the label moves into the title so every frame has the same size."""
    pictures = [
        captioned_grid([GridRow("", row.images)], title=f"{title}: {row.label}") for row in rows
    ]
    gif = io.BytesIO()
    pictures[0].save(
        gif, format="GIF", save_all=True, append_images=pictures[1:], duration=frame_ms, loop=0
    )
    atomic_write_bytes(Path(path), gif.getvalue())
    return Path(path)
