"""Speed of training, measured honestly: ``python -m benchmarks.speed [--data DIR] [--only ...]``.

Prints (and with ``--out`` writes as JSON) five measurements of the default CVAE at 64 px,
batch 64, on this machine:

- ``pipeline``: end-to-end img/s over a whole epoch of ``zoo train cvae`` (prepared uint8
  cache, flips on tensors, default precision) against a plain PyTorch pipeline with the same
  model: a Dataset that opens each JPEG with PIL and applies torchvision transforms (centre
  crop 148, resize 64, random flip) through a DataLoader, fp32.
- ``precision``: training-step img/s in fp32 and bf16 autocast, and both loss curves from the
  same initial weights and batches.
- ``flops``: FLOPs per image of a training step (torch.utils.flop_counter) and the achieved
  GFLOP/s against this machine's measured matmul peak in the same dtype.
- ``compile``: training-step img/s with and without torch.compile, and the compile time.
- ``ddp``: img/s of ``zoo train`` with 1 and 2 processes (torchrun, gloo on CPU).

Nothing here is a pass/fail test: the numbers go in the README and the issue notes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision.transforms import v2

import zoo
from zoo.data import ImageData, load_data, resolve_source
from zoo.data.celeba import IMAGE_DIR, SPLIT_CODES, read_labels
from zoo.device import autocast, pick_device, resolve_precision
from zoo.train import Trainer, TrainSettings

BATCH = 64
SIZE = 64
console = Console()


def make_model(attributes: int, device: torch.device) -> zoo.GenerativeModel:
    torch.manual_seed(0)
    return zoo.create_model("cvae", num_attributes=attributes, image_size=SIZE).to(device)


def step_function(
    model: zoo.GenerativeModel, device: torch.device, precision: str
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One Adam step of `model` as a function of a batch; returns the (device) loss."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            loss = model(x, y)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def median_rate(step: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median images/s of `step` (one batch) after `warmup` calls (oneDNN and compile settle)."""
    for _ in range(warmup):
        step()
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return BATCH / statistics.median(seconds)


# -- pipeline ------------------------------------------------------------------------------------


