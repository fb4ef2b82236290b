"""Runs people can read: curves.png, TensorBoard events, the model card, `zoo curves`/`info`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from cli import app
from zoo.card import BENCH_FILE, record_bench_result, write_card
from zoo.checkpoint import load_train_state, read_info
from zoo.curves import write_run_curves
from zoo.errors import ZooError
from zoo.train import Trainer, TrainSettings, resume_settings

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
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


@pytest.fixture(params=["synthetic-faces", "celeba-sample"])
def data_and_size(request, synthetic_faces) -> tuple[str, dict]:
    """The built-in synthetic faces (always, so CI checks this) and the real CelebA sample
    (where it is on disk): the folder and the training settings for it."""
    tiny = {
        "batch_size": 16,
        "model_config": {"latent_dim": 4, "base_channels": 4, "max_channels": 8},
    }
    if request.param == "celeba-sample":  # at its 64 px
        return str(request.getfixturevalue("celeba_sample")), tiny
    return synthetic_faces, {"image_size": 16, **tiny}


def test_a_30_step_run_is_readable_and_its_card_takes_bench_results(
    data_and_size, tmp_path, monkeypatch
):
    data, size = data_and_size
    drawn = []  # the saved step each time curves.png is drawn, and whether it then exists

    def draw_and_note(run_dir):
        path = write_run_curves(run_dir)
        step = load_train_state(run_dir / "train_state.safetensors").step
        drawn.append((step, path is not None and path.read_bytes().startswith(PNG)))
        return path

    monkeypatch.setattr("zoo.run.write_run_curves", draw_and_note)
    settings = TrainSettings(
        model="cvae", data=data, max_steps=30, log_every=10, save_every=10, tensorboard=True,
        out=str(tmp_path / "runs"), **size,
    )  # fmt: skip
    trainer = Trainer(settings, progress=False)
    run = trainer.run().run_dir
    checkpoint = run / "model.safetensors"
    saves = sorted(
        {*range(10, 31, 10), *range(trainer.steps_per_epoch, 31, trainer.steps_per_epoch)}
    )
    assert drawn == [(step, True) for step in saves]  # curves.png is redrawn at every save
    meta, body = card_parts(run / "README.md")
    info = read_info(checkpoint)
    assert meta["library_name"] == "zoo" and "cvae" in meta["tags"]
    assert meta["datasets"] == [info.data["name"]] and "model-index" not in meta
    assert info.data["fingerprint"] in body and f"(`{info.data['n']}` images)" in body
    assert ", ".join(f"`{name}`" for name in info.attr_names) in body and "Sohn et al" in body
    assert f"- steps: `{info.training['steps']}`" in body
    assert "![curves](curves.png)" in body and "samples/step_0000030.png" in body

    [events] = (run / "tensorboard").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events)).Reload()
    tags = accumulator.Tags()
    assert {"loss", "recon", "kl", "img_per_s"} <= set(tags["scalars"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in accumulator.Scalars("loss")] == [r["step"] for r in records]
    assert [e.value for e in accumulator.Scalars("loss")] == pytest.approx(
        [r["loss"] for r in records]
    )
    assert "samples" in tags["images"] and "config/text_summary" in tags["tensors"]

    def bench(n: int) -> dict:
        out = tmp_path / f"results-{n}.json"
        done = invoke(
            "bench", checkpoint, "--metric", "recon", "--n", n, "--split", "valid",
            "--data", data, "--out", out, "--no-progress", "--device", "cpu",
        )  # fmt: skip
        assert done.exit_code == 0, done.output
        assert f"updated {run / 'README.md'}" in done.output.replace("\n", "")
        return json.loads(out.read_text())["results"][0]["metrics"]["recon"]

    first = bench(8)
    meta, body = card_parts(run / "README.md")
    [entry] = meta["model-index"][0]["results"]
    assert entry["dataset"]["split"] == "valid"
    numbers = {m["name"]: m["value"] for m in entry["metrics"]}
    assert numbers == {"MSE": first["mse"], "PSNR": first["psnr"], "SSIM": first["ssim"]}
    assert "## Results (zoo bench)" in body and f"MSE {first['mse']:.4f}" in body
    bench(8)  # the same metric and settings again: replaced, not added
    assert len(json.loads((run / BENCH_FILE).read_text())) == 1
    second = bench(4)  # other settings: a second result
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

    card = second / "README.md"
    written = card.read_text()
    assert write_card(second / "model.safetensors") == card  # zoo's own, unchanged: rewritten
    for foreign in (
        "# my notes\n",
        "---\nlibrary_name: zoo\n---\n# a card I wrote for the Hub\n",  # zoo's tag, by hand
        written.replace("## Config", "## Config (my note: lr was too high)"),  # zoo's, edited
    ):
        card.write_text(foreign)
        assert write_card(second / "model.safetensors") is None
        assert card.read_text() == foreign


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


@pytest.fixture(scope="module")
def one_run(synthetic_faces, tmp_path_factory) -> Path:
    return tiny_run(synthetic_faces, tmp_path_factory.mktemp("one"))


def copy_of(run: Path, folder: Path) -> Path:
    copy = folder / run.name
    shutil.copytree(run, copy)
    return copy


def test_names_from_files_reach_the_terminal_and_the_card_as_themselves(
    one_run, synthetic_faces, tmp_path
):
    """A checkpoint path holding rich markup (``x[/bold]`` across two folders), a run folder
    whose name holds ``[red]``, a newline that would open a Markdown section, and a character
    outside the BMP (an emoji)."""
    hostile = "bold] [red]z\n## injected \U0001f600"
    (tmp_path / "x[").mkdir()
    run = copy_of(one_run, tmp_path).rename(tmp_path / "x[" / hostile)
    checkpoint = run / "model.safetensors"
    assert "x[/bold] [red]z" in str(checkpoint)
    done = invoke(
        "bench", checkpoint, "--metric", "recon", "--n", 4, "--no-progress", "--device", "cpu",
        "--data", synthetic_faces, "--out", tmp_path / "r.json",
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "bold] [red]z\\n## injected \U0001f600" in done.output  # the leaderboard's run
    meta, body = card_parts(run / "README.md")
    assert meta["model-index"][0]["name"] == hostile  # the YAML reads back exactly
    assert not any(line.startswith("## injected") for line in body.splitlines())
    shown = invoke("info", checkpoint)
    assert shown.exit_code == 0 and "Traceback" not in shown.output
    assert "[red]z" in shown.output


VALID = {
    "metric": "recon",
    "settings": {"split": "valid", "n": 4},
    "values": {"MSE": 0.5},
    "headline": {"MSE": "0.5000"},
    "data": {"name": "synthetic-faces", "split": "valid", "n": 4},
    "date": "2026-12-02 10:00 UTC",
}


@pytest.mark.parametrize(
    "content",
    [
        b'{"a": {"metric": "re',  # truncated
        b"[1, 2, 3]",  # a list
        b"[" * 200_000,  # nested too deep for any parser
        b"\xff\xfe not text",
        b" " * (9 * 1024 * 1024),  # 9 MB
        json.dumps({"kept": VALID, "bad": {**VALID, "values": {"MSE": "x"}}}).encode(),
        json.dumps({"kept": VALID, "bad": {**VALID, "settings": {"deep": [[[[1]]]]}}}).encode(),
    ],
    ids=["truncated", "list", "deep", "binary", "9MB", "wrong-type", "nested-settings"],
)
def test_a_damaged_bench_record_is_kept_aside_and_never_crashes(one_run, tmp_path, content):
    run = copy_of(one_run, tmp_path)
    (run / BENCH_FILE).write_bytes(content)
    checkpoint = run / "model.safetensors"
    shown = invoke("info", checkpoint)
    assert shown.exit_code == 0 and "Traceback" not in shown.output
    assert "is damaged" in shown.output
    record_bench_result(checkpoint, "recon", {"n": 8}, {"MSE": 0.25}, {"MSE": "0.2500"}, {})
    [aside] = run.glob(f"{BENCH_FILE}.damaged-*")
    assert aside.read_bytes() == content  # nothing it held is lost
    results = json.loads((run / BENCH_FILE).read_text())
    carried = [entry for entry in results.values() if entry == VALID]
    assert len(results) == 1 + len(carried) and len(carried) == (b"kept" in content)


RECORD_MANY = """
import sys
from zoo.card import record_bench_result
checkpoint, who = sys.argv[1], sys.argv[2]
for index in range(12):
    record_bench_result(checkpoint, "recon", {"who": who, "n": index}, {"MSE": 0.5}, {}, {})
