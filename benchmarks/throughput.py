"""Images per second for encode, decode, generate and one training step, on the current device.

Each operation is warmed up, then timed several times with the device synchronised;
the median is reported, because the first calls pay for allocation and kernel choice and
single timings on a shared machine are noisy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.metric import BenchContext, Metric, option, register_metric
from zoo.errors import ZooError
from zoo.precision import PRECISIONS, autocast, choose_precision
from zoo.step import make_optimizer, measure_step_times, median_seconds, step_subject, train_step
from zoo.train import TrainSettings

WARMUP_CALLS = 5  # oneDNN picks bf16 kernels over the first few calls


def time_call(
    call: Callable[[], Any], device: torch.device, repeats: int
) -> tuple[float, float | None]:
    """(median seconds per call after the warm-up, peak memory in MB over the warm-up and the
    timed calls on CUDA, or None where it is not reported)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    median = median_seconds(call, device, WARMUP_CALLS, repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return median, peak


@register_metric("throughput")
class Throughput(Metric):
    """Median images/s of encode, decode, generate and a training step at a stated batch size,
    in the precision training uses (the option ``throughput.precision``)."""

    title = "Throughput"

    @dataclass(frozen=True)
    class Options:
        batch_size: int = option(64, "Images per timed call.", low=1, high=65536)
        repeats: int = option(5, "Timed calls per operation; the median is reported.", low=1)
        precision: str = option(
            "auto",
            "Precision of the timed calls, as zoo train chooses it (quality metrics run in fp32).",
            choices=("auto", *PRECISIONS),
        )

    def compute(self, context: BenchContext) -> dict[str, Any]:
        settings, device, model = context.settings, context.device, context.model.eval()
        options = context.options(self)
        batch = options.batch_size
        index = torch.arange(batch) % len(context.data)
        images, _ = context.data.batch(index, device)
        labels = context.labels
        y = labels[index].to(device) if labels is not None else None
        with torch.inference_mode():
            z = model.encode(images, y).mean
        trainee = copy.deepcopy(model).train()  # zoo train's step: its Adam, its finiteness check
        optimizer = make_optimizer(trainee.parameters(), device, TrainSettings.lr)

        def step_in(precision: str) -> None:
            train_step(lambda: trainee(images, y), trainee, optimizer, device, precision)

        precision = choose_precision(
            device,
            options.precision,
            lambda: measure_step_times(step_in, device),
            step_subject(context.info.model_name, trainee, images),
        ).precision

        def one_step() -> None:
            step_in(precision)

        def inference(call: Callable[[], Any]) -> Callable[[], Any]:
            """`call` as the models run at inference: no autograd, in the chosen precision."""

            def run() -> Any:
                with torch.inference_mode(), autocast(device, precision):
                    return call()

            return run

        generator = torch.Generator(device).manual_seed(settings.seed)
        operations: dict[str, Callable[[], Any]] = {
            "encode": inference(lambda: model.encode(images, y)),
            "decode": inference(lambda: model.decode(z, y)),
            "generate": inference(lambda: model.generate(batch, y, generator=generator)),
            "train_step": one_step,  # autocast inside, around the forward pass only
        }
        extractors = self._feature_extractors(context, images)
        operations.update({name: inference(call) for name, call in extractors.items()})
        rates, medians, peaks = {}, {}, {}
        for name, call in operations.items():
            median, peak = time_call(call, device, options.repeats)
            rates[name] = batch / median
            medians[name] = median * 1000
            peaks[name] = peak
        return {
            "batch_size": batch,
            "repeats": options.repeats,
            "warmup_calls": WARMUP_CALLS,
            "device": str(device),
            "precision": precision,
            "threads": torch.get_num_threads(),
            "images_per_s": rates,
            "median_ms": medians,
            "peak_memory_mb": peaks if device.type == "cuda" else None,
            "peak_memory_note": None if device.type == "cuda" else f"not reported on {device.type}",
            "not_measured": self.not_measured,
        }

    def data_used(self, context: BenchContext) -> dict[str, Any]:
        """The first ``throughput.batch_size`` images of the split (repeated if it is smaller)."""
        return context.data_record(min(context.options(self).batch_size, len(context.data)))

    def _feature_extractors(
        self, context: BenchContext, images: torch.Tensor
    ) -> dict[str, Callable[[], Any]]:
        """FID feature extraction per extractor that is available here; the rest say why not."""
        from benchmarks.fid import FEATURE_CHOICES, extractor_for

        calls: dict[str, Callable[[], Any]] = {}
        self.not_measured: dict[str, str] = {}
        for choice in FEATURE_CHOICES:
            try:
                extractor = extractor_for(context, choice)
            except ZooError as error:
                self.not_measured[f"fid_features_{choice}"] = str(error).split(";")[0]
                continue
            prepared = extractor.prepare(images).to(extractor.device)
            features = extractor.metric.inception
            calls[f"fid_features_{choice}"] = lambda f=features, p=prepared: f(p)
        return calls

    def card_values(self, result: dict[str, Any]) -> dict[str, float]:
        rates = result["images_per_s"]
        return {"gen img/s": rates["generate"], "train img/s": rates["train_step"]}

    def headline(self, result: dict[str, Any]) -> dict[str, str]:
        rates = result["images_per_s"]
        return {
            "gen img/s": f"{rates['generate']:.0f}",
            "train img/s": f"{rates['train_step']:.0f}",
        }
