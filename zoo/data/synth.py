"""The built-in synthetic faces: deterministic cartoon faces with ground-truth CelebA attributes.

They make every command work on a fresh machine with no download, and unlike CelebA their
labels are exact, so an attribute edit can be checked against what was drawn. Faces are drawn
in batches on a pixel grid with torch; every shape is a signed distance (in face units) turned
into anti-aliased coverage. Only exactly rounded elementwise operations (+ - * / sqrt min max
floor) compute pixels, never transcendental functions or reductions whose vectorised and scalar
code paths can differ, so the same seed gives byte-identical files whatever the CPU or thread
count.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.io import decode_jpeg, encode_jpeg, write_file

from zoo.data import celeba
from zoo.data.cache import quiet_image_io
from zoo.data.preprocess import Preprocess
from zoo.errors import ZooError
from zoo.progress import image_progress

logger = logging.getLogger(__name__)

VERSION = 1
BATCH = 256
JPEG_QUALITY = 95
ATTRIBUTES = (  # drawn attributes, in the official CelebA column order
    "Bald",
    "Bangs",
    "Black_Hair",
    "Blond_Hair",
    "Brown_Hair",
    "Eyeglasses",
    "Gray_Hair",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "No_Beard",
    "Pale_Skin",
    "Rosy_Cheeks",
    "Smiling",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Young",
)
_HAIR_RGB = {  # base colours; each face scales its own by a random brightness
    "Black_Hair": (0.09, 0.07, 0.06),
    "Brown_Hair": (0.42, 0.26, 0.13),
    "Blond_Hair": (0.92, 0.80, 0.47),
    "Gray_Hair": (0.74, 0.74, 0.76),
    "other": (0.62, 0.24, 0.10),  # auburn: none of the four CelebA hair colours
}


def image_shape(size: int) -> tuple[int, int]:
    """(height, width) of an image whose CelebA face crop is ``size`` x ``size``."""
    return round(size * 218 / 148), round(size * 178 / 148)


def sample_attributes(n: int, generator: torch.Generator) -> torch.Tensor:
    """bool n x len(ATTRIBUTES) with CelebA-like rates and correlations (e.g. gray hair mostly
    on older faces, moustaches only on men), every attribute still varying."""
    draws = torch.rand(n, 14, generator=generator).unbind(1)
    male = draws[0] < 0.42
    young = draws[1] < 0.75
    bald = male & (draws[2] < torch.where(young, 0.04, 0.25))
    gray_p = torch.where(young, 0.02, 0.45)
    black_p = gray_p + (1 - gray_p) * 0.36
    brown_p = black_p + (1 - gray_p) * 0.30
    blond_p = brown_p + (1 - gray_p) * torch.where(male, 0.10, 0.26)
    hair = draws[3]
    has_hair = ~bald
    beard = male & (draws[6] < 0.3)
    columns = {
        "Bald": bald,
        "Bangs": has_hair & (draws[4] < torch.where(male, 0.08, 0.22)),
        "Black_Hair": has_hair & (hair >= gray_p) & (hair < black_p),
        "Blond_Hair": has_hair & (hair >= brown_p) & (hair < blond_p),
        "Brown_Hair": has_hair & (hair >= black_p) & (hair < brown_p),
        "Eyeglasses": draws[5] < torch.where(young, 0.06, 0.18),
        "Gray_Hair": has_hair & (hair < gray_p),
        "Male": male,
        "Mouth_Slightly_Open": draws[7] < torch.where(draws[8] < 0.48, 0.6, 0.2),
        "Mustache": male & (draws[9] < torch.where(beard, 0.55, 0.1)),
        "No_Beard": ~beard,
        "Pale_Skin": draws[10] < 0.12,
        "Rosy_Cheeks": draws[11] < torch.where(male, 0.03, 0.12),
        "Smiling": draws[8] < 0.48,
        "Wearing_Hat": draws[12] < 0.07,
        "Wearing_Lipstick": ~male & (draws[13] < 0.6),
        "Young": young,
    }
    return torch.stack([columns[name] for name in ATTRIBUTES], dim=1)


# -- independent factors: the ground truth of the disentanglement metrics ------------------------

HAIR = ("Bald", "Black_Hair", "Brown_Hair", "Blond_Hair", "Gray_Hair", "other")  # hair's values
BINARY_FACTORS = tuple(name for name in ATTRIBUTES if name not in HAIR)
FACTORS = ("hair", *BINARY_FACTORS)  # the independent factors, in this order
FACTOR_SIZES = (len(HAIR), *(2 for _ in BINARY_FACTORS))  # how many values each takes


def factors_to_attributes(factors: torch.Tensor) -> torch.Tensor:
    """long n x len(FACTORS) -> bool n x len(ATTRIBUTES): hair becomes Bald or one colour flag
    (or none, for the auburn "other"), the binary factors are their own attributes."""
    hair = factors[:, 0]
    columns = {name: hair == value for value, name in enumerate(HAIR[:-1])}
    columns |= {name: factors[:, 1 + i] == 1 for i, name in enumerate(BINARY_FACTORS)}
    return torch.stack([columns[name] for name in ATTRIBUTES], dim=1)


def attributes_to_factors(attrs: torch.Tensor) -> torch.Tensor:
    """bool or 0/1 n x len(ATTRIBUTES) -> long n x len(FACTORS); ZooError for a row with more
    than one of Bald and the hair colours, which no factor value draws."""
    flags = attrs.bool()
    hair_flags = flags[:, [ATTRIBUTES.index(name) for name in HAIR[:-1]]]
    if (hair_flags.sum(dim=1) > 1).any():
        raise ZooError("labels with two of Bald and the hair colours are not synthetic factors")
    hair = torch.where(hair_flags.any(dim=1), hair_flags.long().argmax(dim=1), len(HAIR) - 1)
    binary = flags[:, [ATTRIBUTES.index(name) for name in BINARY_FACTORS]].long()
    return torch.cat([hair[:, None], binary], dim=1)


def drawable(factors: torch.Tensor) -> torch.Tensor:
    """bool n: the rows the renderer can show: no bangs on a bald head (there is no hair to cut)
    and no moustache in a beard (both are drawn in the same colour, so it would not show)."""
    bald = factors[:, 0] == HAIR.index("Bald")
    bangs = factors[:, 1 + BINARY_FACTORS.index("Bangs")] == 1
    beard = factors[:, 1 + BINARY_FACTORS.index("No_Beard")] == 0
    mustache = factors[:, 1 + BINARY_FACTORS.index("Mustache")] == 1
    return ~(bald & bangs) & ~(beard & mustache)


def sample_factors(
    n: int, generator: torch.Generator, fixed: dict[int, int] | None = None
) -> tuple[torch.Tensor, int]:
    """(long n x len(FACTORS), how many draws were skipped): every factor uniform over its
    values and independent of the others, except that undrawable rows (`drawable`) are skipped;
    ``fixed`` holds factor index -> value for every row ("fix one factor, resample the rest")."""
    fixed = fixed or {}
    sizes = torch.tensor(FACTOR_SIZES)
    kept: list[torch.Tensor] = []
    have = skipped = 0
    while have < n:
        draws = (torch.rand(2 * (n - have) + 8, len(FACTORS), generator=generator) * sizes).long()
        for index, value in fixed.items():
            draws[:, index] = value
        ok = drawable(draws)
        if not ok.any():
            raise ZooError(f"no drawable face has the fixed factors {fixed}")
        needed = int(torch.searchsorted(ok.long().cumsum(0), n - have)) + 1  # rows to the n-th
        kept.append(draws[:needed][ok[:needed]])
        skipped += int((~ok[:needed]).sum())
        have += int(ok[:needed].sum())
    return torch.cat(kept)[:n], skipped


# -- drawing -----------------------------------------------------------------------------------

NUISANCE_CHANNELS = (1, 1, 1, 1, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 3, 3, 1, 3, 1, 1)


@dataclass(frozen=True)
class Nuisance:
    """What varies between faces besides their attributes (position, scale, skin tone,
    background, lighting, colours): uniform [0, 1) draws, one tensor per quantity, n faces
    each. Rendering the same draws with other attributes changes only those attributes."""

    draws: tuple[torch.Tensor, ...]

    def __len__(self) -> int:
        return self.draws[0].shape[0]

    def select(self, index: torch.Tensor | slice) -> Nuisance:
        return Nuisance(tuple(draw[index] for draw in self.draws))


def draw_nuisance(n: int, generator: torch.Generator) -> Nuisance:
    """n faces' nuisance from ``generator``, in the order `render_faces` has always drawn it."""
    return Nuisance(
        tuple(
            torch.rand((n, channels, 1, 1) if channels > 1 else (n, 1, 1), generator=generator)
            for channels in NUISANCE_CHANNELS
        )
    )


