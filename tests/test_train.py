"""The trainer: runs, logs, samples, saves, resumes at the right step, handles NaN and Ctrl-C."""

from __future__ import annotations

import json

import pytest
import torch

import zoo
from zoo import train
from zoo.errors import ZooError
from zoo.train import Trainer, TrainSettings, resume_settings

TINY = {"base_channels": 4, "max_channels": 8, "latent_dim": 4}


@pytest.fixture
def faces(synthetic_faces):
    return synthetic_faces


def settings(faces, tmp_path, **overrides) -> TrainSettings:
    values = dict(
        model="cvae",
        model_config=dict(TINY),
        data=faces,
        image_size=16,
        epochs=2,
        batch_size=16,
        out=str(tmp_path / "runs"),
        device="cpu",
        log_every=2,
    )
    values.update(overrides)
    return TrainSettings(**values)


def test_a_run_writes_weights_samples_logs_and_config(faces, tmp_path):
    trainer = Trainer(settings(faces, tmp_path), progress=False)
    result = trainer.run()
    run = result.run_dir
    assert result.step == result.total_steps == 2 * trainer.steps_per_epoch
    assert run.parent == tmp_path / "runs" and run.name.startswith("cvae-")
    model = zoo.load(run / "model.safetensors")
    assert model.config.num_attributes == len(trainer.data.attr_names)
    info = model.checkpoint_info
    assert info.attr_names == trainer.data.attr_names
    assert info.training["steps"] == result.step and info.training["seed"] == 0
    assert info.data["fingerprint"] == trainer.data.fingerprint
    assert info.preprocess["image_size"] == 16
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == result.step
    assert all({"loss", "recon", "kl", "img_per_s"} <= set(r) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    grids = sorted((run / "samples").glob("*.png"))
    assert len(grids) == 2  # one per epoch
    config = json.loads((run / "config.json").read_text())
    assert config["settings"]["model"] == "cvae" and config["model_config"]["latent_dim"] == 4


def test_max_steps_bounds_the_run(faces, tmp_path):
    result = Trainer(settings(faces, tmp_path, max_steps=3), progress=False).run()
    assert result.step == 3


# FiLM, the latent adversary (its ramp clock is a buffer), the attribute head and the critic
EVERY_EDIT_MECHANISM = {
    **TINY,
    "film": True,
    "adversary_weight": 1.0,
    "adversary_warmup": 6,
    "attr_weight": 1.0,
    "head_noise": 0.1,
    "realism_weight": 1.0,
}


@pytest.mark.parametrize(("model", "config"), [("cvae", TINY), ("edit-cvae", EVERY_EDIT_MECHANISM)])
def test_resume_continues_at_the_saved_step_with_identical_losses(faces, tmp_path, model, config):
    def run_settings(out, **overrides):
        return settings(faces, out, model=model, model_config=dict(config), **overrides)

    straight = Trainer(run_settings(tmp_path / "a", max_steps=8, save_every=4), progress=False)
    straight.run()
    full = [json.loads(x) for x in (straight.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert set(full[-1]) >= set(straight.model.loss(*straight.preview))  # every term is logged

    first = Trainer(run_settings(tmp_path / "b", max_steps=4, save_every=4), progress=False)
    first.run()
    resumed = Trainer(
        resume_settings(first.run_dir, max_steps=8), resume=first.run_dir, progress=False
    )
    assert resumed.step == 4
    result = resumed.run()
    assert result.step == 8
    split = [json.loads(x) for x in (first.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in split] == [r["step"] for r in full]
    for a, b in zip(full, split, strict=True):
        for key in set(a) - {"img_per_s", "wall_time_s"}:
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    assert zoo.read_info(first.run_dir / "model.safetensors").training["steps"] == 8


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    faces, tmp_path, monkeypatch
):
    trainer = Trainer(settings(faces, tmp_path, max_steps=6, save_every=2), progress=False)
    original = trainer.model.loss

    def poisoned(x, y=None, **kwargs):
        losses = original(x, y, **kwargs)
        if trainer.step == 4:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(trainer.model, "loss", poisoned)
    with pytest.raises(ZooError, match="loss or gradient is not finite at step 5.*from step 4"):
        trainer.run()
    assert zoo.read_info(trainer.run_dir / "model.safetensors").training["steps"] == 4


def test_nan_loss_can_be_skipped(faces, tmp_path, monkeypatch):
    trainer = Trainer(settings(faces, tmp_path, max_steps=4, on_nan="skip"), progress=False)
    original = trainer.model.loss
    calls = []

    def poisoned(x, y=None, **kwargs):
        calls.append(1)
        losses = original(x, y, **kwargs)
        return {**losses, "loss": losses["loss"] * float("nan")} if len(calls) == 2 else losses

    monkeypatch.setattr(trainer.model, "loss", poisoned)
    result = trainer.run()
    assert result.step == 4
    weights = zoo.load(result.run_dir / "model.safetensors").state_dict().values()
    assert all(torch.isfinite(t).all() for t in weights)


def test_ctrl_c_saves_and_can_resume(faces, tmp_path, monkeypatch):
    trainer = Trainer(settings(faces, tmp_path, max_steps=6, save_every=100), progress=False)
    original = trainer.train_step

    def interrupt_at_three(x, y):
        if trainer.step == 3:
            raise KeyboardInterrupt
        return original(x, y)

    monkeypatch.setattr(trainer, "train_step", interrupt_at_three)
    result = trainer.run()
    assert result.interrupted and result.step == 3
    resumed = Trainer(resume_settings(result.run_dir), resume=result.run_dir, progress=False)
    assert resumed.step == 3 and resumed.run().step == 6


def test_resume_of_a_folder_that_never_saved(faces, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZooError, match="config.json is missing"):
        resume_settings(tmp_path / "empty")


def test_unconditional_model_on_the_same_data(faces, tmp_path):
    result = Trainer(settings(faces, tmp_path, model="beta-vae", max_steps=2), progress=False).run()
    model = zoo.load(result.run_dir / "model.safetensors")
    assert model.config.beta == 4.0 and not model.conditional


def test_bad_settings_are_clear_errors(faces, tmp_path):
    with pytest.raises(ZooError, match="--batch-size must be at least 1"):
        Trainer(settings(faces, tmp_path, batch_size=0), progress=False)
    with pytest.raises(ZooError, match="unknown model"):
        Trainer(settings(faces, tmp_path, model="nope"), progress=False)


def test_epoch_order_is_a_function_of_seed_and_epoch():
    assert torch.equal(train.epoch_order(50, 1, 3), train.epoch_order(50, 1, 3))
    assert not torch.equal(train.epoch_order(50, 1, 3), train.epoch_order(50, 1, 4))
