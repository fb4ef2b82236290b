"""Writes the two files of this folder with an older zoo's code (README.md says which and why).

Run as ``PYTHONPATH=/tmp/old python tests/data/write_old_cvae.py tests/data`` after
``git worktree add /tmp/old 8b2e53b``, so ``zoo`` is that commit's package, not this one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import zoo
from zoo.checkpoint import save_checkpoint

out = Path(sys.argv[1])
torch.manual_seed(0)
model = zoo.create_model(
    "cvae", image_size=16, num_attributes=3, latent_dim=4, base_channels=4, max_channels=8
).eval()
if "decoder_tail" in model.config.to_dict():
    sys.exit("this zoo already has decoder_tail; point PYTHONPATH at the older checkout")
save_checkpoint(out / "cvae-deconv-0.1.safetensors", model, attr_names=["Smiling", "Male", "Young"])
x = torch.rand(4, 3, 16, 16)
y = (torch.rand(4, 3) < 0.5).float()
with torch.no_grad():
    recon = model.decode(model.encode(x, y).mean, y)
save_file({"x": x, "y": y, "recon": recon}, out / "cvae-deconv-0.1-recon.safetensors")
