"""The benchmark harness: metrics with known answers, the report schema, `zoo bench` end to end."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import zoo
from benchmarks.classifier import ClassifierInfo
from benchmarks.classifier_training import (
    ClassifierRun,
    ClassifierSettings,
    finished_classifier,
)
from benchmarks.edits import INTENSITY_FILE, INTENSITY_FORMAT, EditAccuracy
from benchmarks.fid import FrechetDistance
from benchmarks.inception import hub_weights_path
from benchmarks.metric import METRICS, BenchContext, BenchSettings, Memo
from benchmarks.recon import Reconstruction
from benchmarks.report import write_report
from benchmarks.runner import BenchReport, ModelResult, benchmark_split, latest_runs, run_bench
from benchmarks.throughput import Throughput
from cli import app
from zoo.data import ImageData, Preprocess, Source, held_out_split
from zoo.errors import ZooError
from zoo.figures import Figure
from zoo.grids import GridRow
from zoo.latent import file_digest
from zoo.metadata import CheckpointInfo
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


class Grey(GenerativeModel):
    """An unconditional toy that returns mid-grey (sigmoid(0) = 0.5) whatever it is given;
    `delay` seconds of sleep in every decode make it as slow as we like."""

    registry_name = "grey"

    def __init__(self, config: ModelConfig, delay: float = 0.0) -> None:
        super().__init__(config)
        self.delay = delay
        self.level = torch.nn.Parameter(torch.zeros(1))  # stays 0: the grey is exactly 0.5

    def encode(self, x, y=None):
        return Posterior(torch.zeros(x.shape[0], 2), torch.zeros(x.shape[0], 2))

    def decode_logits(self, z, y=None):
        time.sleep(self.delay)
        return (self.level * 0).expand(z.shape[0], 3, 8, 8)


class ColourClassifier:
    """Reads attribute i as 'channel i is bright': always right on PaintLabels images."""

    def __init__(self, attr_names: list[str] = NAMES) -> None:
        self.attr_names = attr_names

    def predict(self, x, batch_size=256):
        return (x.float().mean(dim=(2, 3)) > 0.5).float().cpu()


def painted_data(n: int = 20, names: list[str] = NAMES) -> ImageData:
    attrs = (torch.rand(n, 3, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    images = ((LOW + (HIGH - LOW) * attrs) * 255).round().to(torch.uint8)[:, :, None, None]
    return ImageData(
        images=images.expand(-1, -1, 8, 8).contiguous(),
        attrs=attrs,
        attr_names=list(names),
        filenames=[f"{i}.jpg" for i in range(n)],
        name="celeba",
        root="/toy",
        split="valid",
        fingerprint="toy",
        preprocess=Preprocess(8, 1.0, 3),
    )


def toy_context(
    model: GenerativeModel, data: ImageData, options: dict | None = None, **settings
) -> BenchContext:
    """A context on toy data and one toy ruler; ``options``: metric options by metric name."""
    info = CheckpointInfo(
        path=Path("/toy/model.safetensors"),
        model_name=model.model_name,
        config={},
        attr_names=list(data.attr_names),
        preprocess={"image_size": 8, "crop_fraction": 1.0, "channels": 3},
        data={"fingerprint": "toy"},
    )
    model.checkpoint_info = info
    context = BenchContext(
        model,
        info.path,
        info,
        data,
        BenchSettings(batch_size=7, **settings),
        torch.device("cpu"),
        metric_options=options or {},
    )
    context.rulers = lambda: [(ColourClassifier(data.attr_names), ruler_info("colour", data))]
    return context


def ruler_info(name: str, data: ImageData) -> ClassifierInfo:
    """The file record of a toy ruler: its weights digest is its name."""
    return ClassifierInfo(
        path=Path(f"/toy/{name}.safetensors"),
        backbone=name,
        attr_names=list(data.attr_names),
        image_size=8,
        channels=3,
        weights_sha256=name,
    )


def test_edit_accuracy_of_a_model_whose_edits_always_work():
    model = PaintLabels(ModelConfig(image_size=8, num_attributes=3, latent_dim=2))
    result = EditAccuracy().compute(toy_context(model, painted_data()))
    assert result["attributes"] == NAMES and result["method"] == "label swap"
    for name in NAMES:
        scores = result["per_attribute"][name]
        assert scores["accuracy"] == 1.0 and scores["preservation"] == 1.0
        assert scores["pixel_l1"] == pytest.approx((HIGH - LOW) / 3, abs=1e-5)
    assert result["rulers"][0]["mean_accuracy"] == 1.0


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


def test_preservation_does_not_count_what_the_edit_clears_but_counts_everything_else():
    """Adding Bald clears Bangs (as AttGAN's protocol does): that change is the edit's own."""
    names = ["Bald", "Bangs", "Male"]
    data = painted_data(40, names)
    model = PaintLabels(ModelConfig(image_size=8, num_attributes=3, latent_dim=2))
    result = EditAccuracy().compute(toy_context(model, data))["per_attribute"]
    assert result["Bald"]["accuracy"] == 1.0 and result["Bald"]["preservation"] == 1.0
    assert result["Bangs"]["accuracy"] == 1.0 and result["Bangs"]["preservation"] == 1.0

    class PaintsMaleWithBald(PaintLabels):
        def decode_logits(self, z, y=None):
            y = self.check_attributes(y, z.shape[0]).clone()
            y[:, 2] = torch.maximum(y[:, 0], y[:, 2])
            return super().decode_logits(z, y)

    leaky = PaintsMaleWithBald(ModelConfig(image_size=8, num_attributes=3, latent_dim=2))
    result = EditAccuracy().compute(toy_context(leaky, data))["per_attribute"]
    # Male, read as on beside Bald in every reconstruction, changes wherever the face is a
    # woman's; it is one of the two others kept, or of one where adding Bald clears Bangs
    male_changes = (data.attrs[:, 2] == 0).float()
    kept_others = 2 - ((data.attrs[:, 0] == 0) & (data.attrs[:, 1] == 1)).float()
    expected = 1 - (male_changes / kept_others).mean().item()
    assert result["Bald"]["preservation"] == pytest.approx(expected)
    assert expected < 1


@pytest.mark.parametrize(("intensity", "works"), [(0.4, False), (0.6, True), (1.0, True)])
def test_edit_intensity_scales_the_label_change(intensity, works):
    """PaintLabels paints a label's value; the ruler reads above 0.5 as on. A change scaled
    by 0.4 leaves every label on its side of 0.5, so no edit may count as done."""
    model = PaintLabels(ModelConfig(image_size=8, num_attributes=3, latent_dim=2))
    options = {"edit": EditAccuracy.Options(intensity=intensity)}
    result = EditAccuracy().compute(toy_context(model, painted_data(), options))
    assert result["intensity"]["values"] == dict.fromkeys(NAMES, intensity)
    assert result["intensity"]["source"] == "--edit-intensity"
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
    context.rulers = lambda: [(BlindToBald(), ruler_info("blind", data))]
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


# -- the ruler panel --------------------------------------------------------------------------


class MisreadsWhere(ColourClassifier):
    """Reads like ColourClassifier but inverts attribute ``wrong`` on images where attribute
    ``where`` reads as ``value``: two such rulers can each be half right and never agree."""

    def __init__(self, wrong: int, where: int, value: float) -> None:
        super().__init__()
        self.wrong, self.where, self.value = wrong, where, value

    def predict(self, x, batch_size=256):
        reading = super().predict(x, batch_size)
        mask = reading[:, self.where] == self.value
        reading[mask, self.wrong] = 1 - reading[mask, self.wrong]
        return reading


def test_the_panel_reports_each_ruler_their_mean_and_the_edits_all_of_them_read():
    model = PaintLabels(ModelConfig(image_size=8, num_attributes=3, latent_dim=2))
    data = painted_data(40)
    context = toy_context(model, data)
    exact = ColourClassifier()
    # Eyeglasses (column 1) misread on men by one ruler and on women by the other
    on_men, on_women = MisreadsWhere(1, 2, 1.0), MisreadsWhere(1, 2, 0.0)
    context.rulers = lambda: [
        (exact, ruler_info("exact", data)),
        (on_men, ruler_info("men", data)),
        (on_women, ruler_info("women", data)),
    ]
    result = EditAccuracy().compute(context)
    glasses = result["per_attribute"]["Eyeglasses"]
    men = data.attrs[:, 2].mean().item()
    assert glasses["accuracy_per_ruler"] == pytest.approx([1.0, 1 - men, men])
    assert glasses["accuracy_mean"] == pytest.approx((1 + 1 - men + men) / 3)
    assert glasses["accuracy"] == 0.0  # no Eyeglasses edit is read by all three
    for name in ("Bald", "Male"):  # every ruler reads these edits
        assert result["per_attribute"][name]["accuracy"] == 1.0
        assert result["per_attribute"][name]["accuracy_per_ruler"] == [1.0, 1.0, 1.0]
    assert result["mean"]["accuracy"] == pytest.approx(2 / 3)
    assert result["mean"]["accuracy_mean"] == pytest.approx((3 + (3 - men) + (2 + men)) / 9)
    assert [r["weights_sha256"] for r in result["rulers"]] == ["exact", "men", "women"]
    headline = EditAccuracy().headline(result)
    assert headline["edit acc"] == "0.667" and headline["rulers"] == "3"


class FaintTexture(PaintLabels):
    """Adds Eyeglasses as a checkerboard of +-0.02 on a grey face: a change too faint to see,
    and too fine for a ruler that reads shapes."""

    def decode_logits(self, z, y=None):
        y = self.check_attributes(y, z.shape[0])
        checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2 - 1
        image = 0.5 + 0.02 * checker * (y[:, 1] > 0.5).float()[:, None, None, None]
        return torch.logit(image.expand(-1, 3, 8, 8).clamp(0.01, 0.99))


class DarkBand(PaintLabels):
    """Adds Eyeglasses as a dark band across the eyes: a real change every ruler sees."""

    def decode_logits(self, z, y=None):
        y = self.check_attributes(y, z.shape[0])
        image = torch.full((z.shape[0], 3, 8, 8), 0.5)
        image[:, :, 2:4] -= 0.4 * (y[:, 1] > 0.5).float()[:, None, None, None]
        return torch.logit(image)


class TextureRuler(ColourClassifier):
    """A ruler family sensitive to pixel-scale texture: Eyeglasses is 'any checkerboard'."""

    def predict(self, x, batch_size=256):
        reading = torch.zeros(len(x), 3)
        checker = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean(dim=(1, 2, 3))
        reading[:, 1] = (checker > 0.01).float()
        return reading


class ShapeRuler(ColourClassifier):
    """A ruler family that reads shapes at a coarse scale: Eyeglasses is 'dark eye band'."""

    def __init__(self, pool: int) -> None:
        super().__init__()
        self.pool = pool

    def predict(self, x, batch_size=256):
        reading = torch.zeros(len(x), 3)
        coarse = torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), self.pool)
        reading[:, 1] = (coarse.amin(dim=(1, 2, 3)) < 0.4).float()
        return reading


def test_a_faint_texture_one_ruler_family_reads_is_not_read_by_the_panels_agreement():
    """The failure the panel exists for, small: an edit that is a faint texture counts as done
    for the ruler that is sensitive to it and for no ruler that reads shapes, so the panel's
    agreement is 0 while a single-ruler benchmark would report 1; a real edit scores 1."""
    data = painted_data(20)
    data.attrs[:, 1] = 0  # nobody wears glasses: every Eyeglasses edit adds them
    panel = [TextureRuler(), ShapeRuler(2), ShapeRuler(1)]
    scores = {}
    for kind in (FaintTexture, DarkBand):
        context = toy_context(kind(ModelConfig(image_size=8, num_attributes=3, latent_dim=2)), data)
        context.rulers = lambda: [(r, ruler_info(f"r{i}", data)) for i, r in enumerate(panel)]
        scores[kind] = EditAccuracy().compute(context)["per_attribute"]["Eyeglasses"]
    assert scores[FaintTexture]["accuracy_per_ruler"] == [1.0, 0.0, 0.0]
    assert scores[FaintTexture]["accuracy"] == 0.0
    assert scores[DarkBand]["accuracy_per_ruler"] == [0.0, 1.0, 1.0]  # no texture in a band
    assert scores[DarkBand]["accuracy"] == 0.0
    panel[0] = ShapeRuler(4)  # a panel of shape readers agrees on the band, never the texture
    for kind in (FaintTexture, DarkBand):
        context = toy_context(kind(ModelConfig(image_size=8, num_attributes=3, latent_dim=2)), data)
        context.rulers = lambda: [(r, ruler_info(f"r{i}", data)) for i, r in enumerate(panel)]
        scores[kind] = EditAccuracy().compute(context)["per_attribute"]["Eyeglasses"]
    assert scores[FaintTexture]["accuracy"] == 0.0 and scores[DarkBand]["accuracy"] == 1.0


def tuned_file(context: BenchContext, **changes) -> Path:
    """Write an edit_intensity.json beside the toy checkpoint, as zoo tune-edits would."""
    record = {
        "format": INTENSITY_FORMAT,
        "checkpoint_sha256": file_digest(context.checkpoint),
        "split": "train",
        "rulers": [{"weights_sha256": "tuner"}],
        "intensities": {"Bald": 0.4, "Eyeglasses": 1.0, "Male": 1.0},
        **changes,
    }
    path = context.checkpoint.parent / INTENSITY_FILE
    path.write_text(json.dumps(record))
    return path


def test_tuned_intensities_are_used_and_never_scored_by_the_ruler_that_chose_them(tmp_path):
    model = PaintLabels(ModelConfig(image_size=8, num_attributes=3, latent_dim=2))
    data = painted_data()
    context = toy_context(model, data)
    context.checkpoint = tmp_path / "model.safetensors"
    context.checkpoint.write_bytes(b"weights")
    tuned_file(context)
    result = EditAccuracy().compute(context)  # the panel's ruler is "colour", not the tuner
    assert result["intensity"]["source"] == str(tmp_path / INTENSITY_FILE)
    assert result["intensity"]["tuned_on"] == "train"
    assert result["intensity"]["values"] == {"Bald": 0.4, "Eyeglasses": 1.0, "Male": 1.0}
    assert result["per_attribute"]["Bald"]["accuracy"] == 0.0  # x0.4 never crosses 0.5
    assert result["per_attribute"]["Male"]["accuracy"] == 1.0

    tuned_file(context, rulers=[{"weights_sha256": "colour"}])
    with pytest.raises(ZooError, match=r"colour.safetensors .*chose this model's edit intens"):
        EditAccuracy().compute(context)
    tuned_file(context, split="valid")  # the split the toy data is
    with pytest.raises(ZooError, match="tuned on the valid split, the one being scored"):
        EditAccuracy().compute(context)
    context.metric_options["edit"] = EditAccuracy.Options(intensity=1.0)  # ignores the file
    assert EditAccuracy().compute(context)["per_attribute"]["Bald"]["accuracy"] == 1.0

    del context.metric_options["edit"]
    tuned_file(context, checkpoint_sha256="0" * 16)  # tuned for weights since replaced
    assert EditAccuracy().compute(context)["intensity"]["source"] == "default"


# docs/reliability.md: `edit_intensity.json` beside a checkpoint is damaged
@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        json.dumps({"format": "zoo-edit-intensity/1"}).encode(),
        b"\xff\xfe",
        b" " * (2 * 1024 * 1024),
    ],
)
def test_a_damaged_tuned_intensity_file_is_one_line(tmp_path, content):
    model = PaintLabels(ModelConfig(image_size=8, num_attributes=3, latent_dim=2))
    context = toy_context(model, painted_data())
    context.checkpoint = tmp_path / "model.safetensors"
    context.checkpoint.write_bytes(b"weights")
    (tmp_path / INTENSITY_FILE).write_bytes(content)
    with pytest.raises(ZooError, match=r"edit_intensity.json .*delete it or run zoo tune-edits"):
        EditAccuracy().compute(context)


@pytest.mark.parametrize("bad", [0, -1, 11, float("nan"), "2", True])
def test_tuned_intensities_outside_zero_to_ten_are_refused(tmp_path, bad):
    model = PaintLabels(ModelConfig(image_size=8, num_attributes=3, latent_dim=2))
    context = toy_context(model, painted_data())
    context.checkpoint = tmp_path / "model.safetensors"
    context.checkpoint.write_bytes(b"weights")
    tuned_file(context, intensities={"Bald": bad})
    with pytest.raises(ZooError, match=r"numbers in \(0, 10\]"):
        EditAccuracy().compute(context)


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


def flat_colour_data(n: int = 20) -> ImageData:
    """Images of one random level per channel: their SSIM against any flat image has a closed
    form, because every local variance and covariance is zero."""
    data = painted_data(n)
    levels = torch.randint(0, 256, (n, 3, 1, 1), generator=torch.Generator().manual_seed(1))
    data.images = levels.to(torch.uint8).expand(-1, -1, 8, 8).contiguous()
    return data


def test_reconstruction_of_a_constant_grey_model_scores_what_the_formulas_say():
    """Negative control: a model that ignores its input scores exactly PSNR 10 log10(1 / MSE)
    and SSIM (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1) of each image against grey."""
    data = flat_colour_data()
    result = Reconstruction().compute(toy_context(Grey(ModelConfig(image_size=8)), data))
    levels = data.images[:, :, 0, 0].double() / 255  # N x 3, the flat value of each channel
    mse = (levels - 0.5).pow(2).mean(dim=1)
    c1 = 0.01**2
    ssim = ((2 * levels * 0.5 + c1) / (levels.pow(2) + 0.25 + c1)).mean(dim=1)
    assert result["n"] == 20
    assert result["mse"] == pytest.approx(mse.mean().item(), rel=1e-5)
    assert result["psnr"] == pytest.approx((10 * torch.log10(1 / mse)).mean().item(), rel=1e-5)
    assert result["ssim"] == pytest.approx(ssim.mean().item(), rel=1e-3)
    assert result["ssim"] < 0.9 and math.isfinite(result["psnr"])


def test_throughput_drops_with_a_deliberately_slow_decoder(no_fid_weights):
    """Every decode of the slow model sleeps `delay`: decode, generate and a training step
    (one decode each) cannot beat batch / delay images/s, and encode is untouched."""
    batch, delay = 8, 0.05
    rates = {}
    for slowness in (0.0, delay):
        context = toy_context(
            Grey(ModelConfig(image_size=8), delay=slowness),
            flat_colour_data(),
            {"throughput": Throughput.Options(batch_size=batch, repeats=3)},
        )
        context.rulers = no_classifier
        rates[slowness] = Throughput().compute(context)["images_per_s"]
    slow, fast = rates[delay], rates[0.0]
    for operation in ("decode", "generate", "train_step"):
        assert batch / (2 * delay) < slow[operation] <= batch / delay, operation
        assert fast[operation] > 5 * slow[operation], operation
    assert slow["encode"] > 5 * batch / delay


def no_classifier():
    raise ZooError("no attribute classifier in this test")


# docs/reliability.md: a model, metric or attribute name is unknown
def test_builtin_metrics_are_registered():
    assert set(METRICS.names()) >= {"fid", "recon", "edit", "throughput"}
    with pytest.raises(ZooError, match="unknown metric 'fdi'.*'fid'.*Known metrics: .*recon"):
        METRICS.get("fdi")


# -- on real (tiny) trained models ---------------------------------------------------------------


@pytest.fixture
def no_fid_weights(monkeypatch, tmp_path):
    """This machine as a fresh one: no $ZOO_FID_WEIGHTS and an empty torch hub cache, so FID in
    Inception features must say its weights are missing, whatever the developer has installed."""
    monkeypatch.delenv("ZOO_FID_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-torch-hub"))
    assert not hub_weights_path().exists()


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
        finished_classifier(
            ClassifierRun(
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
            ).run()
        )
    return folder


def test_latest_runs_finds_one_checkpoint_per_model(runs):
    found = latest_runs(runs)
    assert [zoo.read_info(path).model_name for path in found] == ["cvae", "vae"]


def test_report_schema(runs, no_fid_weights):
    settings = BenchSettings(n=8, batch_size=4, runs_dir=str(runs), progress=False)
    options = {
        "throughput": Throughput.Options(batch_size=4, repeats=2),
        "fid": FrechetDistance.Options(features="classifier"),
    }
    names = ["recon", "throughput", "fid", "edit"]
    report = run_bench(latest_runs(runs), names, settings, options)
    document = json.loads(json.dumps(report.to_dict()))
    assert document["format"] == "zoo-bench/2"
    assert {"split", "n", "seed", "classifiers", "device"} <= set(document["settings"])
    # each metric's own options beside its result: those given, the others' defaults
    for result in document["results"]:
        assert result["options"] == {
            "recon": {},
            "throughput": {"batch_size": 4, "repeats": 2, "precision": "auto"},
            "fid": {"features": "classifier", "weights": None},
            "edit": {"strength": 1.0, "intensity": None},
        }
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
    assert 0 <= edit["mean"]["accuracy"] <= 1 and "balanced_accuracy" in edit["rulers"][0]
    # no --split: the synthetic faces have a test split, so every metric measured held-out faces
    assert document["settings"]["split"] is None
    assert {used["split"] for used in cvae["data_used"].values()} == {"test"}
    assert vae["metrics"]["edit"]["method"].startswith("concept vector")
    assert (Path(vae["checkpoint"]).parent / "concepts" / "Smiling.safetensors").is_file()
    # each metric's own wall time, so a slow one is visible
    assert list(cvae["wall_time_s"]) == ["recon", "throughput", "fid", "edit"]
    assert all(seconds >= 0 for seconds in cvae["wall_time_s"].values())
    assert sum(cvae["wall_time_s"].values()) > 0


# docs/reliability.md: the FID Inception weights are not on disk
def test_zoo_bench_end_to_end(runs, tmp_path, no_fid_weights):
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
    assert out.is_file() and out.with_suffix(".md").read_text().count("| `cvae` |") == 1
    # one picture of single-attribute edits per conditional model, beside the table
    [cvae, vae] = json.loads(out.read_text())["results"]
    [picture] = cvae["figures"]
    assert Path(picture).is_file() and Path(picture).parent == tmp_path
    assert Path(picture).name in out.with_suffix(".md").read_text() and not vae["figures"]
    assert "## Wall time per metric" in out.with_suffix(".md").read_text()

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


# docs/reliability.md: the classifier was trained at another image size
def test_a_classifier_of_another_image_size_is_recorded_and_said(runs, synthetic_faces, tmp_path):
    path, _ = finished_classifier(ClassifierRun(
        ClassifierSettings(data=synthetic_faces, image_size=24, backbone="test_resnet",
                           max_steps=2, batch_size=16, out=str(tmp_path), progress=False)
    ).run())  # fmt: skip
    [cvae] = [p for p in latest_runs(runs) if zoo.read_info(p).model_name == "cvae"]
    out = tmp_path / "results.json"
    done = CliRunner().invoke(app, [
        "bench", str(cvae), "--metric", "edit", "--metric", "fid", "--fid-features",
        "classifier", "--classifier", str(path), "--n", "8", "--out", str(out), "--no-progress",
        "--device", "cpu",
    ])  # fmt: skip
    assert done.exit_code == 0, done.output
    flat = " ".join(done.output.split())
    assert flat.count("was trained on 24 px images; this model's 16 px images are resized") == 1
    assert "zoo train-classifier --data" in flat and "--image-size 16" in flat
    [result] = json.loads(out.read_text())["results"]
    assert result["metrics"]["edit"]["rulers"][0]["image_size"] == 24
    assert result["metrics"]["fid"]["classifier_image_size"] == 24


# docs/reliability.md: a metric raises anything (a bug, in zoo or a plugin)
def test_a_metric_that_raises_is_recorded_and_the_others_still_run(runs, monkeypatch):
    def buggy(self, context):
        return {"ratio": 1 / 0}

    monkeypatch.setattr(Reconstruction, "compute", buggy)
    monkeypatch.setattr(Throughput, "compute", lambda self, context: {"not json": object()})
    settings = BenchSettings(n=4, batch_size=4, runs_dir=str(runs), progress=False)
    options = {"fid": FrechetDistance.Options(features="classifier")}
    report = run_bench(latest_runs(runs), ["recon", "throughput", "fid"], settings, options)
    assert report.failed
    for result in report.results:
        assert result.errors["recon"] == "ZeroDivisionError: division by zero"
        assert result.errors["throughput"].startswith("TypeError: Object of type object")
        assert "recon" not in result.metrics and "throughput" not in result.metrics
        assert result.metrics["fid"]["n_real"] == 4  # FD-attr with the runs' classifier
    json.dumps(report.to_dict())


def _moved(checkpoint: Path, out: Path, root: Path) -> Path:
    """A copy of `checkpoint` that says it was trained on data at `root`."""
    model = zoo.load(checkpoint)
    info = model.checkpoint_info
    zoo.save_checkpoint(
        out,
        model,
        attr_names=info.attr_names,
        attr_rates=info.attr_rates,
        preprocess=info.preprocess,
        data={**info.data, "root": str(root)},
        training=info.training,
        source=info.source,
    )
    return out


# docs/reliability.md: a checkpoint's data folder has moved or is gone
def test_bench_says_when_it_measures_other_data_than_the_checkpoints(
    runs, tmp_path, make_celeba, monkeypatch
):
    [_, vae] = latest_runs(runs)
    recorded = zoo.read_info(vae).data
    args = ["bench", "--metric", "recon", "--metric", "throughput", "--n", "4", "--split", "valid"]
    args += ["--throughput-batch-size", "2", "--no-progress", "--device", "cpu"]
    out = tmp_path / "results.json"
    same = CliRunner().invoke(app, [*args, str(vae), "--out", str(out)])
    assert same.exit_code == 0, same.output
    [result] = json.loads(out.read_text())["results"]
    assert result["data_note"] is None and "warning" not in same.output
    used = {"path": recorded["root"], "fingerprint": recorded["fingerprint"], "split": "valid"}
    assert result["data_used"]["recon"] == {**used, "name": recorded["name"], "n": 4}
    assert result["data_used"]["throughput"]["n"] == 2

    # the training data's folder is gone: the default data ($ZOO_DATA here) is used, and said
    elsewhere = make_celeba("elsewhere")
    monkeypatch.setenv("ZOO_DATA", str(elsewhere))
    moved = _moved(vae, tmp_path / "moved" / "model.safetensors", tmp_path / "gone")
    result_moved = CliRunner().invoke(app, [*args, str(moved), "--out", str(out)])
    assert result_moved.exit_code == 0, result_moved.output
    [result] = json.loads(out.read_text())["results"]
    recon_data = result["data_used"]["recon"]
    assert recon_data["path"] == str(elsewhere) and recon_data["split"] == "valid"
    assert recon_data["n"] == 1 and recon_data["fingerprint"] != recorded["fingerprint"]
    assert str(tmp_path / "gone") in result["data_note"] and "folder is gone" in result["data_note"]
    warning = " ".join(result_moved.output.split())  # rich may wrap the line
    assert f"vae ({moved}) was trained on {tmp_path / 'gone'}" in warning
    assert f"measured on celeba at {elsewhere}" in warning
    assert "Not the training data" in out.with_suffix(".md").read_text()


# docs/reliability.md: no attribute classifier matches the data
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
            "--metric",
            "fid",
            "--fid-features",
            "classifier",
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
    [report] = json.loads((tmp_path / "r.json").read_text())["results"]
    command = f"zoo train-classifier --data {zoo.read_info(cvae).data['root']} --image-size 16"
    assert set(report["errors"]) == {"edit", "fid"}  # FD-attr needs the classifier too
    assert all(error.endswith(command) for error in report["errors"].values())


def test_a_figure_whose_name_would_leave_the_report_folder_is_not_written(tmp_path, caplog):
    picture = Figure("t", [GridRow("row", torch.zeros(1, 3, 8, 8))])
    info = CheckpointInfo(path=tmp_path / "run" / "model.safetensors", model_name="cvae", config={})
    result = ModelResult(info.path, info, figures=[("../../escape", picture), ("edits", picture)])
    report = BenchReport(BenchSettings(), "cpu", [], [result])
    write_report(report, tmp_path / "out" / "results.json")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "results-edits-run.png", "results.json", "results.md",
    ]  # fmt: skip
    assert not list(tmp_path.glob("escape*")) and "is not a plain name" in caplog.text


# docs/reliability.md: a ruler that chose a checkpoint's edit intensities ...
def test_tune_edits_then_bench_scores_with_every_ruler_but_the_tuner(
    runs, synthetic_faces, tmp_path
):
    """`zoo tune-edits` chooses intensities with one ruler on valid; `zoo bench` then scores them
    on the held-out test split with another, and refuses the tuner and the tuning split."""
    [cvae, _] = latest_runs(runs)
    checkpoint = tmp_path / "run" / "model.safetensors"  # a copy: the fixture's runs stay clean
    checkpoint.parent.mkdir()
    shutil.copy(cvae, checkpoint)
    [tuner] = runs.glob("classifier-*/classifier.safetensors")
    other, _ = finished_classifier(ClassifierRun(
        ClassifierSettings(
            data=synthetic_faces, image_size=16, backbone="test_resnet", epochs=1, batch_size=16,
            seed=1, balanced=False, device="cpu", out=str(tmp_path / "rulers"), progress=False,
        )
    ).run())  # fmt: skip
    common = ["--n", "8", "--no-progress", "--device", "cpu"]
    tune = ["tune-edits", str(checkpoint), "--classifier", str(tuner), "--intensities", "1,2"]
    for bad, said in (("1,x", "not a comma-separated list"), ("0,2", r"numbers in (0, 10]")):
        refused = CliRunner().invoke(app, [*tune[:-1], bad, *common])
        assert refused.exit_code == 1 and said in refused.output, refused.output
    assert not (checkpoint.parent / INTENSITY_FILE).exists()
    tuned = CliRunner().invoke(app, [*tune, *common])
    assert tuned.exit_code == 0, tuned.output
    record = json.loads((checkpoint.parent / INTENSITY_FILE).read_text())
    assert record["split"] == "valid" and record["grid"] == [1.0, 2.0]
    assert set(record["intensities"].values()) <= {1.0, 2.0} and len(record["intensities"]) == 17

    def bench(*args: str):
        out = tmp_path / "results.json"
        done = CliRunner().invoke(
            app, ["bench", str(checkpoint), "--metric", "edit", "--out", str(out), *args, *common]
        )
        return done, json.loads(out.read_text())["results"][0]

    done, result = bench("--classifier", str(tuner))
    assert done.exit_code == 1 and "chose this model's edit intensities" in result["errors"]["edit"]
    done, result = bench("--classifier", str(other), "--split", "valid")
    assert done.exit_code == 1 and "tuned on the valid split" in result["errors"]["edit"]
    done, result = bench("--classifier", str(other))
    assert done.exit_code == 0, done.output
    edit = result["metrics"]["edit"]
    assert result["data_used"]["edit"]["split"] == "test"
    assert edit["intensity"]["values"] == record["intensities"]
    assert edit["intensity"]["tuned_on"] == "valid"
    assert [ruler["path"] for ruler in edit["rulers"]] == [str(other)]
    assert edit["rulers"][0]["balanced"] is False and edit["rulers"][0]["seed"] == 1


# docs/reliability.md: the data has no test split (the CelebA sample)
def test_the_benchmark_measures_the_test_split_and_falls_back_to_valid_with_a_warning(
    make_celeba, caplog
):
    with_test = make_celeba("with-test")
    without = make_celeba("without-test", partition=(0, 0, 0, 0, 1, 1))
    assert held_out_split(Source("celeba", with_test), 16, progress=False) == "test"
    assert held_out_split(Source("celeba", without), 16, progress=False) == "valid"
    settings = BenchSettings(progress=False)
    for root, split in ((with_test, "test"), (without, "valid")):
        info = CheckpointInfo(
            path=root / "model.safetensors",
            model_name="cvae",
            config={},
            preprocess={"image_size": 16, "crop_fraction": 0.8315, "channels": 3},
            data={"root": str(root)},
        )
        assert benchmark_split(Memo(), info, settings).split == split
    assert caplog.text.count("has no test split: measuring on its valid split") == 1
    assert str(without) in caplog.text


# -- metric options on the command line -----------------------------------------------------------


@pytest.fixture
def bench_call(monkeypatch):
    """`zoo bench` up to the run: what run_bench would be given, recorded (nothing runs)."""
    import benchmarks.runner

    calls = []

    def recording_run_bench(checkpoints, metrics, settings, options):
        calls.append((settings, options))
        raise ZooError("recorded")

    monkeypatch.setattr(benchmarks.runner, "run_bench", recording_run_bench)

    def call(*args: str) -> tuple[BenchSettings, dict]:
        done = CliRunner().invoke(app, ["bench", "m.safetensors", "--metric", "recon", *args])
        assert done.exit_code == 1 and "recorded" in done.output, done.output
        return calls.pop()

    return call


@pytest.mark.parametrize(
    ("alias", "value", "metric", "name", "parsed"),
    [
        ("--fid-features", "classifier", "fid", "features", "classifier"),
        ("--fid-weights", "/w.pth", "fid", "weights", "/w.pth"),
        ("--edit-strength", "2", "edit", "strength", 2.0),
        ("--edit-intensity", "0.4", "edit", "intensity", 0.4),
        ("--throughput-batch-size", "8", "throughput", "batch_size", 8),
        ("--precision", "fp32", "throughput", "precision", "fp32"),
    ],
)
def test_the_old_metric_flags_are_aliases_of_their_options(
    bench_call, alias, value, metric, name, parsed
):
    _, options = bench_call(alias, value)
    assert list(options) == [metric]
    expected = METRICS.get(metric).Options(**{name: parsed})
    assert options[metric] == expected and type(getattr(options[metric], name)) is type(parsed)
    assert bench_call("--option", f"{metric}.{name}={value}")[1] == options  # the same


def test_bench_settings_left_unset_are_the_dataclass_defaults(bench_call):
    """None means "not given": only the options typed replace BenchSettings' defaults."""
    settings, options = bench_call()
    assert settings == BenchSettings() and options == {}
    settings, _ = bench_call("--seed", "3", "--batch-size", "5", "--no-progress", "--runs", "r")
    assert settings == BenchSettings(seed=3, batch_size=5, progress=False, runs_dir="r")


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--option", "fid.weights"], "--option 'fid.weights' is not METRIC.NAME=VALUE"),
        (["--option", "fdi.features=x"], "--option fdi.features: unknown metric 'fdi'. Did you"),
        (["--option", "recon.n=1"], "metric recon has no option 'n'; it has none"),
        (["--option", "fid.features=pixels"], "must be one of inception, classifier, got 'pix"),
        (["--option", "throughput.batch-size=0"], "batch-size must be an integer in [1, 65536]"),
        (["--option", "edit.strength=inf"], "--option edit.strength must be a finite number"),
        (["--edit-strength", "x"], "--edit-strength must be a finite number, got 'x'"),
        (["--precision", "fp16"], "--precision must be one of auto, fp32, bf16, got 'fp16'"),
        (
            ["--fid-features", "classifier", "--option", "fid.features=inception"],
            "fid.features is given twice (--option fid.features and --fid-features)",
        ),
    ],
)
def test_a_bad_metric_option_is_one_line_before_anything_runs(bench_call, args, said):
    done = CliRunner().invoke(app, ["bench", "m.safetensors", *args])
    assert done.exit_code == 1 and "recorded" not in done.output
    assert said in " ".join(done.output.split()), done.output
    assert "Traceback" not in done.output


class NotADataclass:
    factor: float = 1.0


@dataclasses.dataclass
class AListOption:
    factor: list | None = None


@dataclasses.dataclass
class NoDefault:
    factor: float


@dataclasses.dataclass
class WrongDefault:
    n: int = "x"  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("options", "said"),
    [
        (NotADataclass, "Options is not a dataclass"),
        (AListOption, r"Options.factor is not an int, float, str or bool"),
        (NoDefault, "Options.factor needs a default of type float"),
        (WrongDefault, "Options.n needs a default of type int"),
    ],
)
def test_a_metric_whose_options_cannot_be_set_from_the_command_line_is_refused(options, said):
    """At registration, so a plugin with such Options is listed as broken, not half-usable."""

    class Plugin(Reconstruction):
        Options = options

    with pytest.raises(ZooError, match=said):
        METRICS.add(Plugin, "plugin-with-bad-options", "test")
    assert "plugin-with-bad-options" not in METRICS.names()
