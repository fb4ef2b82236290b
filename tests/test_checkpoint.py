"""Checkpoints: exact round trips, and every kind of bad file is a clear error, never a pickle."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import zoo
from zoo import checkpoint, files
from zoo.errors import ZooError

ROOT = Path(__file__).resolve().parents[1]
TINY = {"image_size": 16, "base_channels": 4, "max_channels": 8, "latent_dim": 6}


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = zoo.create_model("cvae", num_attributes=3, beta=2.0, **TINY)
    path = tmp_path / "model.safetensors"
    zoo.save_checkpoint(
        path,
        model,
        attr_names=["Smiling", "Male", "Eyeglasses"],
        attr_rates=[0.5, 0.4, 0.1],
        preprocess={"image_size": 16, "crop_fraction": 0.83, "channels": 3},
        data={"name": "synthetic-faces", "fingerprint": "abc"},
        training={"steps": 7},
    )
    return model, path


def test_round_trip_gives_identical_outputs(saved):
    model, path = saved
    loaded = zoo.load(path)
    x = torch.rand(2, 3, 16, 16)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    model.eval()
    assert torch.equal(model.reconstruct(x, y), loaded.reconstruct(x, y))
    z = torch.randn(2, 6)
    assert torch.equal(model.decode(z, y), loaded.decode(z, y))
    assert loaded.config == model.config and loaded.model_name == "cvae"
    info = loaded.checkpoint_info
    assert info.attr_names == ["Smiling", "Male", "Eyeglasses"]
    assert info.training == {"steps": 7} and info.data["fingerprint"] == "abc"


def test_info_reads_the_header_only(saved):
    _, path = saved
    info = zoo.read_info(path)
    assert info.model_name == "cvae" and info.config["beta"] == 2.0


def _refusal(path) -> str:
    """zoo.load's refusal of `path`: one line that names the file (and says what is wrong)."""
    with pytest.raises(ZooError) as caught:
        zoo.load(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    return message


def test_missing_file(tmp_path):
    with pytest.raises(ZooError, match="does not exist"):
        zoo.load(tmp_path / "nope.safetensors")


# docs/reliability.md: a checkpoint is foreign, from another zoo format, truncated
def test_pickle_renamed_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "PWNED"  # absolute: where unpickling would write, whatever the cwd

    class Boom:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Boom()))
    # the control, read without unpickling: the payload calls exec on code naming the marker
    assert b"exec" in path.read_bytes() and repr(str(marker)).encode() in path.read_bytes()
    assert "is a pickle, not a safetensors file" in _refusal(path)
    assert not marker.exists()


# docs/reliability.md: a checkpoint is foreign, from another zoo format, truncated
def test_safetensors_without_zoo_metadata(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    assert "not a zoo model" in _refusal(path)


# docs/reliability.md: a checkpoint is foreign, from another zoo format, truncated
def test_foreign_format_version(tmp_path):
    path = tmp_path / "future.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"zoo.format": "99"})
    assert "has zoo format '99'" in _refusal(path)


# docs/reliability.md: a checkpoint is foreign, from another zoo format, truncated
def test_tensors_that_do_not_match_the_config(saved, tmp_path):
    model, path = saved
    info = zoo.read_info(path)
    tensors = {k: v for k, v in model.state_dict().items() if not k.startswith("decoder.project")}
    tensors["encoder.stages.0.weight"] = torch.zeros(1)
    metadata = {
        "zoo.format": "1",
        "zoo.kind": "model",
        "zoo.model": "cvae",
        "zoo.config": zoo.ModelConfig(**info.config).to_json(),
    }
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=metadata)
    assert re.search("do not match the cvae config.*missing: decoder.project", _refusal(bad))


# docs/reliability.md: a checkpoint is foreign, from another zoo format, truncated
def test_truncated_file(saved, tmp_path):
    _, path = saved
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert re.search("truncated|not a readable", _refusal(truncated))


# docs/reliability.md: the loss or the gradient becomes NaN or Inf
def test_nan_weights_are_never_written(tmp_path):
    model = zoo.create_model("vae", **TINY)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    path = tmp_path / "model.safetensors"
    with pytest.raises(ZooError, match="non-finite"):
        zoo.save_checkpoint(path, model)
    assert not path.exists()


