"""Reconstruction quality on held-out images: MSE, PSNR and SSIM of the posterior-mean decode."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from benchmarks.metric import BenchContext, Metric, register_metric


@register_metric("recon")
class Reconstruction(Metric):
    """Per-image MSE, PSNR (dB) and SSIM between images and their reconstructions, averaged."""

    title = "Reconstruction"

    @torch.inference_mode()
    def compute(self, context: BenchContext) -> dict[str, Any]:
        model = context.model.eval()
        totals = torch.zeros(3, dtype=torch.float64)
        for _, images, labels in context.batches():
            recon = model.reconstruct(images, labels).float().clamp(0, 1)
            mse = (recon - images).pow(2).mean(dim=(1, 2, 3))
            psnr = peak_signal_noise_ratio(
                recon, images, data_range=1.0, reduction="none", dim=(1, 2, 3)
            )
            ssim = structural_similarity_index_measure(
                recon, images, data_range=1.0, reduction="none"
            )
            totals += torch.stack([mse.sum(), psnr.sum(), ssim.sum()]).double().cpu()
        mse, psnr, ssim = (totals / context.count).tolist()
        return {"mse": mse, "psnr": psnr, "ssim": ssim, "n": context.count}

    def card_values(self, result: dict[str, Any]) -> dict[str, float]:
        return {"MSE": result["mse"], "PSNR": result["psnr"], "SSIM": result["ssim"]}

    def headline(self, result: dict[str, Any]) -> dict[str, str]:
        return {
            "MSE": f"{result['mse']:.4f}",
            "PSNR": f"{result['psnr']:.2f}",
            "SSIM": f"{result['ssim']:.3f}",
        }
