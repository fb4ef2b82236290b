"""The trainer: runs, logs, samples, saves, resumes at the right step, handles NaN and Ctrl-C."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import signal
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import zoo
from zoo import run
from zoo.checkpoint import load_train_state
from zoo.curves import read_records, write_run_curves
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


def nan_loss(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**losses, "loss": losses["loss"] * float("nan")}


def infinite_loss(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**losses, "loss": losses["loss"] * float("inf")}


def infinite_gradient(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The loss stays finite; the gradient flowing back from it is infinite."""
    losses["loss"].register_hook(lambda grad: grad * float("inf"))
    return losses


# docs/reliability.md: the loss or the gradient becomes NaN or Inf
@pytest.mark.parametrize("poison", [nan_loss, infinite_loss, infinite_gradient])
def test_a_non_finite_step_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    faces, tmp_path, monkeypatch, poison
):
    trainer = Trainer(settings(faces, tmp_path, max_steps=6, save_every=2), progress=False)
    original = trainer.model.loss

    def poisoned(x, y=None, **kwargs):
        losses = original(x, y, **kwargs)
        return poison(losses) if trainer.step == 4 else losses

    monkeypatch.setattr(trainer.model, "loss", poisoned)
    with pytest.raises(ZooError) as error:
        trainer.run()
    message, checkpoint = str(error.value), trainer.run_dir / "model.safetensors"
    assert "loss or gradient is not finite at step 5" in message and "\n" not in message
    assert f"the last good checkpoint {checkpoint} is from step 4" in message
    assert zoo.read_info(checkpoint).training["steps"] == 4


# docs/reliability.md: the loss or the gradient becomes NaN or Inf
@pytest.mark.parametrize("poison", [nan_loss, infinite_gradient])
def test_a_non_finite_step_can_be_skipped_with_a_warning(
    faces, tmp_path, monkeypatch, caplog, poison
):
    trainer = Trainer(settings(faces, tmp_path, max_steps=4, on_nan="skip"), progress=False)
    original = trainer.model.loss
    calls = []

    def poisoned(x, y=None, **kwargs):
        calls.append(1)
        losses = original(x, y, **kwargs)
        return poison(losses) if len(calls) == 2 else losses

    monkeypatch.setattr(trainer.model, "loss", poisoned)
    with caplog.at_level(logging.WARNING, logger="zoo"):
        result = trainer.run()
    assert result.step == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["non-finite loss or gradient at step 2; step skipped"]
    weights = zoo.load(result.run_dir / "model.safetensors").state_dict().values()
    assert all(torch.isfinite(t).all() for t in weights)


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses_only(run) -> list[dict]:
    """The metrics log without its timings, which differ between any two runs."""
    return [
        {k: v for k, v in r.items() if k not in ("img_per_s", "wall_time_s")} for r in records(run)
    ]


def signal_after_optimizer_step(monkeypatch, trainer, at_step: int, times: int = 1) -> None:
    """Press Ctrl-C (a real SIGINT to this process) right after the optimizer updated the weights
    of step ``at_step``, before the trainer counted the step: the moment an interrupt must not
    split."""
    original = trainer.optimizer.step

    def step_then_interrupt(*args, **kwargs):
        result = original(*args, **kwargs)
        if trainer.step + 1 == at_step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(trainer.optimizer, "step", step_then_interrupt)


# docs/reliability.md: you press Ctrl-C during training
def test_ctrl_c_takes_effect_at_the_end_of_the_step(faces, tmp_path, monkeypatch):
    straight = Trainer(settings(faces, tmp_path / "a", max_steps=8, log_every=3), progress=False)
    straight.run()

    handler_before = signal.getsignal(signal.SIGINT)
    trainer = Trainer(settings(faces, tmp_path / "b", max_steps=8, log_every=3), progress=False)
    signal_after_optimizer_step(monkeypatch, trainer, at_step=4)
    result = trainer.run()
    assert result.interrupted and result.step == 4
    assert signal.getsignal(signal.SIGINT) is handler_before
    assert load_train_state(result.run_dir / "train_state.safetensors").step == 4

    resumed = Trainer(resume_settings(result.run_dir), resume=result.run_dir, progress=False)
    assert resumed.step == 4 and resumed.run().step == 8
    assert losses_only(result.run_dir) == losses_only(straight.run_dir)
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