# docs/reliability.md: a crash happens while a checkpoint is written
def test_crash_between_write_and_rename_keeps_the_old_file(saved, monkeypatch):
    model, path = saved
    before = path.read_bytes()

    def crash(*args):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(files.os, "replace", crash)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(ZooError, match=f"cannot write {path}: simulated crash"):
        zoo.save_checkpoint(path, model)
    assert path.read_bytes() == before
    assert list(path.parent.iterdir()) == [path]


# docs/reliability.md: a crash happens while a checkpoint is written
def test_a_checkpoint_is_fsynced_before_it_is_renamed_into_place(saved, monkeypatch):
    """Without the fsync, a power cut after the rename can leave a name pointing at blocks
    that never reached the disk: the rename must publish a file already on it."""
    model, path = saved
    real_fsync, real_replace = os.fsync, os.replace
    synced, renames = set(), []

    def fsync(fd):
        real_fsync(fd)
        synced.add(os.fstat(fd).st_ino)

    def replace(source, target):
        renames.append((Path(target), os.stat(source).st_ino in synced))
        real_replace(source, target)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    zoo.save_checkpoint(path, model)
    assert renames == [(path, True)]


def test_training_state_round_trip(tmp_path):
    torch.manual_seed(0)
    model = zoo.create_model("vae", **TINY)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.loss(torch.rand(2, 3, 16, 16))["loss"].backward()
    optimizer.step()
    rng = torch.get_rng_state()
    path = tmp_path / "state.safetensors"
    checkpoint.save_train_state(
        path, model, optimizer, step=12, rng_state={"cpu": rng}, extra={"a": 1}
    )
    state = checkpoint.load_train_state(path)
    fresh = torch.optim.Adam(model.parameters(), lr=1e-3)
    fresh.load_state_dict(state.optimizer_state)
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fresh.state[p][key], optimizer.state[p][key])
    assert state.step == 12 and state.extra == {"a": 1} and torch.equal(state.rng_state["cpu"], rng)
    for name, tensor in model.state_dict().items():
        assert torch.equal(state.model_state[name], tensor)


# -- hostile files: pickles under any name, configs that ask for terabytes ----------------------


class _Payload:
    """Unpickling this writes `marker`: the proof that nothing was unpickled is its absence."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('x')",))


def _raw_pickle(path, marker) -> None:
    path.write_bytes(pickle.dumps(_Payload(marker), protocol=4))  # starts with 0x80


def _torch_save_pickle(path, marker) -> None:
    torch.save({"w": torch.zeros(2), "payload": _Payload(marker)}, path)  # a zip with data.pkl


def _pickle_readers():
    """Every reader of a file zoo opens as safetensors, by name. (The FID weights are a
    torch.save file by design, read with weights_only=True: tests/test_fid.py.)"""
    from benchmarks.classifier import load_classifier

    return {
        "checkpoint": zoo.load,
        "checkpoint header": zoo.read_info,
        "resume state": checkpoint.load_train_state,
        "concept vector": lambda path: files.read_tensors_file(path, "concept vector"),
        "classifier": load_classifier,
    }


# docs/reliability.md: a file zoo reads is a pickle, whatever its name
@pytest.mark.parametrize("write", [_raw_pickle, _torch_save_pickle])
@pytest.mark.parametrize("reader", list(_pickle_readers()))
def test_a_pickle_named_safetensors_is_named_a_pickle_and_never_unpickled(tmp_path, write, reader):
    marker = tmp_path / "UNPICKLED"
    path = tmp_path / "weights.safetensors"
    write(path, marker)
    assert b"exec" in path.read_bytes() or b"exec" in _zip_members(path)  # the payload is there
    with pytest.raises(ZooError) as caught:
        _pickle_readers()[reader](path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    assert "is a pickle, not a safetensors file; zoo never unpickles" in message
    assert not marker.exists()


def _zip_members(path) -> bytes:
    import zipfile

    if not zipfile.is_zipfile(path):
        return b""
    with zipfile.ZipFile(path) as archive:
        return b"".join(archive.read(name) for name in archive.namelist())


def test_a_safetensors_file_starting_with_the_pickle_byte_is_read_as_safetensors(tmp_path):
    """The pickle test looks at a file only when it is not safetensors: a header whose length
    ends in 0x80 starts with the byte that pickles start with, and must not be called one."""
    path = tmp_path / "foreign.safetensors"
    for padding in range(256):
        save_file({"w": torch.zeros(2)}, str(path), metadata={"pad": "x" * padding})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    with pytest.raises(ZooError, match="a safetensors file but not a zoo model"):
        zoo.load(path)


def _with_config(source, path, config) -> None:
    """A copy of the checkpoint `source` whose config metadata is `config` (any JSON)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
    metadata["zoo.config"] = config if isinstance(config, str) else json.dumps(config)
    save_file(load_file(str(source)), str(path), metadata=metadata)


