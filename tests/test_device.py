"""`--precision auto`: bf16 only where a probe measures it clearly faster, cached per machine."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from zoo import device, precision, run, step
from zoo.errors import ZooError
from zoo.precision import BF16_SPEEDUP_NEEDED, PRECISION_FILE, StepTimes

CPU = torch.device("cpu")


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """A fresh cache and an injected probe: set ``probe.times``; ``probe.calls`` counts runs."""

    class FakeProbe:
        times = StepTimes(fp32=2.0, bf16=1.0)
        calls = 0

        def __call__(self, where: torch.device) -> StepTimes:
            assert where == CPU
            self.calls += 1
            return self.times

    fake = FakeProbe()
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "fresh-cache"))
    monkeypatch.setattr(run, "measure_step_times", fake)  # the probe zoo train passes
    return fake


def choose_precision(where: torch.device, requested: str) -> precision.PrecisionChoice:
    """`zoo.precision.choose_precision` with the probe zoo train gives it (faked above)."""
    return precision.choose_precision(where, requested, run.measure_step_times)


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
    choice = choose_precision(CPU, "auto")
    assert choice.precision == expected
    assert f"{fp32 / bf16:.2f}x the speed of fp32 on {device.cpu_name()}" in choice.reason
    assert "measured now" in choice.reason and probe.calls == 1


def test_an_explicit_precision_never_runs_the_probe(probe):
    assert str(choose_precision(CPU, "fp32")) == "fp32 (requested)"
    assert choose_precision(CPU, "bf16").precision == "bf16"
    with pytest.raises(ZooError, match="unknown precision 'fp16'; use auto, fp32 or bf16"):
        choose_precision(CPU, "fp16")
    assert probe.calls == 0


def test_the_probe_result_is_cached_per_machine_and_torch_version(probe, tmp_path, monkeypatch):
    first = choose_precision(CPU, "auto")
    again = choose_precision(CPU, "auto")
    assert probe.calls == 1 and again.precision == first.precision == "bf16"
    assert "cached" in again.reason and "measured now" in first.reason
    [key] = cache_entries(tmp_path)
    assert device.cpu_name() in key and torch.__version__ in key

    probe.times = StepTimes(fp32=1.0, bf16=1.0)
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert choose_precision(CPU, "auto").precision == "fp32" and probe.calls == 2
    monkeypatch.setattr(precision, "cpu_name", lambda: "Another CPU 3000")
    assert choose_precision(CPU, "auto").precision == "fp32" and probe.calls == 3
    entries = cache_entries(tmp_path)
    assert len(entries) == 3 and any("Another CPU 3000 | torch 9.9.9" in key for key in entries)
    assert all(math.isclose(e["speedup"], e["fp32_s"] / e["bf16_s"]) for e in entries.values())


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\xff\xfe\x00", b"[1, 2]", b'"text"', b"{}", b'{"cpu: x": 3}', "entry"],
)
def test_a_corrupt_cache_is_ignored_and_rewritten(probe, tmp_path, content):
    path = tmp_path / "fresh-cache" / PRECISION_FILE
    path.parent.mkdir(parents=True)
    if content == "entry":  # this machine's entry, with a timing that is not a positive number
        key = precision.probe_key(CPU)
        content = json.dumps({key: {"fp32_s": "NaN", "bf16_s": 1.0}}).encode()
    path.write_bytes(content)
    assert choose_precision(CPU, "auto").precision == "bf16" and probe.calls == 1
    assert cache_entries(tmp_path)[precision.probe_key(CPU)]["speedup"] == 2.0
    assert choose_precision(CPU, "auto").precision == "bf16" and probe.calls == 1
    assert [p.name for p in path.parent.iterdir()] == [PRECISION_FILE]  # no temp file left


def test_a_cache_file_that_cannot_be_written_only_warns(probe, tmp_path, caplog):
    folder = tmp_path / "fresh-cache" / PRECISION_FILE
    folder.mkdir(parents=True)  # a folder where the file should be: unreadable and unwritable
    assert choose_precision(CPU, "auto").precision == "bf16"
    assert "could not store the precision probe" in caplog.text
    assert [p.name for p in folder.parent.iterdir()] == [PRECISION_FILE]


def test_cuda_uses_bf16_where_the_gpu_supports_it(probe, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda where: "Some GPU")
    for supported, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        choice = choose_precision(torch.device("cuda"), "auto")
        assert choice.precision == expected and "Some GPU" in choice.reason
    assert choose_precision(torch.device("mps"), "auto").precision == "fp32"
    assert probe.calls == 0


def test_the_real_probe_times_both_precisions_and_leaves_the_process_as_it_was():
    threads = torch.get_num_threads()
    rng = torch.get_rng_state()
    times = step.measure_step_times(CPU)
    assert 0 < times.fp32 < 10 and 0 < times.bf16 < 10
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)


def test_zoo_train_names_the_precision_and_why_on_its_first_line(probe, synthetic_faces, tmp_path):
    args = ["train", "cvae", "--data", synthetic_faces, "--max-steps", "1", "--batch-size", "8",
            "--image-size", "16", "--latent-dim", "4", "-o", "base_channels=4",
            "-o", "max_channels=8", "--out", str(tmp_path / "runs"), "--no-progress",
            "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    first = result.stdout.splitlines()[0]
    assert (
        f"on cpu, precision bf16 (auto: bf16 measured 2.00x the speed of fp32 on "
        f"{device.cpu_name()}, measured now)" in first
    ), first


FAULTS_SCRIPT = """
import resource, sys, torch
import zoo
from zoo.device import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "on" else False
if len(sys.argv) > 2:  # asked only whether it applies
    sys.exit(print(applied, 0))
torch.manual_seed(0)
model = zoo.create_model("cvae", num_attributes=4, image_size=64)
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
