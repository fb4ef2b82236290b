"""MNIST from IDX files: plain and gzipped, validation, the missing-training-set fallback."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from zoo.data import load_data
from zoo.errors import ZooError


def write_idx(path: Path, array: np.ndarray, *, magic: int | None = None) -> None:
    """An IDX file of unsigned bytes (gzipped when the name ends in .gz)."""
    magic = magic if magic is not None else 0x0800 + array.ndim
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def write_part(root: Path, part: str, count: int, seed: int, suffix: str = "") -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    labels = np.arange(count) % 10
    root.mkdir(exist_ok=True)
    write_idx(root / f"{part}-images-idx3-ubyte{suffix}", images)
    write_idx(root / f"{part}-labels-idx1-ubyte{suffix}", labels)
    return images


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_test_split_reads_images_and_one_hot_labels(tmp_path, suffix):
    images = write_part(tmp_path / "mnist", "t10k", 12, seed=1, suffix=suffix)
    data = load_data(f"mnist:{tmp_path / 'mnist'}", "test", 28, progress=False)
    assert data.name == "mnist" and data.split == "test" and len(data) == 12
    assert data.images.shape == (12, 1, 28, 28)
    assert torch.equal(data.images[:, 0], torch.from_numpy(images))  # 28 px: untouched
    assert data.attr_names == [str(d) for d in range(10)]
    assert data.attrs.sum(dim=1).tolist() == [1.0] * 12
    assert data.attrs.argmax(dim=1).tolist() == [i % 10 for i in range(12)]
    assert data.preprocess.to_dict() == {"image_size": 28, "crop_fraction": 1.0, "channels": 1}


def test_gzip_and_plain_copies_have_the_same_pixels_and_resize(tmp_path):
    write_part(tmp_path / "plain", "t10k", 5, seed=2)
    write_part(tmp_path / "packed", "t10k", 5, seed=2, suffix=".gz")
    plain = load_data(f"mnist:{tmp_path / 'plain'}", "test", 16, progress=False)
    packed = load_data(f"mnist:{tmp_path / 'packed'}", "test", 16, progress=False)
    assert plain.images.shape == (5, 1, 16, 16)
    assert torch.equal(plain.images, packed.images)


def test_missing_training_files_fall_back_to_the_test_set_with_one_warning(tmp_path, caplog):
    write_part(tmp_path, "t10k", 10, seed=3)
    with caplog.at_level(logging.WARNING, logger="zoo"):
        data = load_data(f"mnist:{tmp_path}", "train", 28, progress=False)
    assert len(data) == 10 and data.filenames[0] == "t10k-00000"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "training files" in warnings[0] and "t10k" in warnings[0]


def test_all_is_train_then_test_and_valid_does_not_exist(tmp_path):
    write_part(tmp_path, "train", 7, seed=4)
    write_part(tmp_path, "t10k", 3, seed=5, suffix=".gz")
    everything = load_data(f"mnist:{tmp_path}", "all", 28, progress=False)
    assert len(everything) == 10
    assert everything.filenames[6:8] == ["train-00006", "t10k-00000"]
    assert len(load_data(f"mnist:{tmp_path}", "train", 28, progress=False)) == 7
    with pytest.raises(ZooError, match="MNIST has no valid split"):
        load_data(f"mnist:{tmp_path}", "valid", 28, progress=False)


def test_bad_magic_truncation_and_mismatch_are_clear_errors(tmp_path):
    write_part(tmp_path, "t10k", 4, seed=6)
    images = tmp_path / "t10k-images-idx3-ubyte"
    write_idx(images, np.zeros((4, 28, 28)), magic=2049)
    with pytest.raises(
        ZooError,
        match=r"t10k-images-idx3-ubyte is not an MNIST image file: "
        r"magic number 2049 \(expected 2051\)",
    ):
        load_data(f"mnist:{tmp_path}", "test", 28, progress=False)
    write_idx(images, np.zeros((4, 28, 28)))
    images.write_bytes(images.read_bytes()[:-5])
    with pytest.raises(ZooError, match="truncated or malformed"):
        load_data(f"mnist:{tmp_path}", "test", 28, progress=False)
    write_idx(images, np.zeros((5, 28, 28)))
    with pytest.raises(ZooError, match="has 4 labels but .* has 5 images"):
        load_data(f"mnist:{tmp_path}", "test", 28, progress=False)


def test_a_folder_without_idx_files_is_refused(tmp_path):
    with pytest.raises(ZooError, match=r"is not an MNIST folder: t10k-images-idx3-ubyte\[\.gz\]"):
        load_data(f"mnist:{tmp_path}", "test", 28, progress=False)
    with pytest.raises(ZooError, match="does not exist"):
        load_data(f"mnist:{tmp_path / 'absent'}", "test", 28, progress=False)


def test_real_mnist_test_set(mnist_dir):
    data = load_data(f"mnist:{mnist_dir}", "test", 28, progress=False)
    assert len(data) == 10_000 and data.images.shape[1:] == (1, 28, 28)
    counts = data.attrs.sum(dim=0).int().tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert data.attrs[:5].argmax(dim=1).tolist() == [7, 2, 1, 0, 4]
