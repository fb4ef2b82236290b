"""The FID metric: the distance, both extractors, safe weight loading, caching, the protocol."""

from __future__ import annotations

import builtins
import dataclasses
import errno
import hashlib
import importlib.util
import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import zoo
from benchmarks import fid, inception
from benchmarks.metric import BenchContext, BenchSettings
from zoo.data import load_data
from zoo.errors import ZooError
from zoo.files import WriteFailed, cache_dir

TINY = {"image_size": 16, "base_channels": 4, "max_channels": 8, "latent_dim": 4}


class StandInFeatures(nn.Module):
    """A fixed random projection of the pixels, counting the images it sees; it has the
    attribute classifier's interface (``features``, ``num_features``, ``image_size``)."""

    def __init__(self, pixels: int = 3 * 16 * 16, num_features: int = 6, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(pixels, num_features, generator=generator))
        self.num_features = num_features
        self.image_size = 16
        self.images_seen = 0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self.images_seen += x.shape[0]
        return x.flatten(1) @ self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


@pytest.fixture(autouse=True)
def one_thread():
    """Inception at 299 px and the 2048 x 2048 eigvals run 10x faster on one thread when another
    job shares the 2-core CPU (OpenMP barriers stall); tiny networks lose nothing by it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def valid(synthetic_faces):
    return load_data(synthetic_faces, "valid", 16, progress=False)


def tiny_model(name: str, data, tmp_path: Path):
    """A tiny model saved and loaded, so it carries ``checkpoint_info`` like a real run."""
    torch.manual_seed(0)
    model = zoo.create_model(name, num_attributes=len(data.attr_names), **TINY)
    path = tmp_path / f"{name}.safetensors"
    zoo.save_checkpoint(
        path,
        model,
        attr_names=list(reversed(data.attr_names)),  # not the data's order: labels get reordered
        preprocess=data.preprocess.to_dict(),
        data=data.describe(),
    )
    return zoo.load(path), path


def context(model, path, data, **settings) -> BenchContext:
    """A benchmark context; ``features`` and ``weights`` are the fid metric's options."""
    names = {field.name for field in dataclasses.fields(fid.FrechetDistance.Options)}
    options = {name: settings.pop(name) for name in names & set(settings)}
    return BenchContext(
        model=model,
        checkpoint=path,
        info=model.checkpoint_info,
        data=data,
        settings=BenchSettings(progress=False, **settings),
        device=torch.device("cpu"),
        metric_options={"fid": fid.FrechetDistance.Options(**options)},
    )


def use_stand_in(monkeypatch, classifier, identity="classifier:stand-in:0001"):
    info = SimpleNamespace(image_size=8)
    monkeypatch.setattr(fid, "_classifier", lambda context: (classifier, info, identity))


# -- the distance ----------------------------------------------------------------------------------


def frechet_by_hand(real: torch.Tensor, fake: torch.Tensor) -> float:
    """The Fréchet distance of two sets of feature vectors from its formula, in float64:
    |mu_r - mu_f|^2 + tr(S_r + S_f - 2 (S_r S_f)^(1/2)), covariances with n - 1."""
    real, fake = real.double(), fake.double()
    means = (real.mean(0) - fake.mean(0)).square().sum()
    s_real, s_fake = real.T.cov(), fake.T.cov()
    root = torch.linalg.eigvals(s_real @ s_fake).sqrt().real.sum()
    return float(means + s_real.trace() + s_fake.trace() - 2 * root)


def test_distance_is_zero_for_the_real_images_and_grows_with_a_shift(monkeypatch, valid, tmp_path):
    """The metric as the benchmark runs it, on a model that draws the real images themselves,
    then those images brightened by s: 0, then a distance that grows with s."""
    vae, path = tiny_model("vae", valid, tmp_path)
    features = StandInFeatures()
    use_stand_in(monkeypatch, features)
    real = valid.batch(torch.arange(8))[0]
    distances = []
    for shift in (0.0, 0.1, 0.3, 0.9):
        fakes = real + shift
        monkeypatch.setattr(vae, "generate", lambda n, y=None, *, generator=None, f=fakes: f[:n])
        bench = context(vae, path, valid, features="classifier", n=8, batch_size=8)
        distances.append(fid.FrechetDistance().compute(bench)["value"])
        expected = frechet_by_hand(features.features(real), features.features(fakes))
        assert distances[-1] == pytest.approx(expected, rel=1e-4, abs=1e-3)
    assert abs(distances[0]) < 1e-3
    assert 0 < distances[1] < distances[2] < distances[3]
    # the mean term alone is s^2 |W^T 1|^2: the distance is not a constant
    assert distances[3] > 50 * distances[1]