# docs/reliability.md: you press Ctrl-C during training
def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_save(faces, tmp_path, monkeypatch):
    at_five = Trainer(settings(faces, tmp_path / "a", max_steps=5), progress=False)
    at_five.run()

    trainer = Trainer(settings(faces, tmp_path / "b", max_steps=10), progress=False)
    signal_after_optimizer_step(monkeypatch, trainer, at_step=7, times=2)  # saves at 5 and 10
    result = trainer.run()
    assert result.interrupted and result.step == 5
    state = load_train_state(result.run_dir / "train_state.safetensors")
    assert state.step == 5  # the weights stepped a seventh time were not saved
    for name, tensor in at_five.model.state_dict().items():
        assert torch.equal(tensor, state.model_state[name]), name


def test_training_in_another_thread_leaves_sigint_alone(faces, tmp_path):
    handler_before = signal.getsignal(signal.SIGINT)
    trainer = Trainer(settings(faces, tmp_path, max_steps=2), progress=False)
    results, errors = [], []

    def train_in_thread():
        try:
            results.append(trainer.run())
        except Exception as error:  # a handler installed off the main thread raises ValueError
            errors.append(error)

    thread = threading.Thread(target=train_in_thread)
    thread.start()
    thread.join(timeout=120)
    assert errors == [] and results[0].step == 2 and not results[0].interrupted
    assert signal.getsignal(signal.SIGINT) is handler_before


class PowerCut(Exception):
    """Stands in for a kill: the process stops mid-step and saves nothing more."""


# docs/reliability.md: the process is killed (`kill -9`, power loss)
def test_every_step_is_in_one_record_after_kills_ctrl_c_and_resumes(faces, tmp_path, monkeypatch):
    def run_settings(out):  # records every 4 steps and at epoch ends (5 steps), saves every 3
        return settings(faces, out, epochs=10, max_steps=20, log_every=4, save_every=3)

    straight = Trainer(run_settings(tmp_path / "a"), progress=False)
    straight.run()

    def cut_power_during(trainer, step):
        original = trainer.model.loss

        def loss(x, y=None, **kwargs):
            if trainer.step + 1 == step:
                raise PowerCut
            return original(x, y, **kwargs)

        monkeypatch.setattr(trainer.model, "loss", loss)

    trainer = Trainer(run_settings(tmp_path / "b"), progress=False)
    run = trainer.run_dir
    cut_power_during(trainer, 8)  # last save at 6, last record at 5: step 6 only in the state
    with pytest.raises(PowerCut):
        trainer.run()
    trainer = Trainer(resume_settings(run), resume=run, progress=False)
    cut_power_during(trainer, 15)  # last save at 12, last record at 14: resume drops it
    with pytest.raises(PowerCut):
        trainer.run()
    assert records(run)[-1]["step"] == 14
    trainer = Trainer(resume_settings(run), resume=run, progress=False)
    assert trainer.step == 12 and records(run)[-1]["step"] == 10
    signal_after_optimizer_step(monkeypatch, trainer, at_step=17)
    assert trainer.run().interrupted
    trainer = Trainer(resume_settings(run), resume=run, progress=False)
    assert trainer.step == 17 and trainer.run().step == 20

    assert [r["step"] for r in records(run)] == [4, 5, 9, 10, 14, 15, 19, 20]
    assert losses_only(run) == losses_only(straight.run_dir)
    assert trainer.images_seen == straight.images_seen


# docs/reliability.md: the process is killed (`kill -9`, power loss)
def test_resume_removes_the_temporary_files_of_killed_writes(faces, tmp_path):
    result = Trainer(settings(faces, tmp_path, max_steps=2), progress=False).run()
    run = result.run_dir
    stale = [".model.safetensors.tmp-4242", ".train_state.safetensors.tmp-17", ".config.json.tmp-9"]
    kept = ["notes.tmp-1", ".model.safetensors.tmp-x1", "mine.txt", ".hidden"]
    for name in stale + kept:
        (run / name).write_bytes(b"half a file")
    resumed = Trainer(resume_settings(run, max_steps=3), resume=run, progress=False)
    resumed.run()
    for name in stale:
        assert not (run / name).exists(), name
    for name in kept:
        assert (run / name).read_bytes() == b"half a file", name
    assert [p.name for p in run.iterdir() if ".tmp-" in p.name and p.name not in kept] == []


