"""Sharing a model: hub-ready folders (offline, and through a pre-filled hub cache), ONNX
graphs checked against PyTorch with onnxruntime, GIF animations, and the demo page."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import Result
from PIL import Image
from typer.testing import CliRunner

import zoo
from cli import app
from zoo.errors import ZooError
from zoo.export import export_folder
from zoo.hub import CONFIG_FILE, MODEL_FILE
from zoo.latent import encode_means
from zoo.registry import MODELS, get_model_class

TINY = {"base_channels": 4, "max_channels": 8, "latent_dim": 4}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny_cvae(synthetic_faces, tmp_path_factory) -> Path:
    """A two-step CVAE at 16 px on the synthetic faces, with a recorded benchmark result."""
    from zoo.card import record_bench_result
    from zoo.train import Trainer, TrainSettings

    folder = tmp_path_factory.mktemp("tiny-cvae")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ZOO_CACHE_DIR", str(folder / "cache"))
        result = Trainer(
            TrainSettings(
                model="cvae",
                model_config=TINY,
                data=synthetic_faces,
                image_size=16,
                max_steps=2,
                batch_size=16,
                out=str(folder / "runs"),
                device="cpu",
            ),
            progress=False,
        ).run()
    checkpoint = result.run_dir / MODEL_FILE
    record_bench_result(
        checkpoint, "recon", {"split": "valid"}, {"MSE": 0.05}, {"MSE": "0.0500"}, {"n": 10}
    )
    return checkpoint


def _zoo(*args: str) -> Result:
    """The CLI in this process."""
    return CliRunner().invoke(app, list(args))


def _reconstruction(model: zoo.GenerativeModel) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16)
    y = (torch.rand(4, model.config.num_attributes) < 0.5).float()
    with torch.no_grad():
        return model.decode(encode_means(model, x, y), y)


# -- hub-ready folders ---------------------------------------------------------------------------


def test_an_exported_folder_is_the_same_model_with_config_and_card(tiny_cvae, tmp_path):
    out = tmp_path / "hub"
    export_folder(tiny_cvae, out)
    assert (out / MODEL_FILE).read_bytes() == tiny_cvae.read_bytes()
    config = json.loads((out / CONFIG_FILE).read_text())
    info = zoo.read_info(tiny_cvae)
    assert config["model"] == "cvae" and config["config"] == info.config
    assert config["attributes"] == info.attr_names and config["image_size"] == 16
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: zoo") and "model-index" in card
    assert 'zoo.load("hf-hub:ORG/NAME")' in card  # the hub's way in, on the export's card only
    assert "hf-hub:" not in (tiny_cvae.parent / "README.md").read_text()
    # the folder, the run folder and the file give bit-identical reconstructions
    expected = _reconstruction(zoo.load(tiny_cvae))
    assert torch.equal(_reconstruction(zoo.load(out)), expected)
    assert torch.equal(_reconstruction(zoo.load(tiny_cvae.parent)), expected)
    export_folder(tiny_cvae, out)  # an earlier export is replaced, not refused


def test_a_folder_whose_config_disagrees_with_its_tensors_is_refused_in_one_line(
    tiny_cvae, tmp_path
):
    out = tmp_path / "hub"
    export_folder(tiny_cvae, out)
    config = json.loads((out / CONFIG_FILE).read_text())
    config["config"]["latent_dim"] = 8
    (out / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ZooError, match=r"config.json disagrees with model.safetensors on 'config'"):
        zoo.load(out)
    result = _zoo("info", str(out))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert len(result.output.strip().splitlines()) == 1 and "zoo export" in result.output


def test_a_folder_file_that_leads_outside_the_folder_is_refused(tiny_cvae, tmp_path):
    out = tmp_path / "linked"
    out.mkdir()
    (out / MODEL_FILE).symlink_to(tiny_cvae)
    with pytest.raises(ZooError, match="leads outside the folder"):
        zoo.load(out)


@pytest.mark.parametrize(
    "damage",
    ["[" * 100_000, "not json", '"a string"', b"\xff\xfe".decode("latin-1"), "fifo"],
    ids=["deep", "text", "string", "binary", "fifo"],
)
def test_a_damaged_config_json_is_one_line_never_a_hang(tiny_cvae, tmp_path, damage):
    out = tmp_path / "hub"
    export_folder(tiny_cvae, out)
    (out / CONFIG_FILE).unlink()
    if damage == "fifo":
        os.mkfifo(out / CONFIG_FILE)
    else:
        (out / CONFIG_FILE).write_text(damage, encoding="latin-1")
    with pytest.raises(ZooError, match=r"config.json") as error:
        zoo.load(out)
    assert "\n" not in str(error.value)


def test_export_refuses_a_folder_holding_other_files(tiny_cvae, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ZooError, match="not empty and is not an earlier zoo export"):
        export_folder(tiny_cvae, tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def _hub_cache(tmp_path: Path, folder: Path) -> Path:
    """A local hub cache holding ORG/NAME at one commit, laid out as huggingface_hub does."""
    cache = tmp_path / "hub-cache"
    repo = cache / "models--org--tiny-cvae"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(folder, snapshot)
    return cache


def test_hf_hub_names_load_offline_from_the_local_hub_cache(tiny_cvae, tmp_path):
    pytest.importorskip("huggingface_hub")
    export_folder(tiny_cvae, tmp_path / "hub")
    cache = _hub_cache(tmp_path, tmp_path / "hub")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf")}
    script = (  # one process for both: importing torch is most of its time
        "import zoo\n"
        "model = zoo.load('hf-hub:org/tiny-cvae')\n"
        "print('loaded', model.model_name, model.checkpoint_info.path)\n"
        "try:\n    zoo.load('hf-hub:org/other')\n"
        "except zoo.ZooError as error:\n    print('refused:', error)\n"
    )
    found = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
        cwd=Path(__file__).parents[1], env={**os.environ, **env},
    )  # fmt: skip
    assert found.returncode == 0, found.stderr
    loaded, refused = found.stdout.strip().splitlines()
    assert loaded.startswith("loaded cvae ")
    assert f"models--org--tiny-cvae/snapshots/{COMMIT}" in loaded
    assert refused.startswith("refused: hf-hub:org/other is not in the local hub cache")


def test_hf_hub_without_the_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(ZooError, match=r"pip install 'zoo\[hub\]'"):
        zoo.load("hf-hub:org/name")
    with pytest.raises(ZooError, match="not a hub model id"):
        zoo.load("hf-hub:../../etc")


# -- ONNX ----------------------------------------------------------------------------------------


def _one_per_architecture() -> list[str]:
    """A built-in name per encode/decode code and FiLM setting (which changes edit-cvae's
    decoder): the other names differ only in fields that encode and decode never read."""
    names: dict[tuple, str] = {}
    for name in zoo.list_models():
        if MODELS.entries[name].source == "zoo":
            cls = get_model_class(name)
            film = getattr(cls.config_class(), "film", None)
            code = (cls.encode, cls.decode, getattr(cls, "decode_logits", None))
            key = (cls.conditional, film, *code)
            names.setdefault(key, name)
    return list(names.values())


ONNX_MODELS = _one_per_architecture()


@pytest.mark.long
@pytest.mark.parametrize("name", ONNX_MODELS)
def test_onnx_graphs_agree_with_pytorch(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from zoo.onnx_export import export_onnx

    conditional = get_model_class(name).conditional
    model = zoo.create_model(
        name, image_size=16, **TINY, **({"num_attributes": 3} if conditional else {})
    ).eval()
    encoder, decoder = export_onnx(model, tmp_path)
    torch.manual_seed(1)
    x, z = torch.rand(5, 3, 16, 16), torch.randn(5, 4)  # a batch the export never saw
    y = (torch.rand(5, 3) < 0.5).float()
    labels = {"y": y.numpy()} if conditional else {}
    with torch.no_grad():
        posterior = model.encode(x, y if conditional else None)
        images = model.decode(z, y if conditional else None)
    session = ort.InferenceSession(str(encoder), providers=["CPUExecutionProvider"])
    mean, logvar = session.run(None, {"x": x.numpy(), **labels})
    assert abs(mean - posterior.mean.numpy()).max() < 1e-4
    assert abs(logvar - posterior.logvar.numpy()).max() < 1e-4
    session = ort.InferenceSession(str(decoder), providers=["CPUExecutionProvider"])
    (decoded,) = session.run(None, {"z": z.numpy(), **labels})
    assert abs(decoded - images.numpy()).max() < 1e-4
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["zoo.model"] == name and meta["zoo.image_size"] == "16"
    assert json.loads(meta["zoo.value_range"]) == [0.0, 1.0]
    assert json.loads(meta["zoo.conditional"]) == conditional


def test_a_model_that_cannot_export_says_why_in_one_line(tmp_path):
    pytest.importorskip("onnxscript")
    from zoo.onnx_export import export_onnx

    model = zoo.create_model("vae", image_size=16, **TINY).eval()
    decode = model.decode
    # a branch on a value the graph computes: Python decides it, no graph can hold it
    model.decode = lambda z, y=None: decode(z) if z.sum() > 0 else decode(-z)
    with pytest.raises(ZooError, match=r"vae cannot be exported to ONNX \(decoder.onnx\)") as error:
        export_onnx(model, tmp_path)
    assert "\n" not in str(error.value)


def test_onnx_without_the_extra_names_it(monkeypatch, tmp_path):
    from zoo.onnx_export import export_onnx

    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ZooError, match=r"pip install 'zoo\[onnx\]'"):
        export_onnx(zoo.create_model("vae", image_size=16, **TINY), tmp_path)


# -- animations ----------------------------------------------------------------------------------


def test_an_attribute_animation_goes_off_on_and_back(tiny_cvae, tmp_path):
    from zoo.animation import animation_rows, save_gif
    from zoo.data import checkpoint_data
    from zoo.latent import faces_from_split, labels_for, with_assignments

    model = zoo.load(tiny_cvae)
    info = model.checkpoint_info
    faces = faces_from_split(info, checkpoint_data(info, "valid", None), count=3)
    rows, what = animation_rows(model, faces, attr="Smiling", traverse=None, frames=8)
    assert len(rows) == 8 and what == "Smiling swept on 3 faces"
    y = labels_for(faces, info, {})
    z = encode_means(model, faces.images, y)
    for frame, value in ((0, 0.0), (4, 1.0)):
        with torch.no_grad():
            expected = model.decode(z, with_assignments(y, {"Smiling": value}, info.attr_names))
        assert torch.allclose(rows[frame].images, expected, atol=1e-6)
    assert torch.allclose(rows[3].images, rows[5].images, atol=1e-6)  # the way back
    gif = save_gif(rows, tmp_path / "smile.gif", title="cvae")
    with Image.open(gif) as picture:
        assert picture.format == "GIF" and picture.n_frames == 8


def test_an_unconditional_model_animates_along_its_concept_vector(tiny_vae, tmp_path):
    from zoo.animation import attribute_frames
    from zoo.data import checkpoint_data
    from zoo.latent import compute_concept, concept_path, faces_from_split, save_concept

    checkpoint = tmp_path / MODEL_FILE  # a copy: the concept file goes beside it
    shutil.copy(tiny_vae, checkpoint)
    model = zoo.load(checkpoint)
    info = model.checkpoint_info
    faces = faces_from_split(info, checkpoint_data(info, "valid", None), count=2)
    with pytest.raises(ZooError, match="zoo concept"):  # no vector yet: say how to make one
        attribute_frames(model, faces, "Smiling", frames=4)
    concept = compute_concept(model, checkpoint_data(info, "train", None), "Smiling", info)
    save_concept(concept_path(checkpoint, "Smiling"), concept)
    rows = attribute_frames(model, faces, "Smiling", frames=4, strength=2.0)
    z = encode_means(model, faces.images, None)
    with torch.no_grad():
        expected = model.decode(z - 2.0 * concept.vector)  # the first frame: -strength
    assert torch.allclose(rows[0].images, expected, atol=1e-5)
    assert rows[0].label == "z -2.00 v(Smiling)" and rows[2].label == "z +2.00 v(Smiling)"


def test_a_traversal_moves_one_dimension_and_refuses_others(tiny_cvae):
    from zoo.animation import traversal_frames

    model = zoo.load(tiny_cvae)
    z, y = torch.zeros(2, 4), torch.zeros(2, model.config.num_attributes)
    rows = traversal_frames(model, z, y, 2, frames=4, span=3.0)
    labels = ["z[2] = -3.00", "z[2] = +0.00", "z[2] = +3.00", "z[2] = +0.00"]
    assert [row.label for row in rows] == labels
    with pytest.raises(ZooError, match="--traverse 4 is not a latent dimension"):
        traversal_frames(model, z, y, 4)


def test_zoo_animate_writes_a_gif(tiny_cvae, tmp_path):
    out = tmp_path / "trav.gif"
    result = _zoo("animate", str(tiny_cvae.parent), "--traverse", "1", "--frames", "6", "-n", "2",
                  "--out", str(out), "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    with Image.open(out) as picture:
        assert picture.n_frames == 6


# -- the demo ------------------------------------------------------------------------------------


def _editor(tiny_cvae):
    from zoo.data import checkpoint_data
    from zoo.demo import Editor
    from zoo.latent import faces_from_split

    model = zoo.load(tiny_cvae)
    info = model.checkpoint_info
    faces = faces_from_split(info, checkpoint_data(info, "valid", None), count=3)
    return Editor(model, faces, ["Smiling", "Male"])


def test_the_demo_editor_changes_the_face_where_a_slider_moves(tiny_cvae):
    editor = _editor(tiny_cvae)
    name = editor.faces.names[0]
    original, unedited, *values = editor.start(name, None)
    assert original.shape == (256, 256, 3) and len(values) == 2  # 16 px, shown x16
    assert (editor.edit(name, None, *values) == unedited).all()
    moved = [1.0 - values[0], values[1]]
    assert (editor.edit(name, None, *moved) != unedited).any()
    assert len(editor.generate(["Smiling"], 0)) == 8


def test_the_demo_edits_an_uploaded_face_at_the_training_labels(tiny_cvae, tmp_path):
    editor = _editor(tiny_cvae)
    upload = tmp_path / "mine.png"
    Image.new("RGB", (40, 48), (200, 120, 90)).save(upload)
    original, _, *values = editor.start(None, str(upload))
    info = editor.model.checkpoint_info
    rates = [info.attr_rates[info.attr_names.index(name)] for name in ("Smiling", "Male")]
    modes = [1.0 if rate > 0.5 else 0.0 for rate in rates]
    assert values == modes and original.shape == (256, 256, 3)
    with pytest.raises(ZooError, match="pick a face"):
        editor.start("not-a-face.jpg", None)


def test_the_demo_without_the_extra_names_it(tiny_cvae, monkeypatch):
    from zoo.demo import build_app

    monkeypatch.setitem(sys.modules, "gradio", None)  # import fails
    with pytest.raises(ZooError, match=r"pip install 'zoo\[demo\]'"):
        build_app(_editor(tiny_cvae))


@pytest.mark.long
def test_the_demo_serves_on_loopback_and_edits_through_its_api(tiny_cvae):
    pytest.importorskip("gradio")
    from gradio_client import Client

    from zoo.demo import serve

    editor = _editor(tiny_cvae)
    app = serve(editor, 0, block=False)
    try:
        assert app.local_url.startswith("http://127.0.0.1:")
        page = _fetch(app.local_url)
        assert not _external_assets(page), _external_assets(page)
        client = Client(app.local_url, verbose=False)
        name = editor.faces.names[0]
        _, unedited, *values = client.predict(name, None, api_name="/face")
        moved = [1.0 - values[0], values[1]]
        edited = client.predict(name, None, *moved, api_name="/edit")
        same = client.predict(name, None, *values, api_name="/edit")
        pixels = [_pixels(path) for path in (unedited, same, edited)]
        assert (pixels[0] == pixels[1]).all() and (pixels[0] != pixels[2]).any()
    finally:
        app.close()


def _fetch(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()


def _external_assets(page: str) -> list[str]:
    """Scripts, styles and fonts the page would fetch from anywhere but its own server."""
    import re

    found = re.findall(r"""(?:src|href)\s*=\s*["'](https?://[^"']+)""", page)
    return [url for url in found if not url.startswith(("http://127.0.0.1", "http://localhost"))]


def _pixels(path: str):
    import numpy as np

    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB"))


# -- the demo in a real browser ------------------------------------------------------------------


class Browser:
    """Headless Chromium driven over its DevTools pipe (``--remote-debugging-pipe``: JSON
    messages ending in NUL on file descriptors 3 and 4), so no driver package is needed."""

    def __init__(self, executable: str, profile: Path) -> None:
        to_browser, self._commands = os.pipe()
        self._events, from_browser = os.pipe()

        def wire() -> None:  # in the child: its fds 3 and 4 are the pipe's ends
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)

        self.process = subprocess.Popen(
            [executable, "--headless=new", "--remote-debugging-pipe", "--no-sandbox",
             "--disable-gpu", "--no-first-run", "--window-size=1100,1300",
             f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=wire, close_fds=False,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(to_browser)
        os.close(from_browser)
        self._next, self._buffer, self.session = 0, b"", None

    def send(self, method: str, **params) -> dict:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                if not select.select([self._events], [], [], 120)[0]:
                    raise RuntimeError(f"Chromium did not answer {method} in 120 s")
                chunk = os.read(self._events, 1 << 16)
                if not chunk:
                    raise RuntimeError("Chromium closed its DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", url=url)["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]

    def evaluate(self, script: str):
        return self.send("Runtime.evaluate", expression=script, returnByValue=True)["result"].get(
            "value"
        )

    def wait_for(self, script: str, timeout: float = 120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(script)
            if value:
                return value
            time.sleep(0.2)
        text = self.evaluate("document.body ? document.body.innerText.slice(0, 300) : ''")
        raise AssertionError(f"timed out waiting for {script}; the page shows: {text!r}")

    def screenshot(self, path: Path) -> Path:
        import base64

        shot = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(shot))
        return path

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        os.close(self._commands)
        os.close(self._events)


# the src of the edited face once it is loaded ("" before), by the page's element id
EDITED_SRC = """(() => {
  const image = document.querySelector('#zoo-edited img');
  return image && image.complete && image.naturalWidth > 0 ? image.src : '';
})()"""
MOVE_FIRST_SLIDER = """(() => {
  const slider = document.querySelector('input[type=range]');
  const set = Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set;
  set.call(slider, String(1 - Number(slider.value)));
  slider.dispatchEvent(new Event('input', {bubbles: true}));
  slider.dispatchEvent(new Event('change', {bubbles: true}));
  slider.dispatchEvent(new PointerEvent('pointerup', {bubbles: true}));
  return slider.value;
})()"""


@pytest.mark.long
def test_a_browser_moves_a_slider_and_the_face_changes(tiny_cvae, tmp_path):
    """Where Chromium is installed (Debian's chromium package): the page loads, a slider
    moves, the edited face is replaced; the screenshot is kept in this test's tmp_path."""
    pytest.importorskip("gradio")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("no Chromium: apt install chromium to run the browser test of zoo demo")
    from zoo.demo import serve

    editor = _editor(tiny_cvae)
    edits = []
    decode_edit = editor.edit
    editor.edit = lambda *args: edits.append(args) or decode_edit(*args)
    app = serve(editor, 0, block=False)
    browser = Browser(executable, tmp_path / "profile")
    try:
        browser.open(app.local_url)
        browser.wait_for("document.querySelectorAll('input[type=range]').length == 2")
        before = browser.wait_for(EDITED_SRC)
        time.sleep(1.0)
        # one decode per page load: a second, identical one (the sliders' own `change`
        # when the face sets them) rewrote the cached image while it was being fetched
        assert len(edits) == 1, edits
        browser.evaluate(MOVE_FIRST_SLIDER)
        browser.wait_for(f"![{json.dumps(before)}, ''].includes({EDITED_SRC})")
        shot = browser.screenshot(tmp_path / "demo-screenshot.png")
        with Image.open(shot) as picture:
            assert picture.size[0] > 500
    finally:
        browser.close()
        app.close()
