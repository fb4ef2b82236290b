"""The CelebA layout reader and the prepared cache: parsing, errors, odd images, reuse."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision.io import encode_jpeg, encode_png

from zoo.data import ImageData, Preprocess, cache, load_data, load_image_file
from zoo.data.cache import quiet_image_io
from zoo.errors import ZooError
from zoo.files import cache_dir


def write_image(path: Path, image: torch.Tensor, kind: str = "jpeg") -> None:
    with quiet_image_io():
        data = encode_jpeg(image, quality=95) if kind == "jpeg" else encode_png(image)
    path.write_bytes(data.numpy().tobytes())


def test_lf_and_crlf_label_files_parse_to_the_same_data(make_celeba):
    lf = load_data(str(make_celeba("lf", newline="\n")), "all", 16, progress=False)
    crlf = load_data(str(make_celeba("crlf", newline="\r\n")), "all", 16, progress=False)
    assert lf.attr_names == crlf.attr_names == ["Smiling", "Male", "Young"]
    assert lf.filenames == crlf.filenames
    assert torch.equal(lf.attrs, crlf.attrs)
    assert lf.fingerprint != crlf.fingerprint  # label bytes differ, so the content differs


def test_rows_keep_their_image_and_labels_become_zero_one(make_celeba):
    data = load_data(str(make_celeba()), "all", 16, progress=False)
    assert data.filenames == [f"{i:06d}.jpg" for i in range(1, 7)]
    assert data.images.shape == (6, 3, 16, 16) and data.images.dtype == torch.uint8
    assert data.attrs.dtype == torch.float32
    for row, filename in enumerate(data.filenames):
        index = int(filename[:6]) - 1
        expected = [1.0 if sign > 0 else 0.0 for sign in make_celeba.signs(index)]
        assert data.attrs[row].tolist() == expected
        assert abs(data.images[row, 0].float().mean().item() - make_celeba.red(index)) < 4


def test_splits_follow_the_partition_file(make_celeba):
    root = str(make_celeba(partition=(1, 0, 2, 0, 1, 0)))
    sizes = {
        split: len(load_data(root, split, 16, progress=False))
        for split in ("train", "valid", "test", "all")
    }
    assert sizes == {"train": 3, "valid": 2, "test": 1, "all": 6}
    valid = load_data(root, "valid", 16, progress=False)
    assert valid.filenames == ["000001.jpg", "000005.jpg"] and valid.split == "valid"


def _replace_line(path: Path, number: int, new: str | None) -> None:
    lines = path.read_text().splitlines()
    if new is None:
        del lines[number - 1]
    else:
        lines[number - 1] = new
    path.write_text("\n".join(lines) + "\n")


# docs/reliability.md: a label file is malformed
@pytest.mark.parametrize(
    ("file", "line", "new", "expected"),
    [
        ("list_attr_celeba.txt", 1, "7", "list_attr_celeba.txt line 1: says 7 images"),
        ("list_attr_celeba.txt", 1, "six", "line 1: expected the number of images (a whole"),
        ("list_attr_celeba.txt", 1, "6.0", "official file), got '6.0'; fix the count"),
        ("list_attr_celeba.txt", 5, "000003.jpg  1 -1", "line 5: 000003.jpg has 2 values"),
        ("list_attr_celeba.txt", 4, "000002.jpg  1  2 -1", "line 4: value '2' (Male)"),
        ("list_attr_celeba.txt", 6, "000004.jpg  0  1 -1", "line 6: value '0' (Smiling)"),
        ("list_eval_partition.txt", 2, "000002.jpg 3", "list_eval_partition.txt line 2"),
        ("list_eval_partition.txt", 3, "000999.jpg 0", "line 3: 000999.jpg is not listed"),
        ("list_eval_partition.txt", 6, None, "list_attr_celeba.txt line 8: 000006.jpg has no"),
        ("list_attr_celeba.txt", 2, "Smiling Male Smiling", "attribute Smiling is listed twice"),
        ("list_attr_celeba.txt", 4, "000001.jpg  1  1  1", "line 4: image 000001.jpg is listed"),
        ("list_eval_partition.txt", 2, "000001.jpg 0", "line 2: image 000001.jpg is listed twice"),
        # an attribute name becomes a file name (concepts/NAME.safetensors) and reaches cards
        ("list_attr_celeba.txt", 2, "Smiling ../../x Young", "line 2: attribute name '../../x'"),
        ("list_attr_celeba.txt", 2, "Smiling a/b Young", "attribute name 'a/b' is not a plain"),
        ("list_attr_celeba.txt", 2, "[/] Male Young", "line 2: attribute name '[/]' is not"),
        ("list_attr_celeba.txt", 2, "Smiling .hidden Young", "attribute name '.hidden'"),
    ],
)
def test_malformed_label_files_name_file_and_line(make_celeba, file, line, new, expected):
    root = make_celeba()
    _replace_line(root / file, line, new)
    with pytest.raises(ZooError) as error:
        load_data(str(root), "all", 16, progress=False)
    message = str(error.value)
    assert expected in message
    assert str(root / file) in message and "\n" not in message


def test_a_label_file_without_the_count_line_still_parses(make_celeba):
    root = make_celeba()
    _replace_line(root / "list_attr_celeba.txt", 1, None)  # some copies omit the count line
    data = load_data(str(root), "all", 16, progress=False)
    assert data.attr_names == ["Smiling", "Male", "Young"] and len(data) == 6


# docs/reliability.md: an image is missing, truncated or not an image
def test_missing_and_corrupt_images_are_skipped_with_one_warning(make_celeba, caplog):
    root = make_celeba()
    (root / "img_align_celeba" / "000002.jpg").unlink()
    (root / "img_align_celeba" / "000004.jpg").write_bytes(b"this is not an image")
    with caplog.at_level(logging.WARNING, logger="zoo"):
        data = load_data(str(root), "all", 16, progress=False)
    assert data.filenames == ["000001.jpg", "000003.jpg", "000005.jpg", "000006.jpg"]
    assert data.attrs[1].tolist() == [0.0, 0.0, 1.0]  # 000003.jpg keeps its own labels
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 2 of 6 images" in warnings[0]
    assert "1 missing, 1 undecodable (first: 000002.jpg: no such file)" in warnings[0]


# docs/reliability.md: an image is missing, truncated or not an image
def test_a_jpeg_cut_short_is_skipped_not_filled_in(make_celeba, caplog):
    """A decoder may fill the missing half of a truncated JPEG with grey and carry on."""
    root = make_celeba()
    image = root / "img_align_celeba" / "000003.jpg"
    jpeg = image.read_bytes()
    scan = jpeg.index(b"\xff\xda")  # the headers end, the compressed pixels start
    image.write_bytes(jpeg[: scan + (len(jpeg) - scan) // 2])  # a download cut short
    with caplog.at_level(logging.WARNING, logger="zoo"):
        data = load_data(str(root), "all", 16, progress=False)
    assert "000003.jpg" not in data.filenames and len(data) == 5
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "0 missing, 1 undecodable (first: 000003.jpg: " in warning
    assert "truncated" in warning.lower()


# docs/reliability.md: an image is missing, truncated or not an image
def test_strict_mode_names_the_first_bad_image_whether_cached_or_not(make_celeba):
    root = make_celeba()
    (root / "img_align_celeba" / "000004.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ZooError, match=r"000004\.jpg cannot be decoded"):
        load_data(str(root), "all", 16, strict=True, progress=False)
    assert not list((cache_dir() / "prepared").iterdir())  # nothing half-built kept
    assert len(load_data(str(root), "all", 16, progress=False)) == 5
    with pytest.raises(ZooError, match=r"000004\.jpg is undecodable"):
        load_data(str(root), "all", 16, strict=True, progress=False)


# docs/reliability.md: an image is missing, truncated or not an image
def test_strict_mode_names_a_missing_image_whether_cached_or_not(make_celeba):
    root = make_celeba()
    (root / "img_align_celeba" / "000003.jpg").unlink()
    listed_but_missing = r"000003\.jpg is listed in list_attr_celeba\.txt but missing"
    with pytest.raises(ZooError, match=listed_but_missing):
        load_data(str(root), "all", 16, strict=True, progress=False)
    assert len(load_data(str(root), "all", 16, progress=False)) == 5
    with pytest.raises(ZooError, match=r"000003\.jpg is missing"):
        load_data(str(root), "all", 16, strict=True, progress=False)


def test_attribute_subset_in_the_order_asked(make_celeba):
    data = load_data(str(make_celeba()), "all", 16, attributes=["Young", "Smiling"], progress=False)
    assert data.attr_names == ["Young", "Smiling"]
    assert data.attrs[:, 0].tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert data.attrs[:, 1].tolist() == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]


# docs/reliability.md: a model, metric or attribute name is unknown
def test_unknown_attribute_suggests_the_closest_name(make_celeba):
    with pytest.raises(ZooError) as error:
        load_data(str(make_celeba()), "all", 16, attributes=["Smilling"], progress=False)
    assert "unknown attribute 'Smilling'" in str(error.value)
    assert "did you mean 'Smiling'?" in str(error.value)
    assert "Smiling, Male, Young" in str(error.value)


# docs/reliability.md: a split is empty
def test_empty_split_says_which_splits_have_images(make_celeba):
    root = make_celeba(partition=(0, 0, 0, 1, 1, 1))
    with pytest.raises(
        ZooError,
        match=r"test split of .* is empty; splits with images: "
        r"train \(3\), valid \(3\)",
    ):
        load_data(str(root), "test", 16, progress=False)
    with pytest.raises(ZooError, match="unknown split 'validation'"):
        load_data(str(root), "validation", 16, progress=False)


# docs/reliability.md: an image is grayscale, RGBA, a PNG named `.jpg`
def test_gray_rgba_png_and_odd_sized_images_become_rgb_faces(make_celeba):
    root = make_celeba()
    images = root / "img_align_celeba"
    write_image(images / "000001.jpg", torch.full((1, 44, 36), 200, dtype=torch.uint8))
    rgba = torch.zeros(44, 36, 4, dtype=torch.uint8)
    rgba[..., 0], rgba[..., 3] = 250, 40
    Image.fromarray(rgba.numpy(), "RGBA").save(images / "000002.jpg", format="PNG")
    write_image(images / "000003.jpg", torch.full((3, 300, 120), 77, dtype=torch.uint8))
    data = load_data(str(root), "all", 16, strict=True, progress=False)
    assert data.images.shape == (6, 3, 16, 16)
    gray, red, odd = (data.images[i].float() for i in range(3))
    assert (gray - 200).abs().max() <= 2  # gray repeated into all three channels
    assert red[0].min() == 250 and red[1:].max() == 0  # alpha dropped, colour kept
    assert (odd - 77).abs().max() <= 2


def test_crop_is_the_centre_148_square_of_a_celeba_frame(make_celeba):
    frame = torch.zeros(3, 218, 178, dtype=torch.uint8)
    frame[:, 35:183, 15:163] = 255  # exactly the centre 148 x 148 square
    face = Preprocess(148, 148 / 178, 3).apply(frame)
    assert face.shape == (3, 148, 148) and face.min() == 255
    assert Preprocess(148, 150 / 178, 3).apply(frame).min() == 0  # a wider crop sees black
    root = make_celeba()
    write_image(root / "img_align_celeba" / "000001.jpg", frame, kind="png")  # lossless
    data = load_data(str(root), "all", 64, progress=False)
    assert data.images[0].min() == 255


def test_second_load_reuses_the_cache_without_decoding(make_celeba, monkeypatch):
    root = str(make_celeba())
    first = load_data(root, "all", 16, progress=False)

    def no_decoding(paths):
        raise AssertionError("decoded again")

    monkeypatch.setattr(cache, "_decode_batch", no_decoding)
    second = load_data(root, "train", 16, progress=False)
    assert torch.equal(second.images, first.images[:4])
    assert second.fingerprint == first.fingerprint


# docs/reliability.md: the source folder changes after `zoo data prepare`
def test_a_changed_source_is_prepared_again(make_celeba, monkeypatch):
    root = make_celeba()
    first = load_data(str(root), "all", 16, progress=False)
    _replace_line(root / "list_attr_celeba.txt", 3, "000001.jpg  1  1  1")
    decoded = []
    original = cache._decode_batch
    monkeypatch.setattr(
        cache, "_decode_batch", lambda paths: decoded.extend(paths) or original(paths)
    )
    second = load_data(str(root), "all", 16, progress=False)
    assert len(decoded) == 6
    assert second.fingerprint != first.fingerprint
    assert second.attrs[0].tolist() == [1.0, 1.0, 1.0]
    assert len(list((cache_dir() / "prepared").iterdir())) == 2


# docs/reliability.md: the source folder changes after `zoo data prepare`
def test_an_image_changed_at_the_same_size_is_prepared_again(make_celeba):
    root = make_celeba()
    first = load_data(str(root), "all", 16, progress=False)
    image = root / "img_align_celeba" / "000001.jpg"
    before = image.stat()
    colour = torch.tensor([230, 90, 160], dtype=torch.uint8)[:, None, None]
    write_image(image, colour.expand(3, make_celeba.height, make_celeba.width).contiguous())
    after = image.stat()
    assert after.st_size == before.st_size and after.st_mtime_ns != before.st_mtime_ns
    second = load_data(str(root), "all", 16, progress=False)
    assert second.fingerprint != first.fingerprint
    assert abs(second.images[0, 0].float().mean().item() - 230) < 4  # the new pixels, not stale


# docs/reliability.md: the source folder changes after `zoo data prepare`
def test_touching_an_image_prepares_again(make_celeba):
    root = make_celeba()
    first = load_data(str(root), "all", 16, progress=False)
    image = root / "img_align_celeba" / "000002.jpg"
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second = load_data(str(root), "all", 16, progress=False)
    assert second.fingerprint != first.fingerprint
    assert len(list((cache_dir() / "prepared").iterdir())) == 2


def test_a_damaged_cache_is_rebuilt(make_celeba):
    root = str(make_celeba())
    expected = load_data(root, "all", 16, progress=False).images.clone()  # unmap before damage
    (prepared,) = (cache_dir() / "prepared").iterdir()
    with (prepared / "images.u8").open("r+b") as images:
        images.truncate(100)
    again = load_data(root, "all", 16, progress=False)
    assert torch.equal(again.images, expected)


# One process preparing the cache (and reporting what it read) for the concurrency test below:
# it waits for the go file so two of them start together, after their slow imports.
CONCURRENT_LOAD = """
import hashlib, logging, sys, time
from pathlib import Path
from zoo.data import load_data
logging.basicConfig(level=logging.INFO, format="%(message)s")
root, ready, go = sys.argv[1:]
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.001)
data = load_data(root, "all", 16, progress=False)
identity = "\\n".join(data.filenames).encode() + data.attrs.numpy().tobytes()
print(hashlib.sha256(data.images.numpy().tobytes() + identity).hexdigest())
"""


def _wait_for(paths: list[Path], processes: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(path.exists() for path in paths):
        assert time.monotonic() < deadline, "the processes never got ready"
        assert all(process.poll() is None for process in processes), "a process ended early"
        time.sleep(0.01)


# docs/reliability.md: two commands prepare the same cache at once
def test_two_processes_preparing_one_cache_at_once_both_read_it(make_celeba, tmp_path):
    root = make_celeba()
    for index, image in enumerate(sorted((root / "img_align_celeba").iterdir())):
        # large images, so that a build takes long enough for both processes to start one
        write_image(image, torch.full((3, 1800, 1500), 40 * index, dtype=torch.uint8))
    go, ready = tmp_path / "go", [tmp_path / f"ready-{i}" for i in range(2)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_LOAD, str(root), str(flag), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for flag in ready
    ]
    try:
        _wait_for(ready, processes, timeout=120)
        go.touch()
        outputs = [process.communicate(timeout=120) for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr
    digests = {stdout.strip() for stdout, _ in outputs}
    here = load_data(str(root), "all", 16, progress=False)
    identity = "\n".join(here.filenames).encode() + here.attrs.numpy().tobytes()
    assert digests == {hashlib.sha256(here.images.numpy().tobytes() + identity).hexdigest()}
    builds = [stderr.count("prepared 6 images") for _, stderr in outputs]
    if cache.fcntl is not None:  # with the lock, one decodes, the other waits and reuses it
        assert sorted(builds) == [0, 1]
    only = cache.prepare(root, here.preprocess, progress=False)
    assert list((cache_dir() / "prepared").iterdir()) == [only]  # no temp dir left


def test_a_build_finishing_second_keeps_the_cache_already_in_use(make_celeba):
    root = make_celeba()
    data = load_data(str(root), "all", 16, progress=False)
    expected = data.images.clone()  # a copy: the mapped file is damaged below
    (target,) = (cache_dir() / "prepared").iterdir()
    in_use = (target / cache.IMAGES_FILE).stat().st_ino
    late = target.with_name(".late-build")  # an identical build that finishes second
    shutil.copytree(target, late)
    index = json.loads((late / cache.INDEX_FILE).read_text())
    assert cache._publish(late, target, index, data.preprocess) == index
    assert (target / cache.IMAGES_FILE).stat().st_ino == in_use  # not deleted under a reader
    shutil.rmtree(late)  # as _build does with its dropped build
    shutil.copytree(target, late)
    (target / cache.IMAGES_FILE).write_bytes(b"damaged")  # an unusable cache is replaced
    assert cache._publish(late, target, index, data.preprocess) == index
    assert (target / cache.IMAGES_FILE).read_bytes() == expected.numpy().tobytes()
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # nothing left aside


def test_the_temp_dir_of_a_killed_build_is_removed_by_the_next_build(make_celeba):
    root = make_celeba()
    load_data(str(root), "all", 16, progress=False)
    (target,) = (cache_dir() / "prepared").iterdir()
    shutil.rmtree(target)
    killed = target.with_name(f".{target.name}.k1ll3d")  # as tempfile.mkdtemp names it
    killed.mkdir()
    (killed / cache.IMAGES_FILE).write_bytes(bytes(1000))
    load_data(str(root), "all", 16, progress=False)
    assert list((cache_dir() / "prepared").iterdir()) == [target]


def test_batch_gives_floats_and_reproducible_flips():
    images = torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8)
    attrs = (torch.arange(8) % 2).float().unsqueeze(1)
    data = ImageData(
        images,
        attrs,
        ["Smiling"],
        [f"{i}.jpg" for i in range(8)],
        "celeba",
        "/x",
        "train",
        "ab" * 32,
        Preprocess(4, 148 / 178, 3),
    )
    index = torch.tensor([5, 0, 3])
    x, y = data.batch(index)
    assert x.dtype == torch.float32 and x.shape == (3, 3, 4, 4)
    assert torch.equal(x, images[index].float() / 255) and torch.equal(y, attrs[index])
    torch.manual_seed(0)
    flipped, _ = data.batch(torch.arange(8), flip=True)
    torch.manual_seed(0)
    assert torch.equal(flipped, data.batch(torch.arange(8), flip=True)[0])
    plain = images.float() / 255
    mirrored = [torch.equal(flipped[i], plain[i].flip(-1)) for i in range(8)]
    unchanged = [torch.equal(flipped[i], plain[i]) for i in range(8)]
    assert all(m or u for m, u in zip(mirrored, unchanged, strict=True))
    assert 0 < sum(mirrored) < 8
    description = data.describe()
    assert json.loads(json.dumps(description))["n"] == 8
    assert description["preprocess"] == {"image_size": 4, "crop_fraction": 148 / 178, "channels": 3}


def test_preprocess_round_trips_and_rejects_nonsense():
    preprocess = Preprocess(64, 148 / 178, 3)
    assert Preprocess.from_dict(json.loads(json.dumps(preprocess.to_dict()))) == preprocess
    with pytest.raises(ZooError, match="malformed"):
        Preprocess.from_dict({"image_size": 64})
    with pytest.raises(ZooError, match="invalid preprocessing"):
        Preprocess(1, 1.0, 3)


@settings(max_examples=40, deadline=None)
@given(
    channels_in=st.sampled_from([1, 3, 4]),
    height=st.integers(1, 90),
    width=st.integers(1, 90),
    channels=st.sampled_from([1, 3]),
    size=st.integers(2, 40),
    fraction=st.floats(0.05, 1.0),
)
def test_apply_always_gives_the_model_shape(channels_in, height, width, channels, size, fraction):
    image = torch.randint(0, 256, (channels_in, height, width), dtype=torch.uint8)
    out = Preprocess(size, fraction, channels).apply(image)
    assert out.shape == (channels, size, size) and out.dtype == torch.uint8


def test_load_image_file_reads_jpeg_and_png_and_rejects_junk(tmp_path):
    frame = torch.zeros(3, 218, 178, dtype=torch.uint8)
    frame[:, 35:183, 15:163] = 255
    write_image(tmp_path / "face.png", frame, kind="png")
    write_image(tmp_path / "face.jpg", frame)
    preprocess = Preprocess(32, 148 / 178, 3)
    png = load_image_file(tmp_path / "face.png", preprocess)
    assert png.shape == (3, 32, 32) and png.dtype == torch.float32 and png.min() == 1.0
    assert load_image_file(tmp_path / "face.jpg", preprocess).mean() > 0.97
    assert load_image_file(tmp_path / "face.png", Preprocess(32, 1.0, 1)).shape == (1, 32, 32)
    (tmp_path / "notes.jpg").write_text("hello")
    with pytest.raises(ZooError, match=r"notes\.jpg is not a readable image .*JPEG or PNG"):
        load_image_file(tmp_path / "notes.jpg", preprocess)
    with pytest.raises(ZooError, match="cannot read image"):
        load_image_file(tmp_path / "absent.png", preprocess)


# docs/reliability.md: a split is empty
@pytest.mark.slow
def test_real_celeba_sample_valid_split(celeba_sample):
    data = load_data(str(celeba_sample), "valid", 64, progress=False)
    assert len(data) == 780 and len(data.attr_names) == 40
    assert data.attr_names[0] == "5_o_Clock_Shadow" and data.attr_names[-1] == "Young"
    assert data.images.shape == (780, 3, 64, 64) and data.images.dtype == torch.uint8
    assert data.name == "celeba" and len(data.fingerprint) == 64
    assert set(data.attrs.unique().tolist()) == {0.0, 1.0}
    assert 0.15 < data.images.float().mean().item() / 255 < 0.85  # real pixels, not zeros
    with pytest.raises(ZooError, match="splits with images: train \\(4560\\), valid \\(780\\)"):
        load_data(str(celeba_sample), "test", 64, progress=False)
