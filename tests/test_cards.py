"""Runs people can read: curves.png, TensorBoard events, the model card, `zoo curves`/`info`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from cli import app
from zoo.card import BENCH_FILE, write_card
from zoo.checkpoint import read_info
from zoo.errors import ZooError
from zoo.train import Trainer, TrainSettings

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def card_parts(path: Path) -> tuple[dict, str]:
    """The card's YAML front matter, parsed, and its Markdown body."""
    _, header, body = path.read_text().split("---\n", 2)
    return yaml.safe_load(header), body


def tiny_run(faces: str, out: Path, **overrides) -> Path:
    settings = TrainSettings(
        model="cvae",
        data=faces,
        image_size=16,
        max_steps=6,
        batch_size=16,
        log_every=2,
        model_config={"latent_dim": 4, "base_channels": 4, "max_channels": 8},
        out=str(out),
        **overrides,
    )
    return Trainer(settings, progress=False).run().run_dir


def test_a_30_step_run_on_the_celeba_sample_is_readable_and_its_card_takes_bench_results(
    celeba_sample, tmp_path
):
    settings = TrainSettings(
        model="cvae", data=str(celeba_sample), max_steps=30, log_every=10, tensorboard=True,
        out=str(tmp_path / "runs"),
    )  # fmt: skip
    run = Trainer(settings, progress=False).run().run_dir
    checkpoint = run / "model.safetensors"
    assert (run / "curves.png").read_bytes().startswith(PNG)
    meta, body = card_parts(run / "README.md")
    info = read_info(checkpoint)
    assert meta["library_name"] == "zoo" and "cvae" in meta["tags"]
    assert meta["datasets"] == [info.data["name"]] and "model-index" not in meta
    assert info.data["fingerprint"] in body and f"({info.data['n']} images)" in body
    assert ", ".join(info.attr_names) in body and "Sohn et al. 2015" in body
    assert f"- steps: {info.training['steps']}" in body
    assert "![curves](curves.png)" in body and "samples/step_0000030.png" in body

    [events] = (run / "tensorboard").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events)).Reload()
    tags = accumulator.Tags()
    assert {"loss", "recon", "kl", "img_per_s"} <= set(tags["scalars"])
    assert [e.step for e in accumulator.Scalars("loss")] == [10, 20, 30]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in accumulator.Scalars("loss")] == pytest.approx(
        [r["loss"] for r in records]
    )
    assert "samples" in tags["images"] and "config/text_summary" in tags["tensors"]

    def bench(n: int) -> dict:
        out = tmp_path / f"results-{n}.json"
        done = invoke(
            "bench", checkpoint, "--metric", "recon", "--n", n, "--split", "valid",
            "--data", celeba_sample, "--out", out, "--no-progress", "--device", "cpu",
        )  # fmt: skip
        assert done.exit_code == 0, done.output
        assert f"updated {run / 'README.md'}" in done.output.replace("\n", "")
        return json.loads(out.read_text())["results"][0]["metrics"]["recon"]

    first = bench(16)
    meta, body = card_parts(run / "README.md")
    [entry] = meta["model-index"][0]["results"]
    assert entry["dataset"]["split"] == "valid"
    numbers = {m["name"]: m["value"] for m in entry["metrics"]}
    assert numbers == {"MSE": first["mse"], "PSNR": first["psnr"], "SSIM": first["ssim"]}
    assert "## Results (zoo bench)" in body and f"MSE {first['mse']:.4f}" in body
    bench(16)  # the same metric and settings again: replaced, not added
    assert len(json.loads((run / BENCH_FILE).read_text())) == 1
    second = bench(8)  # other settings: a second result
    meta, _ = card_parts(run / "README.md")
    values = sorted(m["value"] for r in meta["model-index"][0]["results"] for m in r["metrics"])
    assert values == sorted([*numbers.values(), second["mse"], second["psnr"], second["ssim"]])

    shown = invoke("info", checkpoint)
    assert shown.exit_code == 0, shown.output
    flat = "".join(shown.output.split())
    assert "README.md" in flat and "curves.png" in flat and "notwritten" not in flat
    assert "benchrecon" in flat and "Sohnetal.2015" in flat


def test_zoo_curves_overlays_runs_and_a_foreign_readme_is_left_alone(synthetic_faces, tmp_path):
    first = tiny_run(synthetic_faces, tmp_path / "a")
    second = tiny_run(synthetic_faces, tmp_path / "b", lr=3e-3)
    out = tmp_path / "both.png"
    done = invoke("curves", first, second, "--out", out)
    assert done.exit_code == 0, done.output
    assert out.read_bytes().startswith(PNG)
    assert invoke("curves", tmp_path / "nowhere").exit_code == 1

    foreign = second / "README.md"
    foreign.write_text("# my notes\n")
    assert write_card(second / "model.safetensors") is None
    assert foreign.read_text() == "# my notes\n"


def test_without_the_optional_extras_training_and_bench_still_work(
    synthetic_faces, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    run = tiny_run(synthetic_faces, tmp_path / "runs")
    assert (run / "model.safetensors").is_file() and (run / "README.md").is_file()
    assert not (run / "curves.png").exists()
    assert "![curves]" not in (run / "README.md").read_text()

    done = invoke("curves", run, "--out", tmp_path / "c.png")
    assert done.exit_code == 1
    assert "pip install 'zoo[plots]'" in done.output and "Traceback" not in done.output
    with pytest.raises(ZooError, match=r"pip install 'zoo\[tensorboard\]'"):
        tiny_run(synthetic_faces, tmp_path / "tb", tensorboard=True)
    assert not (tmp_path / "tb").exists()  # refused before a run folder was made

    bench = invoke(
        "bench", run / "model.safetensors", "--metric", "recon", "--n", 4, "--no-progress",
        "--device", "cpu", "--data", synthetic_faces, "--out", tmp_path / "r.json",
    )  # fmt: skip
    assert bench.exit_code == 0, bench.output
    meta, _ = card_parts(run / "README.md")
    assert meta["model-index"][0]["results"][0]["metrics"][0]["name"] == "MSE"