# -- FD-attr: the classifier extractor, the protocol and the cache ---------------------------------


def test_fd_attr_matches_the_protocol_and_caches_real_statistics(monkeypatch, valid, tmp_path):
    vae, path = tiny_model("vae", valid, tmp_path)
    classifier = StandInFeatures()
    use_stand_in(monkeypatch, classifier)
    settings = {"features": "classifier", "n": 8, "batch_size": 3, "seed": 5}

    first = fid.FrechetDistance().compute(context(vae, path, valid, **settings))
    assert classifier.images_seen == 16  # 8 real, 8 generated
    assert first["name"] == "FD-attr" and first["features"] == "classifier:stand-in:0001"
    assert (first["n_real"], first["n_fake"]) == (8, 8)
    assert first["conditioned_on_real_labels"] is False
    assert first["real_stats_cached"] is False
    assert fid.FrechetDistance().headline(first) == {"FD-attr": f"{first['value']:.2f}"}
    assert list((cache_dir() / fid.STATS_DIR).glob("*.safetensors"))

    # the same number by hand: first 8 real images, fakes from one seeded generator in batches
    generator = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        fakes = [vae.generate(k, None, generator=generator) for k in (3, 3, 2)]
    real = valid.batch(torch.arange(8))[0]
    stand_in = StandInFeatures()
    expected = frechet_by_hand(stand_in.features(real), stand_in.features(torch.cat(fakes)))
    assert first["value"] == pytest.approx(expected, rel=1e-4)

    # a second run (a new benchmark run: fresh tools) reuses the real statistics
    second = fid.FrechetDistance().compute(context(vae, path, valid, **settings))
    assert second["real_stats_cached"] is True
    assert classifier.images_seen == 24  # only the 8 generated images
    assert second["value"] == pytest.approx(first["value"], rel=1e-6)

    # a different n, or a different extractor, does not reuse them
    other_n = fid.FrechetDistance().compute(context(vae, path, valid, **{**settings, "n": 6}))
    assert other_n["real_stats_cached"] is False and other_n["n_real"] == 6
    use_stand_in(monkeypatch, StandInFeatures(seed=1), "classifier:stand-in:0002")
    other = fid.FrechetDistance().compute(context(vae, path, valid, **settings))
    assert other["real_stats_cached"] is False
    assert other["value"] != pytest.approx(first["value"])


def test_fd_attr_with_a_real_attribute_classifier_file(valid, tmp_path):
    from benchmarks.classifier import AttributeClassifier, save_classifier

    torch.manual_seed(0)
    classifier = AttributeClassifier("test_resnet", valid.attr_names, 16).eval()
    classifier_path = tmp_path / "classifier.safetensors"
    save_classifier(classifier_path, classifier, data=valid.describe())
    vae, path = tiny_model("vae", valid, tmp_path)
    settings = {"features": "classifier", "classifiers": [str(classifier_path)], "n": 4}
    result = fid.FrechetDistance().compute(context(vae, path, valid, **settings))
    digest = hashlib.sha256(classifier_path.read_bytes()).hexdigest()[:16]
    assert result["features"] == f"classifier:test_resnet:{digest}"
    assert result["name"] == "FD-attr" and result["value"] >= 0


def test_a_damaged_statistics_cache_is_recomputed(monkeypatch, valid, tmp_path):
    vae, path = tiny_model("vae", valid, tmp_path)
    use_stand_in(monkeypatch, StandInFeatures())
    settings = {"features": "classifier", "n": 5}
    first = fid.FrechetDistance().compute(context(vae, path, valid, **settings))
    [stats] = (cache_dir() / fid.STATS_DIR).glob("*.safetensors")
    stats.write_bytes(b"not a safetensors file")
    again = fid.FrechetDistance().compute(context(vae, path, valid, **settings))
    assert again["real_stats_cached"] is False
    assert again["value"] == pytest.approx(first["value"], rel=1e-6)


def test_a_cache_the_disk_refuses_costs_time_not_the_distance(monkeypatch, valid, tmp_path, caplog):
    vae, path = tiny_model("vae", valid, tmp_path)
    use_stand_in(monkeypatch, StandInFeatures())
    monkeypatch.setattr(fid, "write_tensors_file", refused_write)  # a full or read-only cache
    result = fid.FrechetDistance().compute(context(vae, path, valid, features="classifier", n=5))
    assert result["value"] >= 0 and "could not cache FID real statistics" in caplog.text


