"""Studies: the study file, the statistics, and real studies through the inline and local
(submitit) executors, with failures and kills."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from scipy import stats as scipy_stats
from typer.testing import CliRunner

import cli
from benchmarks.study.spec import load_study
from benchmarks.study.stats import paired, summarize

ROOT = Path(__file__).resolve().parents[1]
# a cvae small and deterministic enough that a resumed run equals an uninterrupted one
TINY = """
[train]
data = "{data}"
image_size = 16
batch_size = 16
latent_dim = 4
precision = "fp32"
deterministic = true
sample_every = 100000
device = "cpu"
"""


def write_study(folder: Path, text: str, data: str) -> Path:
    path = folder / "study.toml"
    # the shared [train] table last: top-level keys must come before any table
    path.write_text(textwrap.dedent(text) + textwrap.dedent(TINY.format(data=data)))
    return path


def study(*args: object, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "study", *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


def results_of(folder: Path) -> dict:
    return json.loads((folder / "bench" / "results.json").read_text())["results"][0]["metrics"]


# --- statistics against answers worked out by hand ---------------------------------------


def test_summary_of_known_numbers_matches_the_hand_computed_t_interval():
    # mean 3, sd sqrt(10 / 4) = 1.58114, t(0.975, 4) = 2.77645: half-width 1.96324
    summary = summarize([1, 2, 3, 4, 5])
    assert summary.n == 5 and summary.mean == 3
    assert summary.sd == pytest.approx(1.5811388, abs=1e-6)
    assert summary.low == pytest.approx(3 - 1.963243, abs=1e-5)
    assert summary.high == pytest.approx(3 + 1.963243, abs=1e-5)
    # two values 0.4 and 0.6: sd 0.141421, t(0.975, 1) = 12.7062, half 12.7062 * 0.1 = 1.27062
    two = summarize([0.4, 0.6])
    assert (two.low, two.high) == pytest.approx((0.5 - 1.270620, 0.5 + 1.270620), abs=1e-5)


def test_one_seed_has_no_interval_and_is_never_called_real():
    one = summarize([0.7])
    assert (one.n, one.mean, one.sd, one.low, one.high) == (1, 0.7, None, None, None)
    comparison = paired([0.9], [0.1])
    assert comparison.low is None and comparison.p_value is None and not comparison.real


def test_a_paired_comparison_that_must_be_real_and_one_that_must_not():
    # differences 1.0, 1.2, 0.9, 1.1: mean 1.05, sd 0.129099, t = 16.26; interval [0.845, 1.255]
    real = paired([1.0, 1.3, 0.8, 1.2], [0.0, 0.1, -0.1, 0.1])
    assert real.real and real.difference == pytest.approx(1.05)
    assert (real.low, real.high) == pytest.approx((0.844574, 1.255426), abs=1e-5)
    assert real.p_value == pytest.approx(
        scipy_stats.ttest_rel([1.0, 1.3, 0.8, 1.2], [0.0, 0.1, -0.1, 0.1]).pvalue
    )
    # differences 0.5, -0.4, 0.1, -0.3: the mean -0.025 is far inside its noise
    noise = paired([0.5, -0.4, 0.1, -0.3], [0.0, 0.0, 0.0, 0.0])
    assert not noise.real and noise.low < 0 < noise.high and noise.p_value > 0.9
    # the same numbers unpaired would hide a real, consistent gap: pairing is what finds it
    assert paired([10.0, 20.0, 30.0], [9.0, 19.1, 28.9]).real


def test_non_finite_values_are_refused():
    with pytest.raises(ValueError, match="finite"):
        summarize([1.0, math.nan])


# --- the study file ------------------------------------------------------------------------


def test_a_study_file_becomes_cells_seed_by_seed_with_a_shared_classifier(tmp_path):
    path = write_study(
        tmp_path,
        """
        seeds = [3, 7]
        baseline = "vae beta=1"
        [grid]
        beta = [1, 2]
        [[models]]
        name = "vae"
        [[models]]
        name = "cvae"
        option = ["base_channels=4"]
        grid = { kl_warmup = [0, 5] }
        [bench]
        metric = ["recon", "edit"]
        """,
        "faces",
    )
    loaded = load_study(path, cli._command_options())
    names = [cell.name for cell in loaded.cells]
    assert (
        names[0].startswith("classifier-") and sum(n.startswith("classifier") for n in names) == 1
    )
    models = loaded.model_cells()
    assert len(models) == 2 * 2 + 2 * 2 and [c.seed for c in models] == [3] * 4 + [7] * 4
    labels = sorted({cell.label for cell in models})
    assert labels == ["cvae kl_warmup=0", "cvae kl_warmup=5", "vae beta=1", "vae beta=2"]
    vae = next(c for c in models if c.label == "vae beta=2" and c.seed == 7)
    assert vae.name == f"{vae.row}-s7" and vae.commands["train"][0] == "vae"
    assert "--beta" in vae.commands["train"] and "--seed" in vae.commands["train"]
    cvae = next(c for c in models if c.label == "cvae kl_warmup=5")
    assert cvae.commands["train"][-4:-2] == ["--option", "base_channels=4"]
    assert cvae.commands["train"][-6:-4] == ["--kl-warmup", "5"]
    assert str((tmp_path / "faces").resolve()) in vae.commands["train"]  # relative to the file
    assert loaded.baseline == next(c.row for c in models if c.label == "vae beta=1")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[models]]\nname = 'vae'\n[bench]\nepoch = 3\n", "`zoo bench` has no option 'epoch'"),
        ("[[models]]\nname = 'vae'\nout = 'x'\n", "out is set by the study itself"),
        ("seeds = 0\n[[models]]\nname = 'vae'\n", "seeds = 0 must be at least 1"),
        ("seed = 1\n[[models]]\nname = 'vae'\n", "unknown key(s) seed"),
        ("baseline = 'cvae'\n[[models]]\nname = 'vae'\n", "baseline 'cvae' is not a row"),
        ("[grid]\nbeta = 2\n[[models]]\nname = 'vae'\n", "grid beta must be a non-empty list"),
        ("name = 'x'\n", "name at least one model"),
        ("[[models]\n", "not valid TOML"),
    ],
)
def test_study_file_mistakes_are_one_line_naming_the_file(tmp_path, monkeypatch, text, message):
    path = write_study(tmp_path, text, "faces")
    monkeypatch.chdir(tmp_path)
    done = CliRunner().invoke(cli.app, ["study", "run", str(path), "--executor", "inline"])
    assert done.exit_code == 1 and isinstance(done.exception, SystemExit | None)
    assert message in done.output and str(path) in done.output
    assert len(done.output.strip().splitlines()) == 1 and not (tmp_path / "studies").exists()


# --- real studies ----------------------------------------------------------------------------


@pytest.mark.long
def test_a_local_submitit_study_finishes_and_reports_what_zoo_bench_gives(
    tmp_path, synthetic_faces
):
    path = write_study(
        tmp_path,
        """
        name = "grid"
        seeds = 2
        baseline = "cvae beta=1"
        [grid]
        beta = [1, 4]
        [[models]]
        name = "cvae"
        max_steps = 2
        [bench]
        metric = ["recon", "edit"]
        n = 8
        [classifier]
        max_steps = 2
        backbone = "test_resnet"
        """,
        synthetic_faces,
    )  # one model: two models of the grid cost 4 more cells and test nothing more
    done = study("run", path, "--out", tmp_path / "grid", "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5/5 cells done" in done.stdout
    report = json.loads((tmp_path / "grid" / "report.json").read_text())
    assert [row["label"] for row in report["rows"]] == ["cvae beta=1", "cvae beta=4"]
    for row in report["rows"]:
        for key in ("MSE", "edit acc", "preservation"):
            assert row["metrics"][key]["n"] == 2 and row["metrics"][key]["low"] is not None
    assert (tmp_path / "grid" / "report.png").stat().st_size > 10_000
    # every number against the swept beta, a line per model
    assert [row["grid"] for row in report["rows"]] == [{"beta": 1}, {"beta": 4}]
    assert (tmp_path / "grid" / "report-beta.png").stat().st_size > 10_000
    # one cell's numbers are the ones `zoo bench` gives for its checkpoint and classifier
    cells = tmp_path / "grid" / "cells"
    cell = next(cells.glob("cvae-*-s1"))
    status = json.loads((cell / "status.json").read_text())
    ruler = next(cells.glob("classifier-*"))
    ruler_weights = json.loads((ruler / "status.json").read_text())["weights"]
    again = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "bench", str(cell / status["weights"]),
         "--metric", "recon", "--metric", "edit", "--n", "8", "--no-progress",
         "--classifier", str(ruler / ruler_weights), "--out", str(tmp_path / "again.json")],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    direct = json.loads((tmp_path / "again.json").read_text())["results"][0]["metrics"]
    row = next(r for r in report["rows"] if cell.name.startswith(r["row"] + "-"))
    assert row["metrics"]["MSE"]["values"]["1"] == pytest.approx(direct["recon"]["mse"], rel=1e-6)
    assert row["metrics"]["edit acc"]["values"]["1"] == pytest.approx(
        direct["edit"]["mean"]["accuracy"], rel=1e-6
    )
    # the status table shows every cell done, with its time
    shown = study("status", tmp_path / "grid", cwd=tmp_path)
    assert shown.returncode == 0 and "5 done" in shown.stdout


@pytest.mark.long
def test_a_cell_the_model_rejects_fails_after_its_retries_and_the_rest_finish(
    tmp_path, synthetic_faces
):
    path = write_study(
        tmp_path,
        """
        [[models]]
        name = "vae"
        max_steps = 2
        [[models]]
        name = "vae"
        label = "broken"
        max_steps = 2
        option = ["no_such_field=3"]
        [bench]
        metric = ["recon"]
        n = 8
        """,
        synthetic_faces,
    )
    out = tmp_path / "s"
    done = study("run", path, "--out", out, "--executor", "inline", "--retries", "1",
                 "--no-progress", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 1
    assert "1/2 cells done" in done.stdout
    failed = [line for line in done.stderr.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "no_such_field" in failed[0]
    broken = next(c for c in (out / "cells").iterdir() if (c / "status.json").is_file()
                  and json.loads((c / "status.json").read_text())["state"] == "failed")  # fmt: skip
    status = json.loads((broken / "status.json").read_text())
    assert status["attempts"] == 2 and "no_such_field" in status["error"]
    assert "\n" not in status["error"]
    report = json.loads((out / "report.json").read_text())
    assert [row["metrics"]["MSE"]["n"] for row in report["rows"] if row["metrics"]] == [1]
    assert report["rows"][0]["metrics"]["MSE"]["low"] is None  # n = 1: no interval
    assert any("no_such_field" in line for line in report["missing"])
    shown = study("status", out, cwd=tmp_path)
    assert "failed" in shown.stdout and "no_such_field" in shown.stdout


def _files(folder: Path) -> dict[str, tuple[int, str]]:
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "cell.lock"]
    return {
        str(p.relative_to(folder)): (
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in files
    }


def _saved(cell: Path) -> bool:
    return any(cell.glob("runs/*/train_state.safetensors"))


def _train_pid(cell: Path) -> int | None:
    """The pid of the `zoo train` process working in ``cell``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            words = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"train" in words and any(str(cell).encode() in w for w in words):
            return int(entry.name)
    return None