def render_faces(
    attrs: torch.Tensor, size: int, nuisance: Nuisance | torch.Generator
) -> torch.Tensor:
    """Draw one face per row of ``attrs`` (n x len(ATTRIBUTES), 0/1) -> uint8 n x 3 x H x W.

    Nuisance is given (`draw_nuisance`) or drawn from a generator in a fixed order that does
    not depend on ``attrs``, so re-rendering with the same draws and one attribute changed
    changes only that attribute's pixels.
    """
    n = attrs.shape[0]
    if isinstance(nuisance, torch.Generator):
        nuisance = draw_nuisance(n, nuisance)
    if len(nuisance) != n:
        raise ZooError(f"{len(nuisance)} nuisance draws for {n} faces; give one per face")
    draws = iter(nuisance.draws)
    flag = {name: attrs[:, i].bool().view(n, 1, 1) for i, name in enumerate(ATTRIBUTES)}
    male, young, smiling = flag["Male"], flag["Young"], flag["Smiling"]
    has_hair, mouth_open = ~flag["Bald"], flag["Mouth_Slightly_Open"]

    def uniform(low: float, high: float, channels: int = 1) -> torch.Tensor:
        draw = next(draws)
        if draw.shape[1:] != ((channels, 1, 1) if channels > 1 else (1, 1)):
            raise ZooError(f"nuisance draws of shape {tuple(draw.shape)} are not this renderer's")
        return low + (high - low) * draw

    # nuisance, in the order of NUISANCE_CHANNELS
    height, width = image_shape(size)
    top, left, side = celeba.crop_box(height, width, celeba.CELEBA_CROP)
    face_x = left + side / 2 + uniform(-0.05, 0.05) * side
    face_y = top + side / 2 + (0.05 + uniform(-0.04, 0.04)) * side
    radius = 0.24 * side * uniform(0.9, 1.1)  # face half-width in pixels = one face unit
    skin = _mix((0.38, 0.24, 0.16), (0.93, 0.76, 0.64), uniform(0.0, 0.85))
    skin = skin * uniform(0.95, 1.05, 3)
    pale = _rgb((0.99, 0.90, 0.84)) - uniform(0.0, 0.04, 3)
    skin = torch.where(flag["Pale_Skin"].unsqueeze(1), pale, skin)
    background = (uniform(0.12, 0.95, 3), uniform(0.12, 0.95, 3))
    gradient_direction = _unit_vector(uniform(-1, 1), uniform(-1, 1))
    light_direction = _unit_vector(uniform(-1, 1), uniform(-1, 1))
    light_strength = uniform(0.0, 0.35)
    hair = _hair_colour(flag, uniform(0.8, 1.15))
    clothes = uniform(0.08, 0.9, 3)
    hat = _saturate(uniform(0.0, 1.0, 3))
    rim = uniform(0.02, 0.2).unsqueeze(1) * uniform(0.8, 1.2, 3)
    iris = _mix((0.30, 0.18, 0.08), (0.25, 0.40, 0.55), uniform(0.0, 1.0))
    lipstick = _rgb((0.72, 0.06, 0.16)) * uniform(0.85, 1.1).unsqueeze(1)
    # facial hair and brows follow the hair colour but stay clearly darker than the skin
    facial_hair = torch.where(has_hair.unsqueeze(1), hair * 0.6, _rgb((0.2, 0.15, 0.1)))
    facial_hair = torch.minimum(facial_hair, skin * 0.5)
    brows = torch.where(has_hair.unsqueeze(1), hair * 0.7, _rgb((0.3, 0.22, 0.15)))
    brows = torch.minimum(brows, skin * 0.6)
    lips = torch.where(
        flag["Wearing_Lipstick"].unsqueeze(1),
        lipstick,
        skin * _rgb((0.75, 0.45, 0.45)) + _rgb((0.12, 0.0, 0.02)),
    )

    xs = torch.arange(width, dtype=torch.float32).view(1, 1, width) + 0.5
    ys = torch.arange(height, dtype=torch.float32).view(1, height, 1) + 0.5
    u = (xs - face_x) / radius  # n x 1 x W, face units, 0 at the face centre
    v = (ys - face_y) / radius  # n x H x 1, positive downwards
    shade = 1 + light_strength * (light_direction[0] * u + light_direction[1] * v) / 1.4
    ramp = (
        gradient_direction[0] * (xs / width - 0.5)
        + gradient_direction[1] * (ys / height - 0.5)
        + 0.5
    )
    canvas = background[0] + (background[1] - background[0]) * ramp.unsqueeze(1)
    paint = _Painter(canvas, u, v, radius, shade.clamp(0.55, 1.45).unsqueeze(1)).paint

    # shoulders, long hair behind the head (women), neck, ears (men; hair covers women's)
    paint(
        clothes, lambda u, v: _ellipse(u, v, 0.0, 2.75, 1.9, 1.25), (-1.9, 1.9, 1.5, 4.0), lit=True
    )
    paint(
        hair,
        lambda u, v: torch.maximum(
            _ellipse(u, v, 0.0, -0.1, 1.3, 1.45), _box(u, v, -1.3, 1.3, -0.1, 1.75)
        ),
        (-1.3, 1.3, -1.55, 1.75),
        gate=has_hair & ~male,
        lit=True,
    )
    paint(
        skin * 0.85,
        lambda u, v: _box(u, v, -0.45, 0.45, 0.7, 2.0),
        (-0.45, 0.45, 0.7, 2.0),
        lit=True,
    )
    paint(
        skin * 0.93,
        lambda u, v: _ellipse(u.abs(), v, 1.0, -0.05, 0.16, 0.26),
        (-1.16, 1.16, -0.31, 0.21),
        gate=male,
        lit=True,
    )

    # face: oval, with a square jaw (superellipse of power 4) for men
    def face(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        upper = 1 - (_sq(u) + _sq(v / 1.3)).sqrt()
        lower_square = 1 - (_sq(_sq(u)) + _sq(_sq(v / 1.3))).sqrt().sqrt()
        lower_oval = 1 - (_sq(u) + _sq(v / 1.25)).sqrt()
        return torch.where(v < 0, upper, torch.where(male, lower_square, lower_oval))

    paint(skin, face, (-1.0, 1.0, -1.3, 1.3), lit=True)
    paint(
        _rgb((0.92, 0.3, 0.38)),
        lambda u, v: _ellipse(u.abs(), v, 0.52, 0.3, 0.22, 0.15),
        (-0.74, 0.74, 0.15, 0.45),
        gate=flag["Rosy_Cheeks"],
        alpha=0.75,
    )
    paint(
        _rgb((1.0, 1.0, 1.0)),
        lambda u, v: _ellipse(u, v, -0.25, -0.95, 0.3, 0.14),
        (-0.55, 0.05, -1.09, -0.81),
        gate=flag["Bald"],
        alpha=0.35,
    )

    # age: forehead lines, nasolabial folds, bags under the eyes
    def wrinkles(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        forehead = torch.maximum(_band(v, -0.53, 0.05), _band(v, -0.69, 0.05))
        forehead = torch.minimum(forehead, 0.42 - u.abs())
        fold = torch.minimum(
            _band(u.abs(), 0.22 + (v - 0.28) * 0.6, 0.045), torch.minimum(v - 0.28, 0.62 - v)
        )
        eye_offset = u.abs() - 0.4
        bags = torch.minimum(_band(v, 0.03 + 0.8 * _sq(eye_offset), 0.03), 0.17 - eye_offset.abs())
        return torch.maximum(torch.maximum(forehead, fold), bags)

    paint(skin * 0.5, wrinkles, (-0.57, 0.57, -0.74, 0.67), gate=~young, lit=True)

    # nose (shaded tip, nostrils), eyes (white, iris), eyebrows arched over them
    paint(
        skin * 0.88,
        lambda u, v: _ellipse(u, v, 0.0, 0.24, 0.13, 0.1),
        (-0.13, 0.13, 0.14, 0.34),
        alpha=0.6,
        lit=True,
    )
    paint(
        skin * 0.45,
        lambda u, v: _ellipse(u.abs(), v, 0.08, 0.32, 0.045, 0.03),
        (-0.125, 0.125, 0.29, 0.35),
    )
    paint(
        _rgb((0.96, 0.96, 0.94)),
        lambda u, v: _ellipse(u.abs(), v, 0.4, -0.12, 0.19, 0.095),
        (-0.59, 0.59, -0.215, -0.025),
    )
    paint(
        iris,
        lambda u, v: _ellipse(u.abs(), v, 0.4, -0.12, 0.075, 0.075),
        (-0.475, 0.475, -0.195, -0.045),
    )

    def eyebrows(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        offset = u.abs() - 0.4
        arch = -0.38 - 0.06 * (1 - _sq(offset / 0.22))
        return torch.minimum(_band(v, arch, torch.where(male, 0.055, 0.04)), 0.22 - offset.abs())

    paint(brows, eyebrows, (-0.62, 0.62, -0.5, -0.32))

    # beard over jaw and chin, moustache under the nose
    paint(
        facial_hair,
        lambda u, v: torch.minimum(face(u, v) + 0.04, v - (0.42 - 0.45 * _sq(u))),
        (-1.04, 1.04, -0.05, 1.34),
        gate=~flag["No_Beard"],
        alpha=0.92,
        lit=True,
    )
    paint(
        facial_hair,
        lambda u, v: torch.minimum(_band(v, 0.47 + 0.25 * _sq(u), 0.075), 0.38 - u.abs()),
        (-0.38, 0.38, 0.39, 0.59),
        gate=flag["Mustache"],
        lit=True,
    )

    # mouth: lips around a centre line that curves up at the corners when smiling; a dark
    # opening (with teeth when smiling) when slightly open, else a thin parting line
    half_width = torch.where(smiling, 0.42, 0.3)
    opening_width = torch.where(smiling, half_width * 0.85, 0.2)
    opening_height = torch.where(mouth_open, torch.where(smiling, 0.22, 0.18), 0.0)

    def mouth_line(u: torch.Tensor) -> torch.Tensor:
        return 0.66 + torch.where(smiling, 1.2 * (0.35 * _sq(half_width) - _sq(u)), 0.0)

    def opening(u: torch.Tensor) -> torch.Tensor:
        return opening_height * (1 - _sq(u / opening_width)).clamp(min=0)

    def lip_shape(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        thickness = 0.09 * (1 - _sq(u / half_width)).clamp(min=0).sqrt() + 0.02
        centre = mouth_line(u)
        inside = torch.minimum(v - (centre - thickness), centre + opening(u) + thickness - v)
        return torch.minimum(inside, half_width - u.abs())

    def cavity(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        centre = mouth_line(u)
        inside = torch.minimum(v - centre, centre + opening(u) - v)
        return torch.minimum(inside, opening_width - u.abs())

    mouth_box = (-0.42, 0.42, 0.4, 1.08)
    paint(lips, lip_shape, mouth_box, lit=True)
    paint(
        skin * 0.35,
        lambda u, v: torch.minimum(_band(v, mouth_line(u), 0.016), half_width * 0.9 - u.abs()),
        mouth_box,
    )
    paint(_rgb((0.12, 0.02, 0.03)), cavity, mouth_box, gate=mouth_open)
    paint(
        _rgb((0.95, 0.94, 0.88)),
        lambda u, v: torch.minimum(cavity(u, v), mouth_line(u) + 0.055 - v),
        mouth_box,
        gate=mouth_open & smiling,
    )

    # hair on top: a cap above the hairline (low and straight for bangs), fuller for women
    def hair_cap(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cap = _ellipse(
            u,
            v,
            0.0,
            torch.where(male, -0.08, -0.1),
            torch.where(male, 1.1, 1.18),
            torch.where(male, 1.42, 1.5),
        )
        hairline = -0.72 + torch.where(male, 0.45, 0.75) * _sq(u)
        hairline = torch.where(
            flag["Bangs"], torch.maximum(hairline, -0.46 + 0.1 * _sq(u)), hairline
        )
        return torch.minimum(cap, hairline - v)

    strands = (1 + 0.07 * _triangle_wave(9 * u + 2 * v)).unsqueeze(1)
    paint(hair * strands, hair_cap, (-1.18, 1.18, -1.6, 0.4), gate=has_hair, lit=True)

    # eyeglasses: rounded-rectangle rims, a bridge and the temples
    def glasses(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        mirror_u = u.abs()
        rim_shape = _sq(_sq((mirror_u - 0.4) / 0.29)) + _sq(_sq((v + 0.12) / 0.21))
        rims = 0.045 - (1 - rim_shape.sqrt().sqrt()).abs() * 0.21
        bridge = torch.minimum(0.12 - mirror_u, _band(v, -0.15, 0.03))
        temples = torch.minimum(0.155 - (mirror_u - 0.845).abs(), _band(v, -0.14, 0.028))
        return torch.maximum(torch.maximum(rims, bridge), temples)

    paint(rim, glasses, (-1.0, 1.0, -0.38, 0.14), gate=flag["Eyeglasses"])

    # hat: a crown over the top of the head and a darker brim across the forehead
    paint(
        hat,
        lambda u, v: torch.minimum(_ellipse(u, v, 0.0, -0.95, 1.12, 0.78), -0.66 - v),
        (-1.12, 1.12, -1.73, -0.66),
        gate=flag["Wearing_Hat"],
        lit=True,
    )
    paint(
        hat * 0.65,
        lambda u, v: torch.minimum(1.42 - u.abs(), _band(v, -0.72, 0.08)),
        (-1.42, 1.42, -0.8, -0.64),
        gate=flag["Wearing_Hat"],
    )

    return canvas.mul_(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


class _Painter:
    """Composites shapes onto the canvas, each only inside its bounding window.

    Most features cover a few percent of the image; evaluating them there only is what makes
    the generator draw thousands of faces per second.
    """

    def __init__(
        self,
        canvas: torch.Tensor,
        u: torch.Tensor,
        v: torch.Tensor,
        radius: torch.Tensor,
        shade: torch.Tensor,
    ) -> None:
        self.canvas, self.u, self.v, self.radius, self.shade = canvas, u, v, radius, shade
        # pixel position of face unit 0 and pixels per unit, for window bounds
        self.origin_x, self.origin_y = -u[:, 0, 0] * radius[:, 0, 0], -v[:, 0, 0] * radius[:, 0, 0]

    def paint(
        self,
        colour: torch.Tensor,
        shape: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        box: tuple[float, float, float, float],
        *,
        gate: torch.Tensor | None = None,
        alpha: float = 1.0,
        lit: bool = False,
    ) -> None:
        """Blend ``colour`` where ``shape(u, v)`` (signed distance, + inside) covers pixels.

        ``colour`` is n x 3 x 1 x 1, or per pixel n x 3 x H x W; ``box`` (u0, u1, v0, v1)
        bounds the shape in face units; ``gate`` (n x 1 x 1 bool) switches it per face;
        ``lit`` applies the face's lighting.
        """
        columns = self._window(self.origin_x, box[0], box[1], self.u.shape[2])
        rows = self._window(self.origin_y, box[2], box[3], self.v.shape[1])
        if columns.start >= columns.stop or rows.start >= rows.stop:
            return
        radius = self.radius
        coverage = (shape(self.u[:, :, columns], self.v[:, rows, :]) * radius + 0.5).clamp(0, 1)
        if gate is not None:
            coverage = coverage * gate
        if alpha != 1.0:
            coverage = coverage * alpha
        if colour.shape[-2:] != (1, 1):
            colour = colour[:, :, rows, columns]
        if lit:
            colour = colour * self.shade[:, :, rows, columns]
        region = self.canvas[:, :, rows, columns]
        region.add_((colour - region).mul_(coverage.unsqueeze(1)))

    def _window(self, origin: torch.Tensor, low: float, high: float, limit: int) -> slice:
        """Pixel range covering [low, high] face units on every face, plus one pixel of edge."""
        pixels = self.radius[:, 0, 0]
        start = int((origin + low * pixels).min().floor()) - 1
        stop = int((origin + high * pixels).max().ceil()) + 2
        return slice(max(start, 0), min(stop, limit))


def write_synthetic(
    out: Path,
    n: int,
    size: int = 64,
    seed: int = 0,
    *,
    independent: bool = False,
    progress: bool = True,
) -> Path:
    """Write ``n`` faces in the official CelebA layout (80/10/10 train/valid/test) to ``out``.

    ``independent`` draws `FACTORS` independently (`sample_factors`) instead of CelebA-like
    correlated attributes: the ground truth the disentanglement metrics need; the marker
    records it and how many undrawable draws were skipped. Does nothing if ``out`` already
    holds exactly this set; builds in a temp dir and renames, so an interrupted run never
    leaves a folder that looks complete.
    """
    out = Path(out)
    if n < 1 or size < 8:
        raise ZooError(f"cannot write {n} synthetic faces of {size}px; need n >= 1, size >= 8")
    marker: dict = {
        "generator": "zoo.data.synth",
        "version": VERSION,
        "seed": seed,
        "n": n,
        "size": size,
        "attributes": list(ATTRIBUTES),
    }
    if independent:  # the default marker stays as it was, so existing folders are reused
        marker["factors"] = dict(zip(FACTORS, FACTOR_SIZES, strict=True))
    if out.exists():
        if _read_marker(out) == marker:
            return out
        kind = "independent " if independent else ""
        raise ZooError(
            f"{out} already exists and is not {kind}synthetic-faces v{VERSION} (n={n}, "
            f"size={size}, seed={seed}); remove it or choose another folder"
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        generator = torch.Generator().manual_seed(seed)
        if independent:
            factors, marker["skipped"] = sample_factors(n, generator)
            attrs = factors_to_attributes(factors)
        else:
            attrs = sample_attributes(n, generator)
        filenames = [f"{i:06d}.jpg" for i in range(1, n + 1)]
        (workdir / celeba.IMAGE_DIR).mkdir()
        with image_progress(f"drawing {n} synthetic faces", n, progress) as advance:
            for start in range(0, n, BATCH):
                images = render_faces(attrs[start : start + BATCH], size, generator)
                with quiet_image_io():
                    encoded = encode_jpeg(list(images), quality=JPEG_QUALITY)
                    for name, data in zip(filenames[start : start + BATCH], encoded, strict=True):
                        write_file(str(workdir / celeba.IMAGE_DIR / name), data)
                advance(len(images))
        partition = np.full(n, 2, dtype=np.uint8)
        n_train, n_valid = round(0.8 * n), round(0.1 * n)
        partition[:n_train] = 0
        partition[n_train : n_train + n_valid] = 1
        celeba.write_labels(
            workdir,
            filenames,
            list(ATTRIBUTES),
            np.where(attrs.numpy(), 1, -1).astype(np.int8),
            partition,
        )
        marker["about"] = (
            "Synthetic cartoon faces written by zoo in the official CelebA "
            "layout; labels are exact. Not real people."
        )
        (workdir / celeba.SYNTHETIC_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            os.replace(workdir, out)
        except OSError:
            if _read_marker(out) is None:
                raise
            logger.debug("another process wrote %s first", out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    logger.info("wrote %d synthetic faces to %s", n, out)
    return out


def _read_marker(folder: Path) -> dict | None:
    """The marker's identity: what was asked for, without the prose and the skipped count."""
    try:
        marker = json.loads((folder / celeba.SYNTHETIC_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict):
        return None
    marker.pop("about", None)
    marker.pop("skipped", None)
    return marker


def ground_truth(folder: str | Path) -> dict | None:
    """The marker of synthetic faces with independent factors (``--independent``) in
    ``folder``, or None when the folder holds other data."""
    marker = _read_marker(Path(folder))
    factors = dict(zip(FACTORS, FACTOR_SIZES, strict=True))
    return marker if marker and marker.get("factors") == factors else None


def model_inputs(faces: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """Rendered uint8 faces -> float model inputs, exactly as written faces reach a model:
    through a JPEG of the folder's quality, decoded, then cropped and resized."""
    with quiet_image_io():
        encoded = encode_jpeg(list(faces), quality=JPEG_QUALITY)
        decoded = torch.stack(decode_jpeg(encoded))
    return preprocess.apply(decoded).float().div_(255)


def _mix(low: tuple[float, ...], high: tuple[float, ...], weight: torch.Tensor) -> torch.Tensor:
    """n x 3 x 1 x 1 colours between ``low`` and ``high`` by per-face ``weight`` (n x 1 x 1)."""
    low_rgb = torch.tensor(low).view(1, 3, 1, 1)
    return low_rgb + (torch.tensor(high).view(1, 3, 1, 1) - low_rgb) * weight.unsqueeze(1)


def _hair_colour(flag: dict[str, torch.Tensor], brightness: torch.Tensor) -> torch.Tensor:
    """n x 3 x 1 x 1 hair colours from the (mutually exclusive) CelebA hair-colour flags."""
    colour = _rgb(_HAIR_RGB["other"])
    for name in ("Gray_Hair", "Blond_Hair", "Brown_Hair", "Black_Hair"):  # last listed wins
        colour = torch.where(flag[name].unsqueeze(1), _rgb(_HAIR_RGB[name]), colour)
    return (colour * brightness.unsqueeze(1)).clamp(0, 1)


def _saturate(colour: torch.Tensor) -> torch.Tensor:
    """Push random colours away from gray so hats read as coloured objects."""
    mean = (colour[:, 0:1] + colour[:, 1:2] + colour[:, 2:3]) / 3  # no reduction kernel
    return ((colour - mean) * 2.2 + mean).clamp(0.04, 0.96)


def _rgb(colour: tuple[float, float, float]) -> torch.Tensor:
    return torch.tensor(colour).view(1, 3, 1, 1)


def _sq(x: torch.Tensor) -> torch.Tensor:
    return x * x


def _unit_vector(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    length = (x * x + y * y).sqrt().clamp(min=1e-3)
    return x / length, y / length


def _ellipse(
    u: torch.Tensor,
    v: torch.Tensor,
    centre_u: float,
    centre_v: float | torch.Tensor,
    half_u: float | torch.Tensor,
    half_v: float | torch.Tensor,
) -> torch.Tensor:
    """Approximate signed distance to an axis-aligned ellipse (exact for circles)."""
    du, dv = (u - centre_u) / half_u, (v - centre_v) / half_v
    smaller = torch.minimum(torch.as_tensor(half_u), torch.as_tensor(half_v))
    return (1 - (du * du + dv * dv).sqrt()) * smaller


def _box(
    u: torch.Tensor, v: torch.Tensor, u0: float, u1: float, v0: float, v1: float
) -> torch.Tensor:
    return torch.minimum(torch.minimum(u - u0, u1 - u), torch.minimum(v - v0, v1 - v))


def _band(
    coordinate: torch.Tensor, centre: float | torch.Tensor, half: float | torch.Tensor
) -> torch.Tensor:
    """Signed distance to a stripe of half-thickness ``half`` around ``centre``."""
    return half - (coordinate - centre).abs()


def _triangle_wave(x: torch.Tensor) -> torch.Tensor:
    """Periodic -1..1 ripple for hair strands, from floor (exact) rather than sin."""
    return ((x - x.floor()) - 0.5).abs() * 4 - 1
