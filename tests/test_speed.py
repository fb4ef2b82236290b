"""The speed benchmark's peer comparison runs the peer's own code, and says what is missing.

No test here asserts a speed: `python -m benchmarks.lab.speed` prints the numbers. A stand-in
peer with PyTorch-VAE's interface (``models/cvae.py`` defining ``ConditionalVAE``) counts
the images it trains on, so a harness that skipped the peer, trained it on part of the epoch,
or imported some other ``models`` package would fail here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from benchmarks.lab import speed

PEER_SRC = Path(__file__).resolve().parents[2] / "shared" / "peers" / "pytorch-vae"

STAND_IN = """
from pathlib import Path

import torch
from torch import nn

SEEN = Path(__file__).with_name("seen.txt")


class ConditionalVAE(nn.Module):
    def __init__(self, in_channels, num_classes, latent_dim, img_size=64, **kwargs):
        super().__init__()
        self.net = nn.Linear(in_channels * img_size * img_size + num_classes, 2 * latent_dim)
        self.out = nn.Linear(latent_dim, in_channels * img_size * img_size)

    def forward(self, x, **kwargs):
        with SEEN.open("a") as seen:
            seen.write(f"{x.shape[0]}\\n")
        h = self.net(torch.cat([x.flatten(1), kwargs["labels"].float()], dim=1))
        mu, log_var = h.chunk(2, dim=1)
        return [self.out(mu).view_as(x), x, mu, log_var]

    def loss_function(self, *args, **kwargs):
        recons, x, mu, log_var = args
        kld = torch.mean(-0.5 * torch.sum(1 + log_var - mu**2 - log_var.exp(), dim=1))
        return {"loss": ((recons - x) ** 2).mean() + kwargs["M_N"] * kld}
