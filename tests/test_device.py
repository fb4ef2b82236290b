"""`--precision auto`: bf16 only where a probe of the run's own step measures it clearly
faster, cached per machine and step."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli import app
from zoo import device, precision, run, step
from zoo.errors import ZooError
from zoo.precision import BF16_SPEEDUP_NEEDED, PRECISION_FILE, StepTimes
from zoo.train import Trainer, TrainSettings

CPU = torch.device("cpu")


SUBJECT = "cvae [0123abcd] at 64x3x64x64, 2 threads"


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """A fresh cache and a fake probe: set ``probe.times``; ``probe.calls`` counts runs. It
    stands in for `zoo.step.measure_step_times` where zoo train calls it."""

    class FakeProbe:
        times = StepTimes(fp32=2.0, bf16=1.0)
        calls = 0

        def __call__(self, step=None, where: torch.device = CPU) -> StepTimes:
            assert where == CPU
            self.calls += 1
            return self.times

    fake = FakeProbe()
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "fresh-cache"))
    monkeypatch.setattr(run, "measure_step_times", fake)
    return fake


def choose(
    where: torch.device, requested: str, subject: str = SUBJECT, unprobed: str | None = None
) -> precision.PrecisionChoice:
    """`zoo.precision.choose_precision` with the fake probe."""
    return precision.choose_precision(
        where, requested, run.measure_step_times, subject, unprobed=unprobed
    )


def cache_entries(tmp_path) -> dict:
    return json.loads((tmp_path / "fresh-cache" / PRECISION_FILE).read_text())


@pytest.mark.parametrize(
    ("fp32", "bf16", "expected"),
    [(2.0, 1.0, "bf16"), (1.0, 1.0 / BF16_SPEEDUP_NEEDED, "bf16"), (1.0, 0.9, "fp32"),
     (1.0, 2.0, "fp32")],
)  # fmt: skip
def test_auto_picks_bf16_only_when_the_probe_measures_it_clearly_faster(
    probe, fp32, bf16, expected
):
    probe.times = StepTimes(fp32=fp32, bf16=bf16)
    choice = choose(CPU, "auto")
    assert choice.precision == expected
    speed = f"{fp32 / bf16:.2f}x the speed of fp32 for {SUBJECT} on {device.cpu_name()}"
    assert speed in choice.reason
    assert "measured now" in choice.reason and probe.calls == 1


def test_an_explicit_precision_never_runs_the_probe(probe):
    assert str(choose(CPU, "fp32")) == "fp32 (requested)"
    assert choose(CPU, "bf16").precision == "bf16"
    with pytest.raises(ZooError, match="unknown precision 'fp16'; use auto, fp32 or bf16"):
        choose(CPU, "fp16")
    assert probe.calls == 0


def test_the_probe_result_is_cached_per_cpu_flags_torch_version_and_subject(
    probe, tmp_path, monkeypatch
):
    first = choose(CPU, "auto")
    again = choose(CPU, "auto")
    assert probe.calls == 1 and again.precision == first.precision == "bf16"
    assert "cached" in again.reason and "measured now" in first.reason
    [key] = cache_entries(tmp_path)
    assert device.cpu_name() in key and torch.__version__ in key and key.endswith(SUBJECT)

    probe.times = StepTimes(fp32=1.0, bf16=1.0)  # every change below measures again
    assert choose(CPU, "auto", subject="cvae [0123abcd] at 16x3x64x64, 2 threads").precision == (
        "fp32"
    )
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert choose(CPU, "auto").precision == "fp32"
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2"})  # one name, other flags
    assert choose(CPU, "auto").precision == "fp32"
    monkeypatch.setattr(precision, "cpu_name", lambda: "Another CPU 3000")
    assert choose(CPU, "auto").precision == "fp32" and probe.calls == 5
    entries = cache_entries(tmp_path)
    assert len(entries) == 5 and any("Another CPU 3000 | flags" in key for key in entries)
    assert all(math.isclose(e["speedup"], e["fp32_s"] / e["bf16_s"]) for e in entries.values())


def test_a_run_too_short_to_probe_trains_in_fp32_unless_a_probe_is_stored(probe):
    short = choose(CPU, "auto", unprobed="the run has 3 steps")
    assert str(short) == "fp32 (auto: not probed (the run has 3 steps))" and probe.calls == 0
    assert choose(CPU, "auto").precision == "bf16" and probe.calls == 1  # a long run probes
    cached = choose(CPU, "auto", unprobed="the run has 3 steps")
    assert cached.precision == "bf16" and "cached" in cached.reason and probe.calls == 1


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\xff\xfe\x00", b"[1, 2]", b'"text"', b"{}", b'{"cpu: x": 3}', "entry"],
)
def test_a_corrupt_cache_is_ignored_and_rewritten(probe, tmp_path, content):
    path = tmp_path / "fresh-cache" / PRECISION_FILE
    path.parent.mkdir(parents=True)
    key = precision.probe_key(CPU, SUBJECT)
    if content == "entry":  # this machine's entry, with a timing that is not a positive number
        content = json.dumps({key: {"fp32_s": "NaN", "bf16_s": 1.0}}).encode()
    path.write_bytes(content)
    assert choose(CPU, "auto").precision == "bf16" and probe.calls == 1
    assert cache_entries(tmp_path)[key]["speedup"] == 2.0
    assert choose(CPU, "auto").precision == "bf16" and probe.calls == 1
    assert [p.name for p in path.parent.iterdir()] == [PRECISION_FILE]  # no temp file left


def test_a_cache_file_that_cannot_be_written_only_warns(probe, tmp_path, caplog):
    folder = tmp_path / "fresh-cache" / PRECISION_FILE
    folder.mkdir(parents=True)  # a folder where the file should be: unreadable and unwritable
    assert choose(CPU, "auto").precision == "bf16"
    assert "could not store the precision probe" in caplog.text
    assert [p.name for p in folder.parent.iterdir()] == [PRECISION_FILE]


def test_cuda_uses_bf16_where_the_gpu_supports_it(probe, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda where: "Some GPU")
    for supported, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        choice = choose(torch.device("cuda"), "auto")
        assert choice.precision == expected and "Some GPU" in choice.reason
    assert choose(torch.device("mps"), "auto").precision == "fp32"
    assert probe.calls == 0


def test_the_probe_alternates_the_precisions_after_warm_up_and_takes_medians(monkeypatch):
    calls = []
    now = [0.0]  # a fake clock: a step "takes" 1 s in fp32 and 3 s in bf16

    def fake_step(which: str) -> None:
        calls.append(which)
        slow = len(calls) == 2 * step.PROBE_WARMUP_ROUNDS + 5  # one outlier: medians ignore it
        now[0] += (1.0 if which == "fp32" else 3.0) * (100 if slow else 1)

    monkeypatch.setattr(step.time, "perf_counter", lambda: now[0])
    times = step.measure_step_times(fake_step, CPU)
    assert (times.fp32, times.bf16) == (1.0, 3.0)
    assert calls[: 2 * step.PROBE_WARMUP_ROUNDS] == ["fp32", "bf16"] * step.PROBE_WARMUP_ROUNDS
    timed = calls[2 * step.PROBE_WARMUP_ROUNDS :]
    assert timed == ["fp32", "bf16"] * (len(timed) // 2)
    assert len(timed) // 2 == step.PROBE_MIN_ROUNDS  # 4 s a round: 5 rounds pass 2 s


def test_the_real_probe_times_the_runs_own_step_and_leaves_the_run_as_it_was(
    synthetic_faces, tmp_path, monkeypatch
):
    """A run that probes trains exactly as one told the precision the probe chose."""
    monkeypatch.setattr(run, "PROBE_MIN_STEPS", 1)
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "fresh-cache"))

    def trained(requested: str, out: str) -> tuple[Trainer, dict]:
        settings = TrainSettings(
            model="cvae", data=synthetic_faces, image_size=16, batch_size=8, max_steps=4,
            model_config={"latent_dim": 4, "base_channels": 4, "max_channels": 8},
            precision=requested, device="cpu", out=str(tmp_path / out), log_every=1,
        )  # fmt: skip
        trainer = Trainer(settings, progress=False)
        trainer.run()
        return trainer, load_file(trainer.run_dir / trainer.weights_file)

    probed, probed_weights = trained("auto", "probed")
    choice = probed.precision_choice
    threads = torch.get_num_threads()
    assert "for cvae [" in choice.reason and f"] at 8x3x16x16, {threads} threads" in choice.reason
    assert "measured now" in choice.reason
    told, told_weights = trained(choice.precision, "told")
    assert str(told.precision_choice) == f"{choice.precision} (requested)"
    assert probed_weights.keys() == told_weights.keys()
    assert all(torch.equal(probed_weights[k], told_weights[k]) for k in told_weights)


def test_zoo_train_names_the_precision_and_why_on_its_first_line(
    probe, synthetic_faces, tmp_path, monkeypatch
):
    args = ["train", "cvae", "--data", synthetic_faces, "--max-steps", "1", "--batch-size", "8",
            "--image-size", "16", "--latent-dim", "4", "-o", "base_channels=4",
            "-o", "max_channels=8", "--out", str(tmp_path / "runs"), "--no-progress",
            "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    first = result.stdout.splitlines()[0]
    assert "precision fp32 (auto: not probed (the run has 1 steps and the probe runs from" in first
    assert probe.calls == 0

    monkeypatch.setattr(run, "PROBE_MIN_STEPS", 1)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    first = result.stdout.splitlines()[0]
    assert re.search(
        r"on cpu, precision bf16 \(auto: bf16 measured 2\.00x the speed of fp32 for cvae "
        rf"\[[0-9a-f]{{8}}\] at 8x3x16x16, \d+ threads on {re.escape(device.cpu_name())}, "
        r"measured now\)",
        first,
    ), first
    assert probe.calls == 1


FAULTS_SCRIPT = """
import resource, sys, torch
import zoo
from zoo.device import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "on" else False
if len(sys.argv) > 2:  # asked only whether it applies
    sys.exit(print(applied, 0))
torch.manual_seed(0)
# the old decoder tail: full-resolution activations, the large allocations the setting is about
model = zoo.create_model("cvae", num_attributes=4, image_size=64, decoder_tail="deconv")
x, y = torch.rand(8, 3, 64, 64), torch.ones(8, 4)
def step():
    model(x, y)["loss"].backward()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""


def faults_per_step(mode: str, *, count: bool = True, **env: str) -> tuple[bool, float]:
    """(whether the setting was applied, page faults per cvae training step) in a new process;
    without ``count``, no step runs and the faults are 0."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", FAULTS_SCRIPT, mode, *([] if count else ["applied-only"])],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    applied, faults = done.stdout.split()
    return applied == "True", float(faults)


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the allocator setting is glibc's; other platforms keep their allocator",
)
def test_a_training_step_reuses_freed_memory_instead_of_page_faulting_it_back_in():
    _, faults_without = faults_per_step("off")  # about 8,000 at batch 8 on the dev machine
    applied, faults_with = faults_per_step("on")  # about 1,900
    assert applied
    assert faults_with * 3 < faults_without
    # a user who chose glibc's settings through its environment keeps them
    assert faults_per_step("on", count=False, MALLOC_ARENA_MAX="2")[0] is False
