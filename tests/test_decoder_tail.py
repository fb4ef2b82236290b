"""The decoder tail is a config field: new models default to the pixel-shuffle tail, and every
file and run written before the field existed still builds the transposed-convolution tail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import zoo
from zoo.errors import ZooError
from zoo.models.edit_cvae import EditCVAEConfig
from zoo.registry import create_model, get_model_class, list_models
from zoo.train import Trainer, TrainSettings, resume_settings

DATA = Path(__file__).parent / "data"
TINY = {"image_size": 16, "latent_dim": 4, "base_channels": 4, "max_channels": 8}


def test_a_checkpoint_written_before_the_field_loads_and_reconstructs_as_it_did():
    """The file and its reconstruction were written by zoo's code of the commit before the
    field (tests/data/README.md says how)."""
    old = DATA / "cvae-deconv-0.1.safetensors"
    stored = load_file(DATA / "cvae-deconv-0.1-recon.safetensors")
    model = zoo.load(old).eval()
    assert model.config.decoder_tail == "deconv"
    rebuilt = create_model("cvae", num_attributes=3, decoder_tail="deconv", **TINY).eval()
    rebuilt.load_state_dict(load_file(old), strict=True)
    with torch.no_grad():
        x, y = stored["x"], stored["y"]
        recon = model.decode(model.encode(x, y).mean, y)
        assert torch.equal(recon, rebuilt.decode(rebuilt.encode(x, y).mean, y))
    # bit for bit on the CPU that wrote it; other CPUs' kernels may round differently
    torch.testing.assert_close(recon, stored["recon"], rtol=0, atol=1e-5)


def test_a_run_started_before_the_field_resumes_with_its_own_tail(synthetic_faces, tmp_path):
    settings = TrainSettings(
        model="cvae", data=synthetic_faces, max_steps=2, batch_size=8, save_every=2,
        model_config={k: v for k, v in TINY.items() if k != "image_size"} | {
            "decoder_tail": "deconv"
        },
        image_size=16, out=str(tmp_path), device="cpu",
    )  # fmt: skip
    first = Trainer(settings, progress=False)
    first.run()
    record_path = first.run_dir / "config.json"
    record = json.loads(record_path.read_text())  # as zoo 0.1 wrote it: no decoder_tail anywhere
    del record["settings"]["model_config"]["decoder_tail"], record["model_config"]["decoder_tail"]
    record_path.write_text(json.dumps(record))
    resumed = Trainer(resume_settings(first.run_dir, max_steps=4), resume=first.run_dir)
    assert resumed.model.config.decoder_tail == "deconv" and resumed.step == 2
    resumed.run()
    assert resumed.step == 4


def test_new_models_default_to_the_pixel_shuffle_tail_and_the_editors_keep_theirs():
    tails = {name: create_model(name, num_attributes=3, **TINY).config.decoder_tail for name in
             list_models()}  # fmt: skip
    editors = {name for name in tails if issubclass(get_model_class(name).config_class,
                                                     EditCVAEConfig)}  # fmt: skip
    assert {tails[name] for name in editors} == {"deconv"}
    assert {tails[name] for name in set(tails) - editors} == {"pixel-shuffle"}
    assert {"cvae", "vae", "beta-cvae", "beta-vae"} <= set(tails) - editors
    with pytest.raises(ZooError, match="decoder_tail 'upsample' is not one of pixel-shuffle"):
        create_model("cvae", num_attributes=3, decoder_tail="upsample", **TINY)


@pytest.mark.parametrize("size", [8, 16, 64])
def test_the_pixel_shuffle_tail_computes_nothing_at_full_resolution(size):
    model = create_model("cvae", num_attributes=3, **{**TINY, "image_size": size}).eval()
    widths = []
    for module in model.decoder.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.GroupNorm)):
            module.register_forward_hook(lambda m, i, out: widths.append(out.shape[-1]))
    with torch.no_grad():
        image = model.decode(torch.zeros(2, 4), torch.ones(2, 3))
    assert image.shape == (2, 3, size, size)
    assert widths and max(widths) == size // 2