"""


def stand_in_peer(folder: Path) -> Path:
    (folder / "models").mkdir(parents=True)
    (folder / "models" / "__init__.py").write_text("")
    (folder / "models" / "cvae.py").write_text(STAND_IN)
    return folder


def test_the_peer_trains_one_whole_epoch_and_zoo_one_after_it(make_celeba, tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "PEER_WORKERS", 0)  # a 4-image epoch: workers only add startup
    data = make_celeba(partition=(0, 0, 0, 0, 0, 1))
    sys.modules["models"] = type(sys)("models")  # some other package called `models`
    try:
        peer_class = speed.peer_model_class("pytorch-vae", stand_in_peer(tmp_path / "peer"))
        cpu = speed.pick_device("cpu")
        result = speed.measure_peer(str(data), cpu, "pytorch-vae", tmp_path / "peer")
        assert sys.modules["models"].__name__ == "models"  # the other package is back
        assert not hasattr(sys.modules["models"], "cvae")
    finally:
        del sys.modules["models"]
    assert peer_class.__module__ == "models.cvae"
    seen = (tmp_path / "peer" / "models" / "seen.txt").read_text().split()
    # the whole train split, once as published and once more with zoo's allocator setting
    again = result["peer_with_zoo_allocator_img_per_s"] is not None
    assert again == speed.keep_freed_memory()
    assert sum(map(int, seen)) == 5 * (1 + again)
    peer = result["peer_img_per_s"]
    assert peer > 0 and result["ours_img_per_s"] > 0
    assert result["speedup_vs_peer"] == pytest.approx(result["ours_img_per_s"] / peer)


def test_without_the_peer_source_it_says_what_to_fetch(make_celeba, tmp_path, capsys):
    data = make_celeba()
    with pytest.raises(SystemExit) as stop:
        speed.main(["--peer", "pytorch-vae", "--data", str(data)])
    assert stop.value.code == 1
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1
    assert "--peer-src" in out and "AntixK/PyTorch-VAE" in out
    with pytest.raises(SystemExit):
        speed.main(["--peer", "pytorch-vae", "--data", str(data), "--peer-src", str(tmp_path)])
    assert f"{tmp_path / 'models' / 'cvae.py'} does not exist" in capsys.readouterr().out


def test_the_gpu_table_measures_each_model_batch_and_precision(synthetic_faces, monkeypatch):
    """The `gpu` part's bookkeeping, run on the CPU with every step timed as one second: a row
    per model, batch size and precision, whose rate is then its batch size (a rate computed
    for another batch size would show here) and whose share of the peak follows the rate."""
    monkeypatch.setattr(speed, "median_seconds", lambda step, device, warmup, repeats: 1.0)
    data = speed.load_data(synthetic_faces, "train", 16, progress=False)
    result = speed.measure_gpu(data, speed.pick_device("cpu"), ["vae"], [4, 8])
    rows = result["rows"]
    assert [(r["batch"], r["precision"], r["variant"]) for r in rows] == [
        (4, "fp32", "eager"), (4, "bf16", "eager"), (8, "fp32", "eager"), (8, "bf16", "eager"),
    ]  # fmt: skip
    assert [r["img_per_s"] for r in rows] == [4, 4, 8, 8]
    assert rows[2]["share_of_bf16_peak"] == pytest.approx(2 * rows[0]["share_of_bf16_peak"])
    assert result["data_on_device"] and result["bf16_matmul_peak_gflops"] > 0


ROOT = Path(__file__).resolve().parents[1]


def test_the_speed_lab_runs_from_a_checkout_and_is_not_installed(tmp_path):
    """pyproject.toml leaves benchmarks.lab out of the wheel: pip installs a copy of the
    project's packaged files into a folder, where the metrics import and the lab does not; the
    checkout still runs it with ``python -m``."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "cli.py"):
        shutil.copy(ROOT / name, source / name)
    for package in ("zoo", "benchmarks"):
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    assert (source / "benchmarks" / "lab" / "speed.py").is_file()  # the copy has the lab
    site = tmp_path / "site"
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
    command += ["--no-build-isolation", "--target", str(site), str(source)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    assert (site / "benchmarks" / "fid.py").is_file() and (site / "cli.py").is_file()
    assert not (site / "benchmarks" / "lab").exists()
    assert not list(site.glob("benchmarks/**/speed*"))

    # only the installed copy and the third-party packages, without the .pth files that would
    # put a checkout (an editable install of zoo) on the path: python -S, no site processing
    paths = [str(site), *{sysconfig.get_paths()[key] for key in ("purelib", "platlib")}]
    probe = (
        "import importlib.util, benchmarks, benchmarks.fid, zoo\n"
        "for module in (benchmarks, benchmarks.fid, zoo):\n"
        f"    assert module.__file__.startswith({str(site)!r}), module.__file__\n"
        "for name in ('benchmarks.lab', 'benchmarks.speed'):\n"
        "    assert importlib.util.find_spec(name) is None, name\n"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", probe],
        env={"PYTHONPATH": os.pathsep.join(paths)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr

    lab = subprocess.run(
        [sys.executable, "-m", "benchmarks.lab.speed", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert lab.returncode == 0 and "--only" in lab.stdout, lab.stderr


def test_the_peer_behind_zoos_interface_encodes_and_decodes_as_its_own_forward_does():
    """PeerAsZooModel's encode and decode are the peer's forward without its noise, so zoo's
    metrics score what the peer computes (a mix-up of y's place, or of the label plane and
    the image, fails here)."""
    if not PEER_SRC.is_dir():
        pytest.skip(f"PyTorch-VAE's model files are not in {PEER_SRC}")
    torch.manual_seed(0)
    model = speed.peer_model_class("pytorch-vae", PEER_SRC)(
        in_channels=3, num_classes=5, latent_dim=8
    ).eval()
    wrapped = speed.PeerAsZooModel(model, 5).eval()
    x, y = torch.rand(3, 3, 64, 64), (torch.rand(3, 5) < 0.5).float()
    with torch.no_grad():
        model.reparameterize = lambda mu, logvar: mu  # the forward, without its noise
        recon, _, mu, log_var = model(x, labels=y)
        posterior = wrapped.encode(x, y)
        assert torch.equal(posterior.mean, mu) and torch.equal(posterior.logvar, log_var)
        assert torch.equal(wrapped.reconstruct(x, y), recon.clamp(0, 1))


def test_time_to_quality_trains_zoo_an_epoch_at_a_time_until_it_matches_the_peer(
    make_celeba, tmp_path, monkeypatch
):
    monkeypatch.setattr(speed, "PEER_WORKERS", 0)
    monkeypatch.setattr(speed, "PEER_EPOCHS", 2)
    data = make_celeba(partition=(0, 0, 0, 0, 1, 1))
    scores = iter([{"mse": 0.02, "fd_attr": 5.0}, {"mse": 0.03, "fd_attr": 4.0},
                   {"mse": 0.01, "fd_attr": 6.0}, {"mse": 0.02, "fd_attr": 5.0}])  # fmt: skip
    scored = []

    def quality_of(checkpoint, classifier, device, model=None):
        scored.append((checkpoint.parent.name, model is not None))
        return next(scores)

    monkeypatch.setattr(speed, "quality_of", quality_of)
    monkeypatch.setattr(speed, "PeerAsZooModel", lambda peer, attributes: peer)
    classifier = tmp_path / "classifier.safetensors"
    classifier.write_bytes(b"")
    peer_src = stand_in_peer(tmp_path / "peer")
    result = speed.measure_time_to_quality(str(data), speed.pick_device("cpu"), "pytorch-vae",
                                           peer_src, classifier, max_epochs=5)  # fmt: skip
    seen = (tmp_path / "peer" / "models" / "seen.txt").read_text().split()
    assert sum(map(int, seen)) == 2 * 4  # two epochs of the 4 training images
    # the peer once (after zoo's first epoch), then zoo after each epoch of one run, until
    # epoch 3 was as good as the peer on both (worse MSE at 1, worse FD-attr at 2)
    assert [model for _, model in scored] == [True, False, False, False]
    assert len({run for run, _ in scored}) == 1
    assert [row["epoch"] for row in result["ours"]] == [1, 2, 3] and result["reached"]
    seconds = [row["train_seconds"] for row in result["ours"]]
    assert seconds == sorted(seconds) and seconds[0] > 0
    assert result["ratio"] == pytest.approx(result["peer_train_seconds"] / seconds[-1])
    with pytest.raises(speed.ZooError, match="train one with `zoo train-classifier"):
        speed.measure_time_to_quality(str(data), speed.pick_device("cpu"), "pytorch-vae",
                                      peer_src, tmp_path / "missing", max_epochs=1)  # fmt: skip