CRAFTED = {  # config changes -> what the one line must say
    "latent_dim_1e9": ({"latent_dim": 10**9}, "do not match the cvae config"),
    "huge_widths": ({"base_channels": 10**6, "max_channels": 10**6}, "do not match"),
    "image_size_4096": ({"image_size": 4096}, "cvae config cannot be built"),
    "attributes_1e8": ({"num_attributes": 10**8}, "do not match the cvae config"),
    "width_2_to_70": ({"base_channels": 2**70, "max_channels": 2**70}, "cannot be built"),
    "nan_beta": ('"beta": NaN', "zoo.config field beta is nan, not a finite number"),
    "infinite_latent": ('"latent_dim": Infinity', "field latent_dim is inf, not a finite"),
    "overflowing_float": ('"latent_dim": 1e400', "field latent_dim is inf, not a finite"),
    "list": ([1, 2], "zoo.config is a JSON array, not a JSON object"),
}


# docs/reliability.md: a checkpoint's config is crafted
def test_crafted_configs_are_refused_before_anything_is_built(saved, tmp_path):
    """Each crafted file gets one line, in a process that cannot allocate 512 MB more than it
    holds after loading zoo: the config is checked against the header's shapes before the
    model is built at the sizes it asks for (1 GB to 64 TB here)."""
    _, genuine = saved
    config = json.loads(_metadata(genuine)["zoo.config"])
    paths = {"genuine": genuine}
    for name, (change, _) in CRAFTED.items():
        paths[name] = tmp_path / f"{name}.safetensors"
        if isinstance(change, str):  # JSON that json.dumps cannot write: splice it in
            key = change.split(":")[0].strip('"')
            text = json.dumps({k: v for k, v in config.items() if k != key})
            _with_config(genuine, paths[name], text[:-1] + ", " + change + "}")
        else:
            crafted = {**config, **change} if isinstance(change, dict) else change
            _with_config(genuine, paths[name], crafted)
    outcomes = _load_with_memory_cap(list(paths.values()), headroom_mb=512)
    assert outcomes[str(genuine)] == "loaded"
    for name, (_, fragment) in CRAFTED.items():
        outcome = outcomes[str(paths[name])]
        assert outcome.startswith("ZooError: "), f"{name}: {outcome}"
        assert fragment in outcome and str(paths[name]) in outcome, f"{name}: {outcome}"


def _metadata(path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


LOADER = """
import json, resource, sys
import zoo

size = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize"))
limit = size * 1024 + int(sys.argv[1]) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
outcomes = {}
for path in sys.argv[2:]:
    try:
        zoo.load(path)
        outcomes[path] = "loaded"
    except zoo.ZooError as error:
        outcomes[path] = f"ZooError: {error}"
    except BaseException as error:
        outcomes[path] = f"{type(error).__name__}: {str(error)[:200]}"
print(json.dumps(outcomes))
"""


def _load_with_memory_cap(paths, headroom_mb: int) -> dict[str, str]:
    """zoo.load each path in a child whose address space may grow by `headroom_mb` only."""
    done = subprocess.run(
        [sys.executable, "-c", LOADER, str(headroom_mb), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])