def _wait(condition, what: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.skipif(sys.platform != "linux", reason="finds the cell's process in /proc")
@pytest.mark.long
def test_sigkill_of_a_cell_and_of_the_whole_driver_then_resume_loses_nothing(
    tmp_path, synthetic_faces
):
    text = """
        seeds = {seeds}
        [[models]]
        name = "cvae"
        max_steps = 60
        epochs = 1000
        save_every = 10
        option = ["base_channels=4", "max_channels=8"]
        [bench]
        metric = ["recon"]
        n = 8
        """
    path = write_study(tmp_path, text.format(seeds="[0, 1]"), synthetic_faces)
    out = tmp_path / "killed"
    driver = subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), "study", "run", str(path), "--out", str(out),
         "--no-progress"],
        cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        cells = out / "cells"
        _wait(lambda: cells.is_dir() and len(list(cells.iterdir())) == 2, "the cells")
        first, second = sorted(cells.iterdir(), key=lambda c: c.name[-1])
        # one cell's training, killed after a save: its retry resumes it
        _wait(lambda: _saved(first), "the first save")
        victim = _train_pid(first)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        # then everything (the login node going away), once the other cell has saved
        _wait(lambda: _saved(second) and _train_pid(second) is not None, "the second save")
        os.killpg(driver.pid, signal.SIGKILL)
    finally:
        driver.wait()
    first_status = json.loads((first / "status.json").read_text())
    assert first_status["state"] == "done" and first_status["attempts"] == 2
    assert "killed by SIGKILL" in (first / "log.txt").read_text()
    assert (first / "log.txt").read_text().count("--resume") == 1
    untouched = _files(first)
    run = next(second.glob("runs/*/"))
    done = study("run", path, "--out", out, "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _files(first) == untouched  # finished: not re-run, not rewritten
    assert [p for p in second.glob("runs/*/")] == [run]  # resumed in place, not restarted
    assert "--resume" in (second / "log.txt").read_text()
    # the same cells uninterrupted give the same numbers (the runs are deterministic)
    reference = tmp_path / "reference"
    done = study("run", path, "--out", reference, "--executor", "inline", "--no-progress",
                 cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    for cell in (first, second):
        assert results_of(cell)["recon"] == results_of(reference / "cells" / cell.name)["recon"]


# --- Slurm without a cluster ----------------------------------------------------------------

FAKE_SBATCH = r'''#!{python}
"""sbatch: record the script, then run its array tasks one after another in the background,
with the variables Slurm gives a task; print what sbatch prints."""
import os, re, subprocess, sys
from pathlib import Path

state = Path(os.environ["FAKE_SLURM"])
script = Path(sys.argv[-1]).read_text()
job = str(1000 + len(list(state.glob("job-*.sh"))))
(state / f"job-{{job}}.sh").write_text(script)
array = re.search(r"^#SBATCH --array=(\d+)-(\d+)", script, re.M)
ntasks = re.search(r"^#SBATCH --ntasks-per-node=(\d+)", script, re.M)
tasks = range(int(array[1]), int(array[2]) + 1) if array else [None]
runs = []
for task in tasks:
    env = {{"SLURM_JOB_ID": job, "SLURM_NTASKS": ntasks[1] if ntasks else "1",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "localhost"}}
    name = job
    if task is not None:
        env.update(SLURM_ARRAY_JOB_ID=job, SLURM_ARRAY_TASK_ID=str(task))
        name = f"{{job}}_{{task}}"
    exports = " ".join(f"{{k}}={{v}}" for k, v in env.items())
    runs.append(f"env {{exports}} bash {{sys.argv[-1]}} > {{state}}/{{name}}.out 2>&1; "
                f"echo $? > {{state}}/{{name}}.exit")
# detached from sbatch's output, which the submitter reads to its end
subprocess.Popen(["bash", "-c", "; ".join(runs)], start_new_session=True,
                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(f"Submitted batch job {{job}}")
'''

FAKE_SRUN = r'''#!{python}
"""srun: one task on this node; drop srun's own options, run the command."""
import os, sys
args = sys.argv[1:]
while args and args[0].startswith("-"):
    option = args.pop(0)
    if option in ("--output", "--error") and args:
        args.pop(0)
os.environ.update(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_STEP_ID="0")
os.execvp(args[0], args)
'''

FAKE_SACCT = r'''#!{python}
"""sacct -o JobID,State,NodeList --parsable2 -j IDS: COMPLETED once a task has exited."""
import os, sys
from pathlib import Path
state = Path(os.environ["FAKE_SLURM"])
ids = sys.argv[sys.argv.index("-j") + 1].split(",") if "-j" in sys.argv else []
print("JobID|State|NodeList")
for job in ids:
    exit_file = state / f"{{job}}.exit"
    done = exit_file.is_file()
    failed = done and exit_file.read_text().strip() != "0"
    print(f"{{job}}|{{'FAILED' if failed else 'COMPLETED' if done else 'RUNNING'}}|localhost")
'''

FAKE_RECORDER = r'''#!{python}
"""squeue, scancel: record the call; nothing queued here is ever cancelled."""
import os, sys
from pathlib import Path
with open(Path(os.environ["FAKE_SLURM"]) / "calls.txt", "a") as log:
    log.write(" ".join(sys.argv) + "\n")
'''


@pytest.mark.long
def test_the_slurm_executor_submits_an_array_with_the_options_asked_for(tmp_path, synthetic_faces):
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm"
    bin_dir.mkdir()
    state.mkdir()
    for name, text in [("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN), ("sacct", FAKE_SACCT),
                       ("squeue", FAKE_RECORDER), ("scancel", FAKE_RECORDER)]:  # fmt: skip
        (bin_dir / name).write_text(text.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "FAKE_SLURM": str(state)}  # fmt: skip
    path = write_study(
        tmp_path,
        """
        seeds = 2
        [[models]]
        name = "vae"
        max_steps = 2
        [bench]
        metric = ["recon"]
        n = 8
        """,
        synthetic_faces,
    )
    out = tmp_path / "on-slurm"
    done = study(
        "run", path, "--out", out, "--executor", "slurm", "--partition", "debug",
        "--time", "30", "--cpus-per-task", "2", "--mem-gb", "4", "--array-parallelism", "1",
        "--sbatch", "account=lab", "--setup", "echo setup-ran", "--no-progress",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    scripts = sorted(state.glob("job-*.sh"))
    assert len(scripts) == 1  # both cells in one array
    script = scripts[0].read_text()
    for line in ("#SBATCH --partition=debug", "#SBATCH --time=30", "#SBATCH --cpus-per-task=2",
                 "#SBATCH --mem=4096M", "#SBATCH --array=0-1%1", "#SBATCH --account=lab",
                 "#SBATCH --ntasks-per-node=1", "echo setup-ran", "srun"):  # fmt: skip
        assert line in script, line
    assert "setup-ran" in (state / "1000_0.out").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["rows"][0]["metrics"]["MSE"]["n"] == 2
    for cell in (out / "cells").iterdir():
        assert (cell / "slurm-job.txt").read_text().startswith("1000_")
        mse = report["rows"][0]["metrics"]["MSE"]["values"][cell.name[-1]]
        assert results_of(cell)["recon"]["mse"] == mse


def test_without_submitit_the_local_executor_names_the_extra_in_one_line(tmp_path, monkeypatch):
    path = write_study(tmp_path, "[[models]]\nname = 'vae'\n", "faces")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit now fails
    done = CliRunner().invoke(cli.app, ["study", "run", str(path)])
    assert done.exit_code == 1
    assert done.output.strip().splitlines() == [
        "error: the local and slurm executors need submitit: pip install 'zoo[cluster]' "
        "(or run with --executor inline)"
    ]
    assert not (tmp_path / "studies").exists()


def test_a_model_name_cannot_leave_the_study_folder_and_a_broken_cell_record_is_one_line(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    path = write_study(tmp_path, "[[models]]\nname = '../../escape'\n", "faces")
    done = CliRunner().invoke(cli.app, ["study", "run", str(path), "--executor", "inline"])
    assert done.exit_code == 1 and "needs name = a registered model" in done.output
    assert not (tmp_path / "studies").exists() and not (tmp_path.parent / "escape").exists()
    # a study folder whose cell record was damaged: status says which file, no traceback
    study_dir = tmp_path / "damaged"
    (study_dir / "cells" / "vae-00000000-s0").mkdir(parents=True)
    (study_dir / "study.json").write_text('{"name": "x", "rows": [], "baseline": null}')
    (study_dir / "cells" / "vae-00000000-s0" / "cell.json").write_text("{not json")
    done = CliRunner().invoke(cli.app, ["study", "status", str(study_dir)])
    assert done.exit_code == 1 and "cell.json: not a cell record" in done.output
    assert len(done.output.strip().splitlines()) == 1