"""


def test_two_benches_on_one_checkpoint_at_once_keep_every_result(one_run, tmp_path):
    run = copy_of(one_run, tmp_path)
    checkpoint = run / "model.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writers = [
        subprocess.Popen([sys.executable, "-c", RECORD_MANY, str(checkpoint), who], env=env)
        for who in ("a", "b")
    ]
    assert [writer.wait(timeout=120) for writer in writers] == [0, 0]
    results = json.loads((run / BENCH_FILE).read_text())
    assert len(results) == 24  # a read-change-write without the lock loses some
    meta, _ = card_parts(run / "README.md")
    assert len(meta["model-index"][0]["results"]) == 24  # and the card shows them all


class PowerCut(Exception):
    """Stands in for a kill: the process stops mid-step and saves nothing more."""


def test_a_resumed_run_shows_each_step_once_in_tensorboard(synthetic_faces, tmp_path, monkeypatch):
    """Records at 2, 4, 5 (epoch end), 7; saves at 4 and 5; the power is cut in step 8, so
    the resumed run logs 7 again: TensorBoard must drop the first 7, as metrics.jsonl does."""
    settings = TrainSettings(
        model="cvae", data=synthetic_faces, image_size=16, batch_size=16, max_steps=12,
        log_every=2, save_every=4, tensorboard=True, out=str(tmp_path), precision="fp32",
        model_config={"latent_dim": 4, "base_channels": 4, "max_channels": 8},
    )  # fmt: skip
    trainer = Trainer(settings, progress=False)
    loss = trainer.model.loss

    def cut_at_step_8(x, y=None, **options):
        if trainer.step + 1 == 8:
            raise PowerCut
        return loss(x, y, **options)

    monkeypatch.setattr(trainer.model, "loss", cut_at_step_8)
    with pytest.raises(PowerCut):
        trainer.run()
    run = trainer.run_dir
    Trainer(resume_settings(run), resume=run, progress=False).run()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 5, 7, 9, 10, 12]
    events = EventAccumulator(str(run / "tensorboard")).Reload().Scalars("loss")
    assert [e.step for e in events] == [r["step"] for r in records]
    assert [e.value for e in events] == pytest.approx([r["loss"] for r in records])


# A result as zoo bench recorded it before metrics owned their options (zoo-bench/1): every
# metric carried all the settings, the metric-specific ones included.
OLD_ENTRY = {
    "metric": "fid",
    "settings": {
        "split": "test", "n": 8, "seed": 0, "batch_size": 64, "device": "cpu", "data": "abc",
        "fid_features": "classifier", "fid_weights": None, "classifiers": None,
        "edit_strength": 1.0, "edit_intensity": None, "throughput_batch_size": 64,
        "precision": "auto", "throughput_repeats": 5,
    },
    "values": {"FD-attr": 3.5},
    "headline": {"FD-attr": "3.50"},
    "data": {"name": "synthetic-faces", "split": "test", "n": 8},
    "date": "2026-11-30 10:00 UTC",
}  # fmt: skip


def test_results_recorded_before_metric_options_still_load_and_new_ones_record_them(
    one_run, tmp_path
):
    run = copy_of(one_run, tmp_path)
    (run / BENCH_FILE).write_text(json.dumps({"old": OLD_ENTRY}))
    checkpoint = run / "model.safetensors"
    done = invoke(
        "bench", checkpoint, "--metric", "throughput", "--option", "throughput.repeats=1",
        "--throughput-batch-size", 2, "--n", 2, "--no-progress", "--device", "cpu",
        "--out", tmp_path / "results.json",
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "is damaged" not in done.output
    results = json.loads((run / BENCH_FILE).read_text())
    assert results["old"] == OLD_ENTRY  # kept as it was
    [new] = [entry for key, entry in results.items() if key != "old"]
    assert new["metric"] == "throughput"
    own = {k: v for k, v in new["settings"].items() if k.startswith("throughput.")}
    assert own == {
        "throughput.batch_size": 2, "throughput.repeats": 1, "throughput.precision": "auto",
    }  # fmt: skip
    assert not any(k.startswith(("fid", "edit")) for k in new["settings"])
    _, body = card_parts(run / "README.md")
    assert "fid_features=classifier" in body and "throughput.repeats=1" in body
