"""The benchmark harness: metrics with known answers, the report schema, `zoo bench` end to end."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

import zoo
from benchmarks.classifier import ClassifierSettings, train_classifier
from benchmarks.edits import EditAccuracy
from benchmarks.metric import METRICS, BenchContext, BenchSettings
from benchmarks.recon import Reconstruction
from benchmarks.runner import latest_runs, run_bench
from cli import app
from zoo.checkpoint import CheckpointInfo
from zoo.data import ImageData, Preprocess
from zoo.errors import ZooError
from zoo.model import GenerativeModel, ModelConfig, Posterior
from zoo.train import Trainer, TrainSettings

NAMES = ["Bald", "Eyeglasses", "Male"]  # three of the AttGAN edit attributes
LOW, HIGH = 0.02, 0.98


class PaintLabels(GenerativeModel):
    """A conditional toy whose decode paints label i into colour channel i (LOW or HIGH)."""

    registry_name = "paint-labels"
    conditional = True

    def __init__(self, config: ModelConfig, *, ignore_labels: bool = False) -> None:
        super().__init__(config)
        self.ignore_labels = ignore_labels
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def encode(self, x, y=None):
        return Posterior(torch.zeros(x.shape[0], 2), torch.zeros(x.shape[0], 2))

    def decode_logits(self, z, y=None):
        y = (
            torch.zeros(z.shape[0], 3)
            if self.ignore_labels
            else self.check_attributes(y, z.shape[0])
        )
        colour = LOW + (HIGH - LOW) * y[:, :3]
        return torch.logit(colour)[:, :, None, None].expand(-1, -1, 8, 8)


class Copycat(GenerativeModel):
    """An unconditional toy that reconstructs perfectly: z is the image itself."""

    registry_name = "copycat"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def encode(self, x, y=None):
        return Posterior(x.flatten(1), torch.zeros(x.shape[0], x[0].numel()))

    def decode_logits(self, z, y=None):
        return torch.logit(z.view(-1, 3, 8, 8).clamp(1e-6, 1 - 1e-6).double()).float()


class ColourClassifier:
    """Reads attribute i as 'channel i is bright': always right on PaintLabels images."""

    attr_names = NAMES

    def predict(self, x, batch_size=256):
        return (x.float().mean(dim=(2, 3)) > 0.5).float().cpu()


def painted_data(n: int = 20) -> ImageData:
    attrs = (torch.rand(n, 3, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    images = ((LOW + (HIGH - LOW) * attrs) * 255).round().to(torch.uint8)[:, :, None, None]
    return ImageData(
        images=images.expand(-1, -1, 8, 8).contiguous(),
        attrs=attrs,
        attr_names=list(NAMES),
        filenames=[f"{i}.jpg" for i in range(n)],
        name="celeba",
        root="/toy",
        split="valid",
        fingerprint="toy",
        preprocess=Preprocess(8, 1.0, 3),
    )


def toy_context(model: GenerativeModel, data: ImageData, **settings) -> BenchContext:
    info = CheckpointInfo(
        path=Path("/toy/model.safetensors"),
        model_name=model.model_name,
        config={},
        attr_names=list(NAMES),
        preprocess={"image_size": 8, "crop_fraction": 1.0, "channels": 3},
        data={"fingerprint": "toy"},
    )
    model.checkpoint_info = info
    context = BenchContext(
        model, info.path, info, data, BenchSettings(batch_size=7, **settings), torch.device("cpu")
    )
    ruler = SimpleNamespace(path=Path("/toy/classifier.safetensors"), backbone="colour")
    context.classifier = lambda: (ColourClassifier(), ruler)
    return context


def test_edit_accuracy_of_a_model_whose_edits_always_work():
    model = PaintLabels(ModelConfig(image_size=8, num_attributes=3, latent_dim=2))
    result = EditAccuracy().compute(toy_context(model, painted_data()))
    assert result["attributes"] == NAMES and result["method"] == "label swap"
    for name in NAMES:
        scores = result["per_attribute"][name]
        assert scores["accuracy"] == 1.0 and scores["preservation"] == 1.0
        assert scores["pixel_l1"] == pytest.approx((HIGH - LOW) / 3, abs=1e-5)
    assert result["classifier"]["mean_accuracy"] == 1.0


def test_edit_accuracy_of_a_model_that_ignores_labels():
    model = PaintLabels(
        ModelConfig(image_size=8, num_attributes=3, latent_dim=2), ignore_labels=True
    )
    data = painted_data()
    result = EditAccuracy().compute(toy_context(model, data))
    for i, name in enumerate(NAMES):
        # the image never changes and reads 0, so an edit "succeeds" only where the label was 1
        assert result["per_attribute"][name]["accuracy"] == pytest.approx(
            data.attrs[:, i].mean().item()
        )
        assert result["per_attribute"][name]["preservation"] == 1.0
        assert result["per_attribute"][name]["pixel_l1"] == 0.0


@pytest.mark.parametrize(("intensity", "works"), [(0.4, False), (0.6, True), (1.0, True)])
def test_edit_intensity_scales_the_label_change(intensity, works):
    """PaintLabels paints a label's value; the ruler reads above 0.5 as on. A change scaled
    by 0.4 leaves every label on its side of 0.5, so no edit may count as done."""
    model = PaintLabels(ModelConfig(image_size=8, num_attributes=3, latent_dim=2))
    result = EditAccuracy().compute(toy_context(model, painted_data(), edit_intensity=intensity))
    assert result["intensity"] == intensity
    for name in NAMES:
        assert result["per_attribute"][name]["accuracy"] == (1.0 if works else 0.0)


class BlindToBald(ColourClassifier):
    """A ruler that never sees Bald: its balanced accuracy there is 0.5."""

    def predict(self, x, batch_size=256):
        reading = super().predict(x, batch_size)
        reading[:, 0] = 0
        return reading


def test_edit_accuracy_is_also_reported_over_the_attributes_the_ruler_reads():
    model = PaintLabels(ModelConfig(image_size=8, num_attributes=3, latent_dim=2))
    data = painted_data()
    context = toy_context(model, data)
    ruler = SimpleNamespace(path=Path("/toy/blind.safetensors"), backbone="colour")
    context.classifier = lambda: (BlindToBald(), ruler)
    result = EditAccuracy().compute(context)
    trusted = result["trusted_ruler"]
    assert trusted["attributes"] == ["Eyeglasses", "Male"]
    assert trusted["mean_accuracy"] == 1.0 and trusted["mean_preservation"] == 1.0
    bald_rate = data.attrs[:, 0].mean().item()  # removing Bald reads as success, adding fails
    assert result["mean"]["accuracy"] == pytest.approx((bald_rate + 2) / 3)
    [(name, figure)] = context.figures
    assert name == "edits" and [row.label.split()[0] for row in figure.rows][:2] == [
        "0.jpg",
        "1.jpg",
    ]


def test_reconstruction_of_a_perfect_model():
    model = Copycat(ModelConfig(image_size=8, latent_dim=192))
    data = painted_data()
    data.images = torch.randint(10, 245, data.images.shape, dtype=torch.uint8)
    result = Reconstruction().compute(toy_context(model, data))
    assert result["n"] == 20 and result["mse"] < 1e-8
    assert result["psnr"] > 60 and result["ssim"] > 0.999
    data.images = 255 - data.images  # a model that inverts every pixel scores badly
    worse = Reconstruction().compute(toy_context(model, data))
    assert worse["ssim"] == pytest.approx(result["ssim"])  # same images in, same out


def test_builtin_metrics_are_registered():
    assert set(METRICS.names()) >= {"fid", "recon", "edit", "throughput"}
    with pytest.raises(ZooError, match="unknown metric 'fdi'.*'fid'"):
        METRICS.get("fdi")


# -- on real (tiny) trained models ---------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(synthetic_faces, tmp_path_factory):
    """A tiny CVAE and VAE, and a tiny attribute classifier, trained on the synthetic faces."""
    folder = tmp_path_factory.mktemp("bench") / "runs"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ZOO_CACHE_DIR", str(folder.parent / "cache"))
        for model in ("cvae", "vae"):
            Trainer(
                TrainSettings(
                    model=model,
                    model_config={"base_channels": 4, "max_channels": 8, "latent_dim": 4},
                    data=synthetic_faces,
                    image_size=16,
                    max_steps=3,
                    batch_size=16,
                    out=str(folder),
                    device="cpu",
                ),
                progress=False,
            ).run()
        train_classifier(
            ClassifierSettings(
                data=synthetic_faces,
                image_size=16,
                backbone="test_resnet",
                epochs=1,
                batch_size=16,
                device="cpu",
                out=str(folder),
                progress=False,
            )
        )
    return folder


def test_latest_runs_finds_one_checkpoint_per_model(runs):
    found = latest_runs(runs)
    assert [zoo.read_info(path).model_name for path in found] == ["cvae", "vae"]


def test_report_schema(runs):
    settings = BenchSettings(
        n=8,
        batch_size=4,
        throughput_batch_size=4,
        throughput_repeats=2,
        runs_dir=str(runs),
        fid_features="classifier",
        progress=False,
    )
    report = run_bench(latest_runs(runs), ["recon", "throughput", "fid", "edit"], settings)
    document = json.loads(json.dumps(report.to_dict()))
    assert document["format"] == "zoo-bench/1"
    assert {"split", "n", "seed", "fid_features", "classifier", "device"} <= set(
        document["settings"]
    )
    assert {"zoo", "torch", "python"} <= set(document["versions"])
    [cvae, vae] = document["results"]
    assert cvae["model"] == "cvae" and vae["model"] == "vae" and not cvae["errors"]
    assert {"mse", "psnr", "ssim", "n"} <= set(cvae["metrics"]["recon"])
    rates = cvae["metrics"]["throughput"]["images_per_s"]
    assert set(rates) == {"encode", "decode", "generate", "train_step", "fid_features_classifier"}
    assert min(rates.values()) > 0
    not_measured = cvae["metrics"]["throughput"]["not_measured"]
    assert "weights-inception-2015-12-05-6726825d.pth" in not_measured["fid_features_inception"]
    assert cvae["metrics"]["fid"]["generate_and_features_img_per_s"] > 0
    assert cvae["metrics"]["fid"]["name"] == "FD-attr" and cvae["metrics"]["fid"]["n_real"] == 8
    edit = cvae["metrics"]["edit"]
    assert edit["method"] == "label swap" and len(edit["attributes"]) == 17
    assert 0 <= edit["mean"]["accuracy"] <= 1 and "balanced_accuracy" in edit["classifier"]
    assert vae["metrics"]["edit"]["method"].startswith("concept vector")
    assert (Path(vae["checkpoint"]).parent / "concepts" / "Smiling.safetensors").is_file()


def test_zoo_bench_end_to_end(runs, tmp_path):
    out = tmp_path / "results.json"
    args = [
        "bench",
        "--runs",
        runs,
        "--n",
        8,
        "--batch-size",
        4,
        "--throughput-batch-size",
        4,
        "--out",
        out,
        "--no-progress",
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(app, [str(a) for a in [*args, "--fid-features", "classifier"]])
    assert result.exit_code == 0, result.output
    assert "FD-attr" in result.output and "edit acc" in result.output
    assert out.is_file() and out.with_suffix(".md").read_text().count("| cvae |") == 1
    # one picture of single-attribute edits per conditional model, beside the table
    [cvae, vae] = json.loads(out.read_text())["results"]
    [picture] = cvae["figures"]
    assert Path(picture).is_file() and Path(picture).parent == tmp_path
    assert Path(picture).name in out.with_suffix(".md").read_text() and not vae["figures"]

    # the standard FID needs weights this machine does not have: said, others still reported
    result = CliRunner().invoke(
        app, [str(a) for a in [*args, "--metric", "fid", "--metric", "recon"]]
    )
    assert result.exit_code == 1
    assert (
        "not computed" in result.output
        and "weights-inception-2015-12-05-6726825d.pth" in result.output
    )
    document = json.loads(out.read_text())
    assert (
        "recon" in document["results"][0]["metrics"] and "fid" in document["results"][0]["errors"]
    )


def test_bench_without_runs_or_classifier_says_what_to_do(runs, tmp_path):
    result = CliRunner().invoke(app, ["bench", "--runs", str(tmp_path / "empty"), "--no-progress"])
    assert result.exit_code == 1 and "no trained models under" in result.output
    [cvae, _] = latest_runs(runs)
    result = CliRunner().invoke(
        app,
        [
            "bench",
            str(cvae),
            "--metric",
            "edit",
            "--runs",
            str(tmp_path),
            "--n",
            "4",
            "--out",
            str(tmp_path / "r.json"),
            "--no-progress",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 1 and "zoo train-classifier --data" in result.output
