"""Shared fixtures: an isolated cache per test and tiny CelebA-layout folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.io import encode_jpeg

from zoo.data.cache import quiet_image_io
from zoo.device import StepTimes, store_measurement

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def celeba_sample() -> Path:
    """The real 5,340-image CelebA sample on the development machine; skipped elsewhere."""
    folder = SHARED_DATA / "celeba-sample"
    if not (folder / "list_attr_celeba.txt").is_file():
        pytest.skip(f"real CelebA sample not found at {folder} (it exists only on the dev machine)")
    return folder


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The official MNIST test-set IDX files on the development machine; skipped elsewhere."""
    folder = SHARED_DATA / "mnist"
    if not (folder / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST test set not found at {folder} (it exists only on the dev machine)")
    return folder


@pytest.fixture(autouse=True)
def isolated_environment(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every test gets its own cache dir (beside its tmp_path, which stays as the test left
    it) and no data settings from the developer's shell.

    The cache holds a precision probe result in which bf16 is no faster, so `--precision
    auto` trains in fp32 on every machine without timing the probe in each test (the rule
    itself is tested in tests/test_device.py).
    """
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path_factory.mktemp("zoo-cache")))
    monkeypatch.delenv("ZOO_DATA", raising=False)
    monkeypatch.delenv("ZOO_SYNTHETIC_N", raising=False)
    store_measurement(torch.device("cpu"), StepTimes(fp32=1.0, bf16=1.0))


class TinyCelebA:
    """Writes tiny CelebA-layout folders of solid-colour JPEGs whose labels tests can predict.

    Image i has red channel ``red(i)`` and attribute row ``signs(i)`` (1/-1 for Smiling, Male,
    Young); by default 6 images, partition 4 train / 1 valid / 1 test.
    """

    attributes = ("Smiling", "Male", "Young")
    height, width = 44, 36  # CelebA's 218 x 178 aspect: crop side round(148 / 178 * 36) = 30

    def __init__(self, base: Path) -> None:
        self.base = base

    @staticmethod
    def red(index: int) -> int:
        return 30 + 35 * index

    @staticmethod
    def signs(index: int) -> list[int]:
        return [1 if index % 2 else -1, 1 if index % 3 == 0 else -1, 1 if index < 3 else -1]

    def __call__(
        self,
        name: str = "celeba",
        partition: tuple[int, ...] = (0, 0, 0, 0, 1, 2),
        newline: str = "\n",
    ) -> Path:
        root = self.base / name
        (root / "img_align_celeba").mkdir(parents=True)
        names = [f"{i + 1:06d}.jpg" for i in range(len(partition))]
        for index, filename in enumerate(names):
            image = torch.empty(3, self.height, self.width, dtype=torch.uint8)
            image[0], image[1], image[2] = self.red(index), 90, 160
            with quiet_image_io():
                data = encode_jpeg(image, quality=95)
            (root / "img_align_celeba" / filename).write_bytes(data.numpy().tobytes())
        rows = [name + "".join(f" {v:2d}" for v in self.signs(i)) for i, name in enumerate(names)]
        attr_lines = [str(len(names)), " ".join(self.attributes), *rows]
        (root / "list_attr_celeba.txt").write_bytes((newline.join(attr_lines) + newline).encode())
        part_lines = [f"{n} {code}" for n, code in zip(names, partition, strict=True)]
        (root / "list_eval_partition.txt").write_bytes(
            (newline.join(part_lines) + newline).encode()
        )
        return root


@pytest.fixture
def make_celeba(tmp_path: Path) -> TinyCelebA:
    return TinyCelebA(tmp_path)


@pytest.fixture(scope="session")
def synthetic_faces(tmp_path_factory: pytest.TempPathFactory) -> str:
    """96 built-in synthetic faces at 16 px (76 train / 10 valid / 10 test), shared by tests."""
    from zoo.data.synth import write_synthetic

    folder = tmp_path_factory.mktemp("faces") / "synth"
    return str(write_synthetic(folder, 96, 16, 0, progress=False))
