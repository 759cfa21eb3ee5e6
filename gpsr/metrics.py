"""Table 1 metrics as torchmetrics objects (docs/method.md §6): PSNR, SSIM, consistency.

All take images in [0, 1]. Per-image values are averaged over images, and the states reduce
across DDP processes (sums and counts, or gathered per-image values).
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image import PeakSignalNoiseRatio

from gpsr import ops

__all__ = ["CONSISTENCY_UNIT", "SSIM", "Consistency", "SRMetrics", "psnr_metric", "ssim_metric"]

CONSISTENCY_UNIT = 1e-5
"""Consistency is reported in units of 1e-5 MSE, as in Table 1."""


def psnr_metric() -> PeakSignalNoiseRatio:
    """Per-image PSNR `-10 log10(MSE)`, data range 1, no border crop, mean over images."""
    return PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3), reduction="elementwise_mean")


class SSIM(Metric):
    """Per-image RGB SSIM, mean over images (docs/method.md §6; the SR3 / IDM / scikit-image convention).

    Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data range 1. The SSIM map comes from
    torchmetrics; each image's value is the mean of that map over all channels with the
    5-pixel border (half the window) left out, as scikit-image's `structural_similarity` does.
    update(sr, hr): (N, C, H, W) each in [0, 1], H and W > 10.
    """

    higher_is_better = True
    full_state_update = False
    kernel_size = 11

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, sr: torch.Tensor, hr: torch.Tensor) -> None:
        _, ssim_map = structural_similarity_index_measure(
            sr.double(),
            hr.double(),
            gaussian_kernel=True,
            sigma=1.5,
            kernel_size=self.kernel_size,
            k1=0.01,
            k2=0.03,
            data_range=1.0,
            reduction="none",
            return_full_image=True,
        )
        pad = (self.kernel_size - 1) // 2
        per_image = ssim_map[..., pad:-pad, pad:-pad].flatten(1).mean(1)
        self.total += per_image.sum()
        self.count += per_image.numel()

    def compute(self) -> torch.Tensor:
        return self.total / self.count.clamp(min=1)


def ssim_metric() -> SSIM:
    """The SSIM of Table 1 (see `SSIM`)."""
    return SSIM()


class Consistency(Metric):
    """Per-image `mean((D_s(SR) - LR)^2)` averaged over images, reported x 1e5.

    update(sr, lr): sr (N, C, H, W) in [0, 1], lr (N, C, H/s, W/s) in [0, 1] units (float,
    not rounded). compute() -> scalar in units of 1e-5.
    """

    higher_is_better = False
    full_state_update = False

    def __init__(self, scale: int, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("worst", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="max")

    def update(self, sr: torch.Tensor, lr: torch.Tensor) -> None:
        per_image = per_image_consistency(sr, lr, self.scale)
        self.total += per_image.sum()
        self.count += per_image.numel()
        self.worst = torch.maximum(self.worst, per_image.max())

    def compute(self) -> torch.Tensor:
        return self.total / self.count.clamp(min=1) / CONSISTENCY_UNIT

    def compute_worst(self) -> torch.Tensor:
        """The largest per-image consistency seen (x 1e5), reduced with max across processes."""
        with self.sync_context():
            worst = self.worst.clone()
        return worst / CONSISTENCY_UNIT


def per_image_consistency(sr: torch.Tensor, lr: torch.Tensor, scale: int) -> torch.Tensor:
    """`mean((D_s(sr) - lr)^2)` per image in float64: (N, C, H, W), (N, C, h, w) -> (N,) MSE."""
    return ((ops.degrade(sr.double(), scale) - lr.double()) ** 2).flatten(1).mean(1)


class SRMetrics(nn.Module):
    """PSNR, SSIM and consistency of one method, updated together.

    update(sr, hr, lr): sr, hr (N, C, H, W) in [0, 1]; lr (N, C, H/s, W/s) in [0, 1] units.
    compute() -> {"psnr", "ssim", "consistency"} as floats (consistency x 1e5).
    """

    def __init__(self, scale: int):
        super().__init__()
        self.psnr = psnr_metric()
        self.ssim = ssim_metric()
        self.consistency = Consistency(scale)

    def update(self, sr: torch.Tensor, hr: torch.Tensor, lr: torch.Tensor) -> None:
        sr, hr = sr.float(), hr.float()
        self.psnr.update(sr, hr)
        self.ssim.update(sr, hr)
        self.consistency.update(sr, lr)

    def compute(self, worst: bool = False) -> dict[str, float]:
        """Means over images; with `worst`, also the largest per-image consistency."""
        out = {
            "psnr": float(self.psnr.compute()),
            "ssim": float(self.ssim.compute()),
            "consistency": float(self.consistency.compute()),
        }
        if worst:
            out["consistency_max"] = float(self.consistency.compute_worst())
        return out

    def reset(self) -> None:
        for m in (self.psnr, self.ssim, self.consistency):
            m.reset()