def test_a_damaged_logging_window_in_the_resume_file_is_one_line(faces, tmp_path):
    run = Trainer(settings(faces, tmp_path, max_steps=2), progress=False).run().run_dir
    path = run / "train_state.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    extra = json.loads(metadata["extra"])
    extra["window"] = {"keys": ["loss"], "sums": "many", "steps": 1, "images": 1, "elapsed": 0}
    save_file(tensors, str(path), metadata={**metadata, "extra": json.dumps(extra)})
    with pytest.raises(ZooError, match="logging window; the run folder is damaged"):
        Trainer(resume_settings(run, max_steps=3), resume=run, progress=False)


# docs/reliability.md: a run's metrics.jsonl or config.json is damaged
def test_lines_of_the_metrics_log_that_are_not_records_never_stop_curves_or_a_resume(
    faces, tmp_path, caplog
):
    run = Trainer(settings(faces, tmp_path, max_steps=4), progress=False).run().run_dir
    log = run / "metrics.jsonl"
    good = log.read_bytes()
    log.write_bytes(good + b'{"step": 3, "loss": "\xff\xfe"}\n{"step": 4, "epoch": "two"}\n[1]\n')
    assert [r["step"] for r in read_records(run)] == [2, 4]
    assert "skipped 3 line(s) that are not zoo records (line 3 first)" in caplog.text
    assert write_run_curves(run) is not None  # the picture is drawn from the good records
    resumed = Trainer(resume_settings(run, max_steps=8), resume=run, progress=False)
    assert resumed.run().step == 8  # it saved (and drew its curves) at steps 5 and 8
    assert log.read_bytes().startswith(good) and b"two" not in log.read_bytes()


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00", "is not a zoo run config"),
        (b'{"settings": {"model": "cvae", "epochs": "two"}}', "setting epochs is 'two', not"),
        (b'{"settings": {"model": "cvae", "flip": 1}}', "setting flip is 1, not"),
        (b'{"settings": {"model": "cvae", "surprise": 1}}', "is not a zoo run config"),
        (b"[" * 100_000, "is not a zoo run config"),
    ],
)
def test_a_damaged_run_config_is_one_line(faces, tmp_path, content, fragment):
    run = Trainer(settings(faces, tmp_path, max_steps=2), progress=False).run().run_dir
    (run / "config.json").write_bytes(content)
    with pytest.raises(ZooError, match=fragment) as caught:
        resume_settings(run)
    assert str(run / "config.json") in str(caught.value) and "\n" not in str(caught.value)


# docs/reliability.md: `--resume` points at data that changed, or at a folder
def test_resume_of_a_folder_that_never_saved(faces, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZooError, match="config.json is missing"):
        resume_settings(tmp_path / "empty")
    started = Trainer(settings(faces, tmp_path), progress=False).run_dir  # killed before a save
    with pytest.raises(ZooError) as error:
        Trainer(resume_settings(started), resume=started, progress=False)
    message = str(error.value)
    assert f"cannot resume {started}: train_state.safetensors is missing" in message
    assert "start a new run" in message and "\n" not in message


# docs/reliability.md: `--resume` points at data that changed, or at a folder
def test_resume_on_data_that_changed_since_the_run_started(faces, tmp_path):
    data = shutil.copytree(faces, tmp_path / "faces")
    run = Trainer(settings(str(data), tmp_path, max_steps=2), progress=False).run().run_dir
    image = next((data / "img_align_celeba").iterdir())
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched
    with pytest.raises(ZooError) as error:
        Trainer(resume_settings(run, max_steps=3), resume=run, progress=False)
    message = str(error.value)
    assert f"cannot resume {run}: its data ({data.resolve()}) has changed since" in message
    assert "start a new run" in message and "\n" not in message