def refused_write(path, *args, **kwargs):
    raise WriteFailed(path, OSError(errno.ENOSPC, "No space left on device"))


def test_conditional_models_generate_with_the_real_labels(monkeypatch, valid, tmp_path):
    cvae, path = tiny_model("cvae", valid, tmp_path)
    use_stand_in(monkeypatch, StandInFeatures())
    calls = []
    generate = cvae.generate

    def recording_generate(n, y=None, *, generator=None):
        calls.append((n, y, generator))
        return generate(n, y, generator=generator)

    monkeypatch.setattr(cvae, "generate", recording_generate)
    bench = context(cvae, path, valid, features="classifier", n=7, batch_size=3)
    result = fid.FrechetDistance().compute(bench)

    assert [n for n, _, _ in calls] == [3, 3, 1]
    labels = torch.cat([y for _, y, _ in calls])
    assert torch.equal(labels, bench.labels[:7])
    # the model's attribute order, not the data's (tiny_model stored them reversed)
    assert torch.equal(labels, valid.attrs[:7].flip(1))
    assert all(isinstance(g, torch.Generator) for _, _, g in calls)
    assert result["conditioned_on_real_labels"] is True


def test_unconditional_models_get_no_labels(monkeypatch, valid, tmp_path):
    vae, path = tiny_model("vae", valid, tmp_path)
    use_stand_in(monkeypatch, StandInFeatures())
    seen = []
    generate = vae.generate
    monkeypatch.setattr(
        vae, "generate", lambda n, y=None, *, generator=None: seen.append(y) or generate(n, y)
    )
    fid.FrechetDistance().compute(context(vae, path, valid, features="classifier", n=4))
    assert seen == [None]


def test_settings_that_cannot_give_a_distance_are_errors(monkeypatch, valid, tmp_path):
    vae, path = tiny_model("vae", valid, tmp_path)
    use_stand_in(monkeypatch, StandInFeatures())
    with pytest.raises(ZooError, match="unknown --fid-features 'pixels'"):
        fid.FrechetDistance().compute(context(vae, path, valid, features="pixels"))
    with pytest.raises(ZooError, match="at least 2 images"):
        fid.FrechetDistance().compute(context(vae, path, valid, features="classifier", n=1))


# -- FID: the Inception weights --------------------------------------------------------------------


