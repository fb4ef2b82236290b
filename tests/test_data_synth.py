"""The synthetic faces: deterministic, in the official layout, attributes visibly drawn."""

from __future__ import annotations

import json

import pytest
import torch
from torchvision.io import decode_jpeg, read_file

from zoo.data import celeba, load_data, synth
from zoo.data.cache import quiet_image_io
from zoo.errors import ZooError

SIZE = 64


def folder_bytes(root):
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_same_seed_gives_byte_identical_folders_and_another_seed_differs(tmp_path):
    first = folder_bytes(synth.write_synthetic(tmp_path / "a", 40, 32, seed=0, progress=False))
    second = folder_bytes(synth.write_synthetic(tmp_path / "b", 40, 32, seed=0, progress=False))
    other = folder_bytes(synth.write_synthetic(tmp_path / "c", 40, 32, seed=1, progress=False))
    assert len(first) == 43  # 40 images, two label files, the marker
    assert first == second
    image_names = [name for name in first if name.endswith(".jpg")]
    assert all(first[name] != other[name] for name in image_names)
    assert first["list_attr_celeba.txt"] != other["list_attr_celeba.txt"]


def test_written_folder_is_the_official_layout_with_celeba_geometry(tmp_path):
    root = synth.write_synthetic(tmp_path / "faces", 50, 32, progress=False)
    attr_lines = (root / "list_attr_celeba.txt").read_bytes().split(b"\r\n")
    assert attr_lines[0] == b"50" and attr_lines[1].split() == [
        name.encode() for name in synth.ATTRIBUTES
    ]
    assert attr_lines[2].startswith(b"000001.jpg ") and b"  1" in b"".join(attr_lines[2:])
    codes = (root / "list_eval_partition.txt").read_text().split()[1::2]
    assert [codes.count(code) for code in "012"] == [40, 5, 5]
    marker = json.loads((root / celeba.SYNTHETIC_MARKER).read_text())
    assert (marker["version"], marker["seed"], marker["n"]) == (synth.VERSION, 0, 50)
    with quiet_image_io():
        image = decode_jpeg(read_file(str(root / "img_align_celeba" / "000007.jpg")))
    assert image.shape == (3, 47, 38)  # 218 x 178 scaled so the crop is 32 px
    assert celeba.crop_box(47, 38, celeba.CELEBA_CROP)[2] == 32

    data = load_data(str(root), "all", 32, progress=False)
    assert data.name == "synthetic-faces" and len(data) == 50
    assert data.attr_names == list(synth.ATTRIBUTES)
    assert data.images.shape == (50, 3, 32, 32)


def test_an_existing_identical_folder_is_reused_and_a_foreign_one_refused(tmp_path, monkeypatch):
    root = synth.write_synthetic(tmp_path / "faces", 20, 32, progress=False)

    def no_drawing(*args):
        raise AssertionError("drew again")

    monkeypatch.setattr(synth, "render_faces", no_drawing)
    assert synth.write_synthetic(root, 20, 32, progress=False) == root
    with pytest.raises(ZooError, match="already exists and is not synthetic-faces"):
        synth.write_synthetic(root, 30, 32, progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def neutral_attributes(n: int) -> torch.Tensor:
    """Young, beardless, hair of no CelebA colour: every attribute can be switched on."""
    attrs = torch.zeros(n, len(synth.ATTRIBUTES), dtype=torch.bool)
    for name in ("No_Beard", "Young"):
        attrs[:, synth.ATTRIBUTES.index(name)] = True
    return attrs


def render_pair(name: str, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Faces with attribute ``name`` toggled, identical nuisance; cropped to the face square."""
    base = neutral_attributes(n)
    toggled = base.clone()
    toggled[:, synth.ATTRIBUTES.index(name)] ^= True
    height, width = synth.image_shape(SIZE)
    top, left, side = celeba.crop_box(height, width, celeba.CELEBA_CROP)
    pair = [
        synth.render_faces(attrs, SIZE, torch.Generator().manual_seed(11))
        for attrs in (base, toggled)
    ]
    return tuple(image[:, :, top : top + side, left : left + side].float() for image in pair)


@pytest.mark.parametrize("name", synth.ATTRIBUTES)
def test_every_attribute_visibly_changes_every_face(name):
    off, on = render_pair(name)
    clearly_changed = ((on - off).abs().amax(dim=1) > 24).sum(dim=(1, 2))  # > ~10% of range
    assert clearly_changed.min() >= 6, f"{name} nearly invisible: {clearly_changed.tolist()}"


@pytest.mark.parametrize(
    ("name", "rows", "columns"),
    [
        ("Smiling", slice(36, 56), slice(18, 46)),  # mouth
        ("Eyeglasses", slice(24, 42), slice(10, 54)),  # eyes
        ("Wearing_Hat", slice(0, 32), slice(2, 62)),  # top of the head
    ],
)
def test_local_attributes_change_their_region_only(name, rows, columns):
    off, on = render_pair(name)
    difference = (on - off).abs()
    inside = difference[:, :, rows, columns]
    outside = difference.clone()
    outside[:, :, rows, columns] = 0
    assert inside.mean() > 1.5, f"{name}: region changes by {inside.mean():.1f} only"
    assert outside.sum() < 0.02 * inside.sum()


def test_rendering_only_inside_bounding_windows_is_exact(monkeypatch):
    attrs = torch.rand(64, len(synth.ATTRIBUTES), generator=torch.Generator().manual_seed(3)) < 0.5
    windowed = synth.render_faces(attrs, 48, torch.Generator().manual_seed(5))
    monkeypatch.setattr(
        synth._Painter, "_window", lambda self, origin, low, high, limit: slice(0, limit)
    )
    assert torch.equal(windowed, synth.render_faces(attrs, 48, torch.Generator().manual_seed(5)))


def test_sampled_attributes_vary_with_plausible_correlations():
    attrs = synth.sample_attributes(20_000, torch.Generator().manual_seed(0))
    column = {name: attrs[:, i] for i, name in enumerate(synth.ATTRIBUTES)}
    rates = attrs.float().mean(dim=0)
    assert rates.min() > 0.02 and rates.max() < 0.98  # every attribute varies
    assert column["Male"][column["Mustache"]].all()
    assert (~column["No_Beard"] & ~column["Male"]).sum() == 0
    assert column["Young"][column["Gray_Hair"]].float().mean() < 0.2
    assert column["Young"][~column["Gray_Hair"]].float().mean() > 0.7
    colours = torch.stack(
        [column[n] for n in ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")], dim=1
    )
    assert colours.sum(dim=1).max() == 1  # mutually exclusive
    assert colours[column["Bald"]].sum() == 0 and column["Bangs"][column["Bald"]].sum() == 0