def test_unconditional_model_on_the_same_data(faces, tmp_path):
    result = Trainer(settings(faces, tmp_path, model="beta-vae", max_steps=2), progress=False).run()
    model = zoo.load(result.run_dir / "model.safetensors")
    assert model.config.beta == 4.0 and not model.conditional


def test_bad_settings_are_clear_errors(faces, tmp_path):
    with pytest.raises(ZooError, match="--batch-size must be at least 1"):
        Trainer(settings(faces, tmp_path, batch_size=0), progress=False)
    with pytest.raises(ZooError, match="unknown model"):
        Trainer(settings(faces, tmp_path, model="nope"), progress=False)


def test_epoch_order_and_flips_are_a_function_of_seed_and_epoch():
    plan = run.epoch_plan(50, 1, 3)
    assert torch.equal(plan.order, run.epoch_plan(50, 1, 3).order)
    assert not torch.equal(plan.order, run.epoch_plan(50, 1, 4).order)
    assert sorted(plan.order.tolist()) == list(range(50))
    assert torch.equal(plan.flips, run.epoch_plan(50, 1, 3).flips)
    assert not torch.equal(plan.flips, run.epoch_plan(50, 1, 4).flips)
    assert plan.flips.dtype == torch.bool and 10 < int(plan.flips.sum()) < 40


def test_bf16_on_the_cpu_trains_in_bf16_and_learns(faces, tmp_path):
    """--precision bf16: the convolutions run in bf16 under autocast, the loss falls, and the
    saved weights are fp32 and finite."""
    trainer = Trainer(settings(faces, tmp_path, precision="bf16", max_steps=10), progress=False)
    seen = set()
    first_conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))

    def note_dtype(module, inputs, output):
        if module.training:  # the training steps (sample grids decode in eval mode, in fp32)
            seen.add(output.dtype)

    first_conv.register_forward_hook(note_dtype)
    result = trainer.run()
    assert seen == {torch.bfloat16} and result.summary["precision"] == "bf16"
    losses = [r["loss"] for r in records(result.run_dir)]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    weights = load_file(result.run_dir / "model.safetensors")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())


def test_kl_warmup_weights_the_kl_term_linearly(faces, tmp_path):
    trainer = Trainer(
        settings(faces, tmp_path, kl_warmup_steps=4, max_steps=6, log_every=1, precision="fp32"),
        progress=False,
    )
    logged = records(trainer.run().run_dir)
    assert [r["kl_weight"] for r in logged] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    for record in logged:  # one step per record: loss = recon + weight x KL
        expected = record["recon"] + record["kl_weight"] * record["kl"]
        assert record["loss"] == pytest.approx(expected, rel=1e-5)


def test_compile_trains_through_the_compiled_step_and_saves_plain_weights(
    faces, tmp_path, monkeypatch
):
    """--compile through the trainer: the step runs in the torch.compile'd module, and the
    checkpoint and resume state hold the model's own names (no ``_orig_mod.`` prefix). The
    suite compiles with dynamo's eager backend (inductor's C++ build takes a minute on 2
    cores); the speed lab times the real one."""
    compile_eagerly = functools.partial(torch.compile, backend="eager")
    monkeypatch.setattr(torch, "compile", compile_eagerly)
    plain = Trainer(
        settings(faces, tmp_path / "plain", max_steps=4, precision="fp32"), progress=False
    )
    expected = [r["loss"] for r in records(plain.run().run_dir)]  # first: the noise is global
    compiled = Trainer(
        settings(faces, tmp_path / "compiled", max_steps=4, precision="fp32", compile=True),
        progress=False,
    )
    assert isinstance(compiled.trainable, torch._dynamo.eval_frame.OptimizedModule)
    ran = compiled.run()
    assert ran.summary["compiled"] is True
    loaded = zoo.load(ran.run_dir / "model.safetensors")  # names match the plain model
    assert set(loaded.state_dict()) == set(plain.model.state_dict())
    assert [r["loss"] for r in records(ran.run_dir)] == pytest.approx(expected, rel=1e-5)
    resumed = Trainer(resume_settings(ran.run_dir, max_steps=6), resume=ran.run_dir, progress=False)
    assert resumed.run().step == 6