@pytest.fixture(scope="session")
def stand_in_weights(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A file in the format of torch-fidelity's InceptionV3 weights, with random values.

    The keys and shapes come from torch-fidelity's own class, built on the meta device (no
    memory, no values) with its weight loading switched off for that one construction.
    """
    import torch_fidelity.feature_extractor_inceptionv3 as inception_module

    with pytest.MonkeyPatch.context() as patch, torch.device("meta"):
        patch.setattr(inception_module, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(
            inception_module.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None
        )
        shapes = inception_module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, meta in shapes.state_dict().items():
        if meta.dtype == torch.int64:  # num_batches_tracked
            state[name] = torch.zeros((), dtype=torch.int64)
        elif name.endswith(("running_var", "bn.weight")):
            state[name] = torch.rand(meta.shape, generator=generator) + 0.5
        elif meta.dim() > 1:  # He-scaled, so activations neither vanish nor explode
            state[name] = (
                torch.randn(meta.shape, generator=generator) * (2 / meta[0].numel()) ** 0.5
            )
        else:
            state[name] = torch.randn(meta.shape, generator=generator) * 0.1
    path = tmp_path_factory.mktemp("inception") / "stand-in-inception.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture
def no_hub_weights(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache and no $ZOO_FID_WEIGHTS; returns where the hub file would be."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    return tmp_path / "torch-home" / "hub" / "checkpoints" / inception.INCEPTION_FILE


@pytest.fixture
def accept(monkeypatch):
    """Accept a deliberately different weights file as a user would: set
    $ZOO_FID_WEIGHTS_SHA256 to its sha256. Returns the function that does it for a path."""

    def accept_file(path: Path) -> str:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        monkeypatch.setenv("ZOO_FID_WEIGHTS_SHA256", digest)
        return digest

    return accept_file


def assert_same_weights(extractor: fid.Extractor, state: dict[str, torch.Tensor]) -> None:
    loaded = extractor.metric.inception.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[name], state[name]) for name in state)


def test_fid_with_weights_from_the_option_end_to_end(
    stand_in_weights, no_hub_weights, accept, monkeypatch, valid, tmp_path
):
    weights, state = stand_in_weights
    accept(weights)
    vae, path = tiny_model("vae", valid, tmp_path)
    # Two copies of one face, and a model that always draws another: both covariances are
    # exactly zero, so the FID must be the squared distance of two Inception feature vectors.
    # (It also spares torchmetrics' 2048 x 2048 eigvals, 15-50 s on 2 CPU cores otherwise.)
    data = dataclasses.replace(
        valid,
        images=valid.images[:1].expand(2, -1, -1, -1).clone(),
        attrs=valid.attrs[:1].expand(2, -1).clone(),
        filenames=valid.filenames[:1] * 2,
    )
    drawn = valid.batch(torch.tensor([1]))[0]
    monkeypatch.setattr(
        vae, "generate", lambda n, y=None, *, generator=None: drawn.expand(n, -1, -1, -1)
    )
    bench = context(vae, path, data, weights=str(weights))
    result = fid.FrechetDistance().compute(bench)

    extractor = fid.extractor_for(bench)  # the one the metric built: made once per run
    assert_same_weights(extractor, state)
    with torch.no_grad():  # the two faces through Inception directly, in one batch
        real, fake = extractor.metric.inception(fid.to_uint8_rgb(valid.batch(torch.arange(2))[0]))
    assert result["value"] > 0
    assert result["value"] == pytest.approx((real - fake).double().square().sum().item(), rel=1e-3)
    assert result["name"] == "FID" and result["features"] == "inception-v3-2048"
    assert result["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert (result["n_real"], result["n_fake"]) == (2, 2)
    assert fid.FrechetDistance().headline(result) == {"FID": f"{result['value']:.2f}"}


def test_fid_weights_from_the_environment_and_the_hub_cache(
    stand_in_weights, no_hub_weights, accept, monkeypatch, valid, tmp_path
):
    weights, state = stand_in_weights
    accept(weights)
    vae, path = tiny_model("vae", valid, tmp_path)
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(weights))
    assert_same_weights(fid.extractor_for(context(vae, path, valid)), state)

    # the option wins over the environment, which wins over the hub cache
    no_hub_weights.parent.mkdir(parents=True)
    no_hub_weights.symlink_to(weights)
    other = tmp_path / "other.pth"
    other.write_bytes(b"")
    assert inception.inception_weights_path(str(other)) == other
    assert inception.inception_weights_path(None) == weights
    monkeypatch.delenv(inception.WEIGHTS_ENV)
    assert inception.inception_weights_path(None) == no_hub_weights


def test_missing_weights_say_where_to_put_them_and_what_else_to_use(
    no_hub_weights, valid, tmp_path
):
    vae, path = tiny_model("vae", valid, tmp_path)
    with pytest.raises(ZooError) as error:
        fid.FrechetDistance().compute(context(vae, path, valid, n=3))
    message = str(error.value)
    assert "\n" not in message
    for part in (
        str(no_hub_weights),
        inception.INCEPTION_URL,
        "--fid-weights PATH",
        "ZOO_FID_WEIGHTS=PATH",
        "--fid-features classifier",
    ):
        assert part in message
    # a path given explicitly but absent is an error too, never a silent fall-through
    with pytest.raises(ZooError, match="--fid-weights .*nowhere.pth is not a file"):
        inception.inception_weights_path(str(tmp_path / "nowhere.pth"))


# docs/reliability.md: the FID weights file is not torch-fidelity's released one
def test_weights_of_another_sha256_are_refused_before_anything_reads_them(
    stand_in_weights, no_hub_weights, monkeypatch, valid, tmp_path
):
    weights, state = stand_in_weights
    vae, path = tiny_model("vae", valid, tmp_path)
    bench = context(vae, path, valid, weights=str(weights))

    def load(*args, **kwargs):
        raise AssertionError("the weights file was loaded before its sha256 was checked")

    with monkeypatch.context() as patch:
        for name in ("FrechetInceptionDistance", "load_weights_only"):
            patch.setattr(inception, name, load)
        patch.setattr(torch, "load", load)
        with pytest.raises(ZooError) as error:
            fid.FrechetDistance().compute(bench)
    message = str(error.value)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert "\n" not in message
    assert f"refusing {weights}: its sha256 is not that of torch-fidelity's released" in message
    assert f"set ZOO_FID_WEIGHTS_SHA256={digest}" in message and inception.INCEPTION_URL in message

    # the override the line names: this file, chosen on purpose, is loaded (and said to be
    # not comparable with published FIDs)
    monkeypatch.setenv("ZOO_FID_WEIGHTS_SHA256", digest.upper())
    extractor = fid.extractor_for(context(vae, path, valid, weights=str(weights)))
    assert_same_weights(extractor, state)
    assert extractor.details == {"weights_sha256": digest}

    # an override names exactly one file: any other is refused
    other = tmp_path / "other.pth"
    other.write_bytes(weights.read_bytes() + b"\0")
    with pytest.raises(ZooError, match=f"not the {digest} that .ZOO_FID_WEIGHTS_SHA256 asks"):
        fid.extractor_for(context(vae, path, valid, weights=str(other)))
    monkeypatch.setenv("ZOO_FID_WEIGHTS_SHA256", digest[:8])
    with pytest.raises(ZooError, match=r"ZOO_FID_WEIGHTS_SHA256 must be the 64 hex digits"):
        fid.extractor_for(context(vae, path, valid, weights=str(weights)))


def test_the_released_weights_sha256_is_the_one_their_name_carries():
    # torch.hub names a download by the first 8 hex digits of its sha256
    assert inception.INCEPTION_FILE.removesuffix(".pth").endswith(inception.INCEPTION_SHA256[:8])
    assert re.fullmatch("[0-9a-f]{64}", inception.INCEPTION_SHA256)


class Bomb:
    """Unpickling this creates ``marker``: what a malicious weights file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