class PlainCelebA(Dataset):
    """The textbook pipeline: PIL opens each JPEG, torchvision transforms crop, resize, flip."""

    def __init__(self, root: Path, split: str) -> None:
        labels = read_labels(root)
        rows = [i for i, code in enumerate(labels.partition) if code == SPLIT_CODES[split]]
        self.paths = [root / IMAGE_DIR / labels.filenames[i] for i in rows]
        self.attrs = torch.from_numpy(labels.signs[rows] > 0).float()
        self.transform = v2.Compose(
            [
                v2.CenterCrop(148),
                v2.Resize(SIZE, antialias=True),
                v2.RandomHorizontalFlip(),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB")), self.attrs[index]


def plain_epoch(root: Path, device: torch.device, workers: int) -> float:
    dataset = PlainCelebA(root, "train")
    loader = DataLoader(
        dataset, batch_size=BATCH, shuffle=True, num_workers=workers, drop_last=False
    )
    step = step_function(make_model(dataset.attrs.shape[1], device), device, "fp32")
    start, images = time.perf_counter(), 0
    for x, y in loader:
        step(x.to(device), y.to(device))
        images += x.shape[0]
    return images / (time.perf_counter() - start)


def ours_epoch(data: str | None, device: str) -> tuple[float, str]:
    with tempfile.TemporaryDirectory() as out:
        settings = TrainSettings(model="cvae", data=data, epochs=1, device=device, out=out)
        trainer = Trainer(settings, progress=False)
        summary = trainer.run().summary
    return summary["images_per_s"], summary["precision"]


def measure_pipeline(data: str | None, device: torch.device) -> dict[str, Any]:
    _, root = resolve_source(data)
    ours, precision = ours_epoch(data, str(device))
    plain = {workers: plain_epoch(root, device, workers) for workers in (0, 2)}
    best_workers = max(plain, key=plain.get)
    return {
        "ours_img_per_s": ours,
        "ours_precision": precision,
        "plain_img_per_s": plain,
        "speedup_vs_best_plain": ours / plain[best_workers],
        "best_plain_workers": best_workers,
    }


# -- precision, flops, compile -------------------------------------------------------------------


def batches(data: ImageData, device: torch.device, count: int) -> list[tuple[torch.Tensor, ...]]:
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    return [
        data.batch(order[(i * BATCH) % len(data) :][:BATCH], device, flip=False)
        for i in range(count)
    ]


def measure_precision(data: ImageData, device: torch.device, steps: int) -> dict[str, Any]:
    fixed = batches(data, device, 1)[0]
    curve_batches = batches(data, device, steps)
    result: dict[str, Any] = {}
    for precision in ("fp32", "bf16"):
        timed = step_function(make_model(len(data.attr_names), device), device, precision)
        result[f"{precision}_img_per_s"] = median_rate(
            lambda timed=timed: timed(*fixed), device, 8, 10
        )
        fresh = step_function(make_model(len(data.attr_names), device), device, precision)
        torch.manual_seed(1)  # the same reparameterisation noise for both curves
        result[f"{precision}_losses"] = [fresh(*batch).item() for batch in curve_batches]
    result["bf16_speedup"] = result["bf16_img_per_s"] / result["fp32_img_per_s"]
    return result


def matmul_peak(device: torch.device, dtype: torch.dtype, side: int = 2048) -> float:
    a = torch.randn(side, side, device=device, dtype=dtype)
    b = torch.randn(side, side, device=device, dtype=dtype)
    seconds = []
    for _ in range(6):
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return 2 * side**3 / statistics.median(seconds[2:]) / 1e9


def measure_flops(data: ImageData, device: torch.device, rates: dict[str, Any]) -> dict[str, Any]:
    x, y = batches(data, device, 1)[0]
    model = make_model(len(data.attr_names), device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x, y)["loss"].backward()
    per_image = counter.get_total_flops() / BATCH
    result: dict[str, Any] = {"train_step_gflop_per_image": per_image / 1e9}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        peak = matmul_peak(device, dtype)
        achieved = per_image * rates[f"{precision}_img_per_s"] / 1e9
        result[precision] = {
            "matmul_peak_gflops": peak,
            "achieved_gflops": achieved,
            "fraction_of_peak": achieved / peak,
        }
    return result


def measure_compile(data: ImageData, device: torch.device, precision: str) -> dict[str, Any]:
    x, y = batches(data, device, 1)[0]
    eager = step_function(make_model(len(data.attr_names), device), device, precision)
    model = make_model(len(data.attr_names), device)
    compiled_model = torch.compile(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def compiled() -> None:
        with autocast(device, precision):
            loss = compiled_model(x, y)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    start = time.perf_counter()
    compiled()
    compile_seconds = time.perf_counter() - start
    return {
        "precision": precision,
        "eager_img_per_s": median_rate(lambda: eager(x, y), device, 8, 10),
        "compiled_img_per_s": median_rate(compiled, device, 8, 10),
        "compile_seconds": compile_seconds,
    }


# -- ddp -----------------------------------------------------------------------------------------


def measure_ddp(data: str | None, steps: int) -> dict[str, Any]:
    result = {}
    for processes in (1, 2):
        with tempfile.TemporaryDirectory() as out:
            command = [
                sys.executable,
                "-m",
                "cli",
                "train",
                "cvae",
                "--max-steps",
                str(steps),
                "--out",
                out,
                "--no-progress",
                "--nproc",
                str(processes),
            ]
            if data:
                command += ["--data", data]
            subprocess.run(command, check=True, capture_output=True, text=True)
            [checkpoint] = Path(out).glob("*/model.safetensors")
            training = zoo.read_info(checkpoint).training
            result[f"{processes}_process_img_per_s"] = training["images_per_s"]
            result[f"{processes}_process_precision"] = training["precision"]
    return result


# -- report --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="CelebA folder (default: zoo's resolution)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--only", default="pipeline,precision,flops,compile,ddp")
    parser.add_argument("--curve-steps", type=int, default=60)
    parser.add_argument("--ddp-steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    parts = set(args.only.split(","))
    device = pick_device(args.device)
    data = load_data(args.data, "train", SIZE)
    results: dict[str, Any] = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "data": data.root,
        "batch_size": BATCH,
        "image_size": SIZE,
    }
    if "pipeline" in parts:
        results["pipeline"] = measure_pipeline(args.data, device)
    if parts & {"precision", "flops"}:
        results["precision"] = measure_precision(data, device, args.curve_steps)
    if "flops" in parts:
        results["flops"] = measure_flops(data, device, results["precision"])
    if "compile" in parts:
        results["compile"] = measure_compile(data, device, resolve_precision(device, "auto"))
    if "ddp" in parts:
        results["ddp"] = measure_ddp(args.data, args.ddp_steps)
    report(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def report(results: dict[str, Any]) -> None:
    table = Table(title=f"zoo speed: cvae {SIZE}px batch {BATCH} on {results['device']}")
    table.add_column("measurement")
    table.add_column("value", justify="right")
    rows: list[tuple[str, str]] = []
    if "pipeline" in results:
        p = results["pipeline"]
        rows += [
            (f"zoo train epoch ({p['ours_precision']})", f"{p['ours_img_per_s']:.0f} img/s"),
            *[
                (f"plain JPEG DataLoader, {w} workers", f"{r:.0f} img/s")
                for w, r in p["plain_img_per_s"].items()
            ],
            ("speed-up vs best plain", f"{p['speedup_vs_best_plain']:.2f}x"),
        ]
    if "precision" in results:
        p = results["precision"]
        rows += [
            ("train step fp32", f"{p['fp32_img_per_s']:.0f} img/s"),
            ("train step bf16", f"{p['bf16_img_per_s']:.0f} img/s"),
            ("bf16 speed-up", f"{p['bf16_speedup']:.2f}x"),
        ]
        for index in range(0, len(p["fp32_losses"]), max(1, len(p["fp32_losses"]) // 6)):
            rows.append(
                (
                    f"loss at step {index + 1} fp32 / bf16",
                    f"{p['fp32_losses'][index]:.1f} / {p['bf16_losses'][index]:.1f}",
                )
            )
    if "flops" in results:
        f = results["flops"]
        rows.append(("train step GFLOP per image", f"{f['train_step_gflop_per_image']:.3f}"))
        for precision in ("fp32", "bf16"):
            rows.append(
                (
                    f"{precision} achieved / matmul peak GFLOP/s",
                    f"{f[precision]['achieved_gflops']:.0f} / "
                    f"{f[precision]['matmul_peak_gflops']:.0f} "
                    f"({100 * f[precision]['fraction_of_peak']:.0f}%)",
                )
            )
    if "compile" in results:
        c = results["compile"]
        rows += [
            (f"eager step ({c['precision']})", f"{c['eager_img_per_s']:.0f} img/s"),
            (f"compiled step ({c['precision']})", f"{c['compiled_img_per_s']:.0f} img/s"),
            ("compile time", f"{c['compile_seconds']:.0f} s"),
        ]
    if "ddp" in results:
        d = results["ddp"]
        rows += [
            ("zoo train, 1 process", f"{d['1_process_img_per_s']:.0f} img/s"),
            ("zoo train, 2 processes", f"{d['2_process_img_per_s']:.0f} img/s"),
        ]
    for row in rows:
        table.add_row(*row)
    console.print(table)


if __name__ == "__main__":
    main()
