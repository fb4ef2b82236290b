"""Shared fixtures: an isolated cache per test and tiny CelebA-layout folders."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import torch
from torchvision.io import encode_jpeg

from zoo.data.cache import quiet_image_io

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one torch thread per xdist worker, for this process and the zoo commands it starts:
    # two workers of two threads each on a 2-core machine slow each other many times over
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Long tests first (stable otherwise): started last, one of them would keep a worker
    busy minutes after the others have run out of tests."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


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
    it) and no data settings from the developer's shell."""
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path_factory.mktemp("zoo-cache")))
    monkeypatch.delenv("ZOO_DATA", raising=False)
    monkeypatch.delenv("ZOO_SYNTHETIC_N", raising=False)


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


DETERMINISTIC_MODEL = """
    import torch

    from zoo.models.tcvae import BetaTCVAE
    from zoo.models.vae import VAE


    class DeterministicAE(VAE):
        '''Trains on the posterior mean: no sampling noise, so DDP must equal one process.'''

        def loss(self, x, y=None, *, kl_weight=1.0):
            posterior = self.encode(x, y)
            recon = self.reconstruction_nll(self.decode_logits(posterior.mean, y), x).mean()
            kl = posterior.kl().mean()
            return {"loss": recon + kl_weight * kl, "recon": recon, "kl": kl}


    class DeterministicTCVAE(BetaTCVAE):
        '''beta-TCVAE whose noise is a function of each image alone: DDP must equal one process.'''

        def encode_and_reconstruct(self, x, y=None):
            posterior = self.encode(x, y)
            noise = torch.sin(1000 * x.flatten(1)[:, : self.latent_dim].float())
            z = posterior.mean + posterior.std * noise
            return posterior, z, self.reconstruction_nll(self.decode_logits(z, y), x).mean()
"""


@pytest.fixture(scope="session")
def deterministic_models(tmp_path_factory) -> dict[str, str]:
    """The environment of a subprocess that has noise-free test models (det-ae, det-tcvae)
    registered through a hand-written dist-info entry point: DDP runs of them must equal one
    process."""
    site = tmp_path_factory.mktemp("site")
    (site / "det_ae.py").write_text(textwrap.dedent(DETERMINISTIC_MODEL))
    info = site / "det_ae_plugin-0.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: det-ae-plugin\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text(
        "[zoo.models]\ndet-ae = det_ae:DeterministicAE\ndet-tcvae = det_ae:DeterministicTCVAE\n"
    )
    path = os.pathsep.join(filter(None, [str(site), str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "ZOO_CACHE_DIR": str(site / "cache")}


@pytest.fixture(scope="module")
def tiny_vae(synthetic_faces, tmp_path_factory) -> Path:
    """A one-step VAE at 16 px on the synthetic faces."""
    from zoo.train import Trainer, TrainSettings

    folder = tmp_path_factory.mktemp("tiny-vae")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ZOO_CACHE_DIR", str(folder / "cache"))
        result = Trainer(
            TrainSettings(
                model="vae",
                model_config={"base_channels": 4, "max_channels": 8, "latent_dim": 4},
                data=synthetic_faces,
                image_size=16,
                max_steps=1,
                batch_size=16,
                out=str(folder / "runs"),
                device="cpu",
            ),
            progress=False,
        ).run()
    return result.run_dir / "model.safetensors"
