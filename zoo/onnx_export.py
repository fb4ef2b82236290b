"""ONNX export: a model's encoder and decoder as two graphs that run without torch or zoo.

``encoder.onnx`` maps images (N x C x H x W, floats in [0, 1]) and, for conditional models,
labels (N x A, 0 or 1) to the posterior's ``mean`` and ``logvar``; ``decoder.onnx`` maps
``z`` (N x latent_dim) and the labels to images in [0, 1]. The batch is dynamic. Each file's
metadata says how to feed it (attribute names in order, image size, value range, latent
size, model name), so an ONNX runtime user needs nothing else. The weights are inside each
file (no ``.data`` sidecar): one file is one graph. Export uses torch's own exporter
(``torch.onnx.export``, which needs the ``onnx`` extra's onnx and onnxscript).
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from zoo.errors import ZooError, failure_text
from zoo.files import atomic_write_bytes
from zoo.model import GenerativeModel

ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
EXTRA_ADVICE = "install the onnx extra: pip install 'zoo[onnx]'"


class _Encoder(nn.Module):
    """encode as a graph: (x[, y]) -> (mean, logvar)."""

    def __init__(self, model: GenerativeModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, x: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.model.encode(x, y)
        return posterior.mean, posterior.logvar


class _Decoder(nn.Module):
    """decode as a graph: (z[, y]) -> images."""

    def __init__(self, model: GenerativeModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.decode(z, y)


def metadata(model: GenerativeModel) -> dict[str, str]:
    """What a runtime user needs to feed the graphs, as ONNX metadata (strings)."""
    c = model.config
    info = getattr(model, "checkpoint_info", None)
    return {
        "zoo.model": model.model_name,
        "zoo.conditional": json.dumps(bool(model.conditional)),
        "zoo.attributes": json.dumps(info.attr_names if info else []),
        "zoo.image_size": str(c.image_size),
        "zoo.channels": str(c.channels),
        "zoo.latent_dim": str(c.latent_dim),
        "zoo.value_range": json.dumps([0.0, 1.0]),
        "zoo.layout": "NCHW",
    }


def export_onnx(model: GenerativeModel, out: Path) -> list[Path]:
    """Write ``encoder.onnx`` and ``decoder.onnx`` of ``model`` (in fp32, on the CPU) to
    ``out``; a model that does not export is one line saying why."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch's exporter needs it; say so before it does)
    except ImportError:
        raise ZooError(f"ONNX export needs onnx and onnxscript; {EXTRA_ADVICE}") from None
    model = model.float().cpu().eval()
    c = model.config
    labels = (torch.zeros(3, c.num_attributes),) if model.conditional else ()
    label_names = ["y"] if model.conditional else []
    graphs = {
        ENCODER_FILE: (
            _Encoder(model),
            (torch.rand(3, c.channels, c.image_size, c.image_size), *labels),
            ["x", *label_names],
            ["mean", "logvar"],
        ),
        DECODER_FILE: (
            _Decoder(model),
            (torch.randn(3, c.latent_dim), *labels),
            ["z", *label_names],
            ["images"],
        ),
    }
    out.mkdir(parents=True, exist_ok=True)
    props = metadata(model)
    written = []
    for name, (graph, inputs, input_names, output_names) in graphs.items():
        batch = torch.export.Dim("batch", min=1, max=65536)
        try:
            with warnings.catch_warnings():  # the exporter's notes are about its own internals
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    graph,
                    inputs,
                    dynamo=True,
                    dynamic_shapes=[{0: batch}] * len(inputs),
                    input_names=input_names,
                    output_names=output_names,
                    external_data=False,
                    verbose=False,
                )
        except Exception as error:  # the exporter raises many kinds; each is one reason
            raise ZooError(
                f"{model.model_name} cannot be exported to ONNX ({name}): {failure_text(error)}"
            ) from None
        buffer = io.BytesIO()
        program.save(buffer, external_data=False)
        proto = onnx.load_from_string(buffer.getvalue())
        onnx.helper.set_model_props(proto, {**props, "zoo.graph": name.removesuffix(".onnx")})
        atomic_write_bytes(out / name, proto.SerializeToString())
        written.append(out / name)
    return written
