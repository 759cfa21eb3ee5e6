"""Table 1 metrics as torchmetrics objects (docs/method.md §6): PSNR, SSIM, consistency; and
for noisy LR images (docs/method.md §10) the consistency with the clean LR and the
discrepancy ratio.

All take images in [0, 1]. Per-image values are averaged over images, and the states reduce
across DDP processes (sums and counts, or gathered per-image values).
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image import PeakSignalNoiseRatio

from gpsr import ops, quality
from gpsr.utils.errors import ConfigError

__all__ = [
    "CONSISTENCY_UNIT",
    "SSIM",
    "Consistency",
    "DiscrepancyRatio",
    "PerImage",
    "SRMetrics",
    "per_image_consistency",
    "psnr_metric",
    "ssim_metric",
]

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


class _PerImageMean(Metric):
    """Mean and maximum of a per-image value over images of scale-`scale` SR (float64 sums,
    reduced across DDP processes); subclasses compute the values in `update`, pass them to
    `_add`, and set the unit they are reported in."""

    full_state_update = False
    unit = 1.0

    def __init__(self, scale: int, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("worst", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="max")

    def _add(self, per_image: torch.Tensor) -> None:
        if per_image.numel() == 0:
            return
        self.total += per_image.sum()
        self.count += per_image.numel()
        self.worst = torch.maximum(self.worst, per_image.max())

    def compute(self) -> torch.Tensor:
        return self.total / self.count.clamp(min=1) / self.unit

    def compute_worst(self) -> torch.Tensor:
        """The largest per-image value seen (in the metric's unit), reduced with max across
        processes."""
        with self.sync_context():
            worst = self.worst.clone()
        return worst / self.unit


class Consistency(_PerImageMean):
    """Per-image `mean((D_s(SR) - LR)^2)` averaged over images, reported x 1e5.

    update(sr, lr): sr (N, C, H, W) in [0, 1], lr (N, C, H/s, W/s) in [0, 1] units (float,
    not rounded). compute() -> scalar in units of 1e-5.
    """

    higher_is_better = False
    unit = CONSISTENCY_UNIT

    def update(self, sr: torch.Tensor, lr: torch.Tensor) -> None:
        self._add(per_image_consistency(sr, lr, self.scale))


class DiscrepancyRatio(_PerImageMean):
    """Per-image `||D_s(SR) - y||^2 / (m sigma^2)` (m = C h w LR values; docs/method.md §10):
    the residual left by a super-resolved image in units of the noise it was given. 1 is the
    target of the discrepancy principle (the sample keeps the scene and leaves the noise);
    near 0 it copied the noise. Images with sigma = 0 are left out (no ratio).

    update(sr, y, sigma): sr (N, C, H, W) in [0, 1], y (N, C, H/s, W/s) the noisy LR it was
    given, sigma (N,) the noise level the sampler used, [0, 1] pixel units. compute() ->
    mean ratio (a plain number), compute_worst() -> the largest.
    """

    higher_is_better = False

    def update(self, sr: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor) -> None:
        sig = sigma.to(device=sr.device, dtype=torch.float64).flatten()
        keep = sig > 0
        ratio = per_image_consistency(sr[keep], y[keep], self.scale) / sig[keep].square()
        self._add(ratio)


def per_image_consistency(sr: torch.Tensor, lr: torch.Tensor, scale: int) -> torch.Tensor:
    """`mean((D_s(sr) - lr)^2)` per image in float64: (N, C, H, W), (N, C, h, w) -> (N,) MSE."""
    return ((ops.degrade(sr.double(), scale) - lr.double()) ** 2).flatten(1).mean(1)


class PerImage(_PerImageMean):
    """Mean over images of a per-image value `fn(sr, hr) -> (N,)` (e.g. MS-SSIM, HaarPSI, the
    power-spectrum error). update(sr, hr): (N, C, H, W) each in [0, 1]."""

    def __init__(self, fn, **kwargs):
        super().__init__(1, **kwargs)
        self.fn = fn

    def update(self, sr: torch.Tensor, hr: torch.Tensor) -> None:
        self._add(self.fn(sr, hr).double())


def _set_value(name: str, metric) -> dict[str, float]:
    """FID -> {"fid"}; KID -> {"kid", "kid_spread"} (mean and standard deviation over random
    subsets of min(1000, n) images, n over all DDP processes, drawn with a fixed seed). NaN
    with fewer than 2 images."""
    import math

    n = None
    if name == "kid":  # every process's images count (all processes draw the same subsets)
        with metric.sync_context():
            feats = metric.fake_features
            n = int(sum(x.shape[0] for x in feats) if isinstance(feats, list) else len(feats))
    try:
        if name == "fid":
            return {"fid": float(metric.compute())}
        metric.subset_size = min(1000, n)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            mean, std = metric.compute()
        return {"kid": float(mean), "kid_spread": float(std)}
    except (ValueError, RuntimeError):
        return {name: math.nan, **({"kid_spread": math.nan} if name == "kid" else {})}


class SRMetrics(nn.Module):
    """PSNR, SSIM and consistency of one method, updated together; with `clean`, the
    consistency with the clean LR image, and with `discrepancy`, the discrepancy ratio
    (noisy LR images, docs/method.md §10); with `extras`, the metrics that need no weights
    (docs/metrics.md): MS-SSIM, HaarPSI, the power-spectrum error and the SWD with its
    bootstrap spread; `y_channel` and `crop` (pixels per side) set the SR tables'
    convention for PSNR and SSIM (default: RGB, no crop, the paper's); `learned` maps names
    (`lpips_alex`, `lpips_vgg`, `dists`) to per-image functions from
    `gpsr.learned.build_learned`,
    `sets` names (`fid`, `kid`) to factories of their metric objects
    (`gpsr.learned.build_set_metrics`).

    update(sr, hr, lr, lr_clean=None, sigma=None): sr, hr (N, C, H, W) in [0, 1]; lr (N, C,
    H/s, W/s) in [0, 1] units, the LR the method was given; lr_clean the noise-free one
    (with `clean`); sigma (N,) the noise level the sampler used (with `discrepancy`).
    compute() -> {"psnr", "ssim", "consistency"[, "consistency_clean"][,
    "discrepancy_ratio"][, "ms_ssim", "haarpsi", "psd_error", "swd", "swd_spread"]} as floats
    (consistencies x 1e5, SWD x 1e3).
    """

    def __init__(
        self,
        scale: int,
        clean: bool = False,
        discrepancy: bool = False,
        extras: bool = False,
        y_channel: bool = False,
        crop: int = 0,
        learned: dict | None = None,
        sets: dict | None = None,
    ):
        super().__init__()
        self.psnr = psnr_metric()
        self.ssim = ssim_metric()
        self.consistency = Consistency(scale)
        self.consistency_clean = Consistency(scale) if clean else None
        self.discrepancy_ratio = DiscrepancyRatio(scale) if discrepancy else None
        self.y_channel, self.crop = y_channel, crop
        self.quality = (
            nn.ModuleDict(
                {
                    "ms_ssim": PerImage(quality.per_image_ms_ssim),
                    "haarpsi": PerImage(quality.per_image_haarpsi),
                    "psd_error": PerImage(quality.per_image_psd_error),
                }
            )
            if extras
            else None
        )
        self.swd = quality.SlicedWasserstein() if extras else None
        # Learned metrics (gpsr.learned.build_learned): one shared network each, per-image means here.
        self.learned = nn.ModuleDict({k: PerImage(fn) for k, fn in (learned or {}).items()})
        # FID / KID (gpsr.learned.build_set_metrics): HR images as the real set, SR as fake.
        self.sets = nn.ModuleDict({k: make() for k, make in (sets or {}).items()})

    def update(
        self,
        sr: torch.Tensor,
        hr: torch.Tensor,
        lr: torch.Tensor,
        lr_clean: torch.Tensor | None = None,
        sigma: torch.Tensor | None = None,
    ) -> None:
        sr, hr = sr.float(), hr.float()
        # The SR tables' conventions apply to PSNR and SSIM only (Y channel, border crop).
        a, b = (quality.to_y(sr), quality.to_y(hr)) if self.y_channel else (sr, hr)
        if self.crop and min(sr.shape[-2:]) - 2 * self.crop <= SSIM.kernel_size:
            raise ConfigError(
                f"metrics.crop_border={self.crop} leaves too little of a {sr.shape[-1]}x"
                f"{sr.shape[-2]} image for SSIM's 11-pixel window: lower it"
            )
        a, b = quality.crop_border(a, self.crop), quality.crop_border(b, self.crop)
        self.psnr.update(a, b)
        self.ssim.update(a, b)
        self.consistency.update(sr, lr)
        if self.quality is not None:
            for metric in self.quality.values():
                metric.update(sr, hr)
            self.swd.update(sr, hr)
        for metric in self.learned.values():
            metric.update(sr, hr)
        for metric in self.sets.values():  # the Inception network takes 8-bit images
            metric.update((hr.clamp(0, 1) * 255).round().byte(), real=True)
            metric.update((sr.clamp(0, 1) * 255).round().byte(), real=False)
        if self.consistency_clean is not None:
            if lr_clean is None:
                raise ValueError("SRMetrics(clean=True).update needs lr_clean")
            self.consistency_clean.update(sr, lr_clean)
        if self.discrepancy_ratio is not None:
            if sigma is None:
                raise ValueError("SRMetrics(discrepancy=True).update needs sigma")
            self.discrepancy_ratio.update(sr, lr, sigma)

    def _extras(self) -> list[tuple[str, _PerImageMean]]:
        pairs = (
            ("consistency_clean", self.consistency_clean),
            ("discrepancy_ratio", self.discrepancy_ratio),
        )
        return [(name, m) for name, m in pairs if m is not None]

    def compute(self, worst: bool = False) -> dict[str, float]:
        """Means over images; with `worst`, also the largest per-image value of each
        consistency and ratio (`<name>_max`)."""
        out = {
            "psnr": float(self.psnr.compute()),
            "ssim": float(self.ssim.compute()),
            "consistency": float(self.consistency.compute()),
        }
        if self.quality is not None:
            out.update({name: float(m.compute()) for name, m in self.quality.items()})
            out["swd"], out["swd_spread"] = self.swd.compute()
        out.update({name: float(m.compute()) for name, m in self.learned.items()})
        for name, metric in self.sets.items():
            out.update(_set_value(name, metric))
        if worst:
            out["consistency_max"] = float(self.consistency.compute_worst())
        for name, metric in self._extras():
            out[name] = float(metric.compute())
            if worst:
                out[f"{name}_max"] = float(metric.compute_worst())
        return out

    def reset(self) -> None:
        for m in (self.psnr, self.ssim, self.consistency, *(m for _, m in self._extras())):
            m.reset()
