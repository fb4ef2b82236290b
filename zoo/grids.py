"""PNG grids of images: what a person looks at to judge a model (written atomically)."""

from __future__ import annotations

import io
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import save_image

from zoo.files import atomic_write_bytes
from zoo.model import GenerativeModel

CAPTION_SIZE = 11
LINE_HEIGHT = 13
PADDING = 2
MIN_CELL = 128
MAX_LABEL_WIDTH = 190


@torch.inference_mode()
def training_grid(
    model: GenerativeModel, images: torch.Tensor, attrs: torch.Tensor, path: Path, *, seed: int
) -> None:
    """Originals, their reconstructions, then two rows of prior samples.

    Conditional samples reuse the attribute vectors of the shown images, so each
    column of samples should share the labels of the face above it.
    """
    count = images.shape[0]
    y = attrs if model.conditional else None
    generator = torch.Generator(device=images.device).manual_seed(seed)
    samples = [model.generate(count, y, generator=generator) for _ in range(2)]
    rows = torch.cat([images, model.reconstruct(images, y), *samples]).float().clamp(0, 1)
    png = io.BytesIO()
    save_image(rows, png, format="png", nrow=count, padding=2, pad_value=1.0)
    atomic_write_bytes(path, png.getvalue())


@dataclass
class GridRow:
    """One captioned row of a grid: a label a reader understands without the command line."""

    label: str
    images: torch.Tensor  # N x C x H x W in [0, 1]


def save_captioned_grid(
    rows: list[GridRow], path: Path, *, title: str = "", column_labels: list[str] | None = None
) -> Path:
    """Write rows of images with a caption left of each row (and optional column captions)."""
    png = io.BytesIO()
    captioned_grid(rows, title=title, column_labels=column_labels).save(png, format="PNG")
    atomic_write_bytes(Path(path), png.getvalue())
    return Path(path)


def captioned_grid(
    rows: list[GridRow], *, title: str = "", column_labels: list[str] | None = None
) -> Image.Image:
    """The picture of `save_captioned_grid` (also an animation's frame). Images are enlarged
    (nearest neighbour) to at least 128 px so faces and captions are legible; the size
    depends on the rows' labels, not the title, so frames that differ in title line up."""
    font = ImageFont.load_default(size=CAPTION_SIZE)
    size = rows[0].images.shape[-1]
    scale = max(1, -(-MIN_CELL // size))
    cell = size * scale + PADDING
    columns = max(row.images.shape[0] for row in rows)
    label_width = min(
        MAX_LABEL_WIDTH,
        max(int(font.getlength(line)) for row in rows for line in _wrap(row.label)) + 2 * PADDING,
    )
    top = (LINE_HEIGHT + PADDING if title else 0) + (LINE_HEIGHT if column_labels else 0)
    canvas = Image.new(
        "RGB", (label_width + columns * cell + PADDING, top + len(rows) * cell + PADDING), "white"
    )
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((PADDING, PADDING), title, fill="black", font=font)
    for column, text in enumerate(column_labels or []):
        draw.text((label_width + column * cell + PADDING, top - LINE_HEIGHT), text, "black", font)
    for index, row in enumerate(rows):
        y = top + index * cell + PADDING
        for line_number, line in enumerate(_wrap(row.label)[: cell // LINE_HEIGHT]):
            draw.text((PADDING, y + line_number * LINE_HEIGHT), line, fill="black", font=font)
        for column, image in enumerate(row.images.detach().float().clamp(0, 1).cpu()):
            canvas.paste(_to_pil(image, scale), (label_width + column * cell + PADDING, y))
    return canvas


def _wrap(text: str) -> list[str]:
    return [line for part in text.split("\n") for line in textwrap.wrap(part, 30) or [""]]


def _to_pil(image: torch.Tensor, scale: int) -> Image.Image:
    pixels = (image * 255).round().to(torch.uint8)
    if pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    picture = Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy(), "RGB")
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    return picture
