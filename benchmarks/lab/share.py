"""What sharing a model costs, measured: ``python -m benchmarks.lab.share CHECKPOINT``.

Exports the checkpoint's hub-ready folder and ONNX graphs into a temporary folder and prints
their sizes, the largest difference between the ONNX graphs (onnxruntime, CPU) and PyTorch in
fp32 on 64 random faces and labels (encoder mean and log-variance, decoder images), and the
demo's latency per slider move (`zoo.demo.Editor.edit`: one encode and one decode of one
face, in process; the median and the 90th percentile of ``--repeats`` moves after warm-up).
Nothing here is a pass/fail test: the numbers go in docs/share.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import zoo
from zoo.demo import Editor, demo_attributes
from zoo.device import cpu_flags, cpu_name
from zoo.export import export_folder
from zoo.latent import Faces
from zoo.onnx_export import export_onnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    print(f"cpu: {cpu_name()} ({', '.join(flags) or 'no AVX2'}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "hub"
        export_folder(Path(args.checkpoint), folder)
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                print(f"hub folder: {path.relative_to(folder)} {path.stat().st_size / 1e6:.2f} MB")
        model = zoo.load(args.checkpoint)
        encoder, decoder = export_onnx(model, Path(scratch) / "onnx")
        for path in (encoder, decoder):
            print(f"onnx: {path.name} {path.stat().st_size / 1e6:.2f} MB")
        print(onnx_differences(model, encoder, decoder))
    print(slider_latency(zoo.load(args.checkpoint), args.repeats))


def onnx_differences(model: zoo.GenerativeModel, encoder: Path, decoder: Path) -> str:
    import onnxruntime as ort

    c = model.config
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(64, c.channels, c.image_size, c.image_size, generator=generator)
    y = (torch.rand(64, c.num_attributes, generator=generator) < 0.5).float()
    z = torch.randn(64, c.latent_dim, generator=generator)
    labels = {"y": y.numpy()} if model.conditional else {}
    with torch.no_grad():
        posterior = model.encode(x, y if model.conditional else None)
        images = model.decode(z, y if model.conditional else None)
    cpu = ["CPUExecutionProvider"]
    mean, logvar = ort.InferenceSession(str(encoder), providers=cpu).run(
        None, {"x": x.numpy(), **labels}
    )
    (decoded,) = ort.InferenceSession(str(decoder), providers=cpu).run(
        None, {"z": z.numpy(), **labels}
    )
    return (
        "onnx - pytorch, max |difference| over 64 inputs: "
        f"mean {abs(mean - posterior.mean.numpy()).max():.2e}, "
        f"logvar {abs(logvar - posterior.logvar.numpy()).max():.2e}, "
        f"images {abs(decoded - images.numpy()).max():.2e}"
    )


def slider_latency(model: zoo.GenerativeModel, repeats: int) -> str:
    c = model.config
    face = torch.rand(1, c.channels, c.image_size, c.image_size)
    labels = torch.zeros(1, len(model.checkpoint_info.attr_names))
    editor = Editor(model, Faces(face, labels, ["face"]), demo_attributes(model, False))
    values = [0.0] * len(editor.attributes)
    seconds = []
    for move in range(repeats + 5):
        values[move % len(values)] = 1.0 - values[move % len(values)]
        start = time.perf_counter()
        editor.edit("face", None, *values)
        if move >= 5:  # the first moves warm up the allocator and oneDNN's kernels
            seconds.append(time.perf_counter() - start)
    seconds.sort()
    return (
        f"demo slider move (encode + decode one face): median "
        f"{statistics.median(seconds) * 1e3:.1f} ms, p90 "
        f"{seconds[int(0.9 * len(seconds))] * 1e3:.1f} ms over {repeats} moves"
    )


if __name__ == "__main__":
    main()
