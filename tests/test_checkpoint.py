"""Checkpoints: exact round trips, and every kind of bad file is a clear error, never a pickle."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

import zoo
from zoo import checkpoint
from zoo.errors import ZooError

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


def test_missing_file(tmp_path):
    with pytest.raises(ZooError, match="does not exist"):
        zoo.load(tmp_path / "nope.safetensors")


def test_pickle_renamed_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "PWNED"  # absolute: where unpickling would write, whatever the cwd

    class Boom:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Boom()))
    # the control, read without unpickling: the payload calls exec on code naming the marker
    assert b"exec" in path.read_bytes() and repr(str(marker)).encode() in path.read_bytes()
    with pytest.raises(ZooError, match="not a readable safetensors file"):
        zoo.load(path)
    assert not marker.exists()


def test_safetensors_without_zoo_metadata(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ZooError, match="not a zoo model"):
        zoo.load(path)


def test_foreign_format_version(tmp_path):
    path = tmp_path / "future.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"zoo.format": "99"})
    with pytest.raises(ZooError, match="format '99'"):
        zoo.load(path)


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
    with pytest.raises(ZooError, match="do not match the cvae config.*missing: decoder.project"):
        zoo.load(bad)


def test_truncated_file(saved, tmp_path):
    _, path = saved
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ZooError, match="truncated|not a readable"):
        zoo.load(truncated)


def test_nan_weights_are_never_written(tmp_path):
    model = zoo.create_model("vae", **TINY)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    path = tmp_path / "model.safetensors"
    with pytest.raises(ZooError, match="non-finite"):
        zoo.save_checkpoint(path, model)
    assert not path.exists()


def test_crash_between_write_and_rename_keeps_the_old_file(saved, monkeypatch):
    model, path = saved
    before = path.read_bytes()

    def crash(*args):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(OSError, match="simulated crash"):
        zoo.save_checkpoint(path, model)
    assert path.read_bytes() == before
    assert list(path.parent.iterdir()) == [path]


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