def pickled_callables(path: Path) -> set[str]:
    """What a pickle (bare, or inside a torch.save zip) imports to call, read by pickletools."""
    data = path.read_bytes()
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    callables, strings = set(), []
    for opcode, argument, _ in pickletools.genops(data):
        if opcode.name == "GLOBAL":
            callables.add(argument.replace(" ", "."))
        elif opcode.name == "STACK_GLOBAL":
            callables.add(".".join(strings[-2:]))
        elif isinstance(argument, str):
            strings.append(argument)
    return callables


@pytest.mark.parametrize("form", ["torch.save", "pickle"])
def test_a_weights_file_that_runs_code_is_refused_unopened(
    form, no_hub_weights, accept, valid, tmp_path
):
    marker = tmp_path / "marker"
    bomb = tmp_path / "weights.pth"
    if form == "torch.save":
        torch.save({"Conv2d_1a_3x3.conv.weight": Bomb(marker)}, bomb)
    else:
        bomb.write_bytes(pickle.dumps(Bomb(marker)))
    vae, path = tiny_model("vae", valid, tmp_path)
    bench = context(vae, path, valid, weights=str(bomb), n=3)

    # refused by its sha256; and even when a user accepts that sha256, never unpickled
    with pytest.raises(ZooError, match=r"refusing .*weights\.pth: its sha256 is not"):
        fid.FrechetDistance().compute(bench)
    accept(bomb)
    with pytest.raises(ZooError, match=r"refusing .*weights\.pth.*weights_only=True") as error:
        fid.FrechetDistance().compute(bench)
    assert "\n" not in str(error.value)
    assert not marker.exists()

    # the control, read without unpickling: the file does tell an unpickler to call open()
    opener = f"{builtins.open.__module__}.{builtins.open.__qualname__}"  # io.open
    assert opener in pickled_callables(bomb)


def test_a_file_that_is_not_inception_weights_is_refused(no_hub_weights, accept, valid, tmp_path):
    weights = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(2, 3, 3, 3)}, weights)
    accept(weights)
    vae, path = tiny_model("vae", valid, tmp_path)
    with pytest.raises(
        ZooError, match="does not hold torch-fidelity's InceptionV3 weights"
    ) as error:
        fid.FrechetDistance().compute(context(vae, path, valid, weights=str(weights), n=3))
    assert "\n" not in str(error.value)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(weights.read_bytes()[:300])
    accept(truncated)
    with pytest.raises(ZooError, match="not a readable PyTorch weights file"):
        inception.inception_fid(truncated)


def test_without_torch_fidelity_the_standard_fid_names_the_extra(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "torch_fidelity" else real_find_spec(name, *args),
    )
    with pytest.raises(ZooError, match=r"pip install 'zoo\[inception\]', or use --fid-features"):
        fid.extractor_for(SimpleNamespace(options=lambda metric: metric.Options()), "inception")
