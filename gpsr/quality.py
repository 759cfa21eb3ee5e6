"""Image-quality metrics that need no pretrained weights (docs/metrics.md): MS-SSIM, HaarPSI,
the radial power-spectrum error and the sliced Wasserstein distance of Laplacian-pyramid
patches; and the SR tables' conventions (Y channel, border crop).

All take images in [0, 1], (N, C, H, W). Per-image values are averaged over images; set
metrics keep their descriptors, gathered across DDP processes.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

__all__ = [
    "MS_SSIM_BETAS",
    "to_y",
    "crop_border",
    "ms_ssim_scales",
    "per_image_ms_ssim",
    "per_image_haarpsi",
    "radial_psd",
    "per_image_psd_error",
    "laplacian_descriptors",
    "sliced_wasserstein",
    "SlicedWasserstein",
]

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, five scales


def to_y(x: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma of RGB in [0, 1], as MATLAB's / scikit-image's `rgb2ycbcr` gives it
    (studio range: 16..235 of 255) divided by 255: (N, 3, H, W) -> (N, 1, H, W)."""
    w = torch.tensor([65.481, 128.553, 24.966], dtype=x.dtype, device=x.device) / 255.0
    return (16.0 / 255.0 + (x * w[None, :, None, None]).sum(1, keepdim=True)).to(x.dtype)


def crop_border(x: torch.Tensor, n: int) -> torch.Tensor:
    """Drop `n` pixels on each side: (N, C, H, W) -> (N, C, H - 2n, W - 2n)."""
    return x[..., n : x.shape[-2] - n, n : x.shape[-1] - n] if n > 0 else x


def ms_ssim_scales(height: int, width: int, kernel: int = 11) -> int:
    """The most MS-SSIM scales (at most 5) an image of this size allows with an 11-tap window
    (torchmetrics' rule: side >= (kernel - 1) * (scales - 1)^2 and >= 2^scales)."""
    side = min(height, width)
    n = 5
    while n > 1 and (side < (kernel - 1) * max(1, n - 1) ** 2 or side < 2**n):
        n -= 1
    return n


def per_image_ms_ssim(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """MS-SSIM per image (Gaussian window 11, sigma 1.5, data range 1): five scales with Wang
    et al.'s weights when the image is large enough (at least 161 pixels a side), else the
    first scales that fit with their weights renormalised to sum 1 (two at 32 x 32),
    computed in float32: (N, C, H, W) -> (N,) float64."""
    n = ms_ssim_scales(*sr.shape[-2:])
    betas = tuple(b / sum(MS_SSIM_BETAS[:n]) for b in MS_SSIM_BETAS[:n])
    return (
        multiscale_structural_similarity_index_measure(
            sr.float(), hr.float(), data_range=1.0, reduction="none", betas=betas
        )
        .flatten()
        .double()
    )


def per_image_haarpsi(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """HaarPSI (Reisenhofer et al. 2018) per image, piq's implementation (its defaults:
    3 scales, C = 30, alpha = 4.2, subsampling): (N, 3, H, W) -> (N,) float64, 1 = identical."""
    import piq

    return piq.haarpsi(sr.double().clamp(0, 1), hr.double(), data_range=1.0, reduction="none")


def radial_psd(x: torch.Tensor) -> torch.Tensor:
    """Radially averaged power spectrum, channels averaged: (N, C, H, W) -> (N, B) float64.

    Per channel, `|FFT2(x - mean)|^2 / (H W)`; frequencies (cycles per pixel) binned by their
    radius r = sqrt(fy^2 + fx^2) into B = min(H, W) // 2 bins of width 1 / min(H, W) from 0
    to the Nyquist frequency 0.5 (corners beyond 0.5 are left out); each bin the mean power of
    its frequencies; the bins' powers averaged over channels."""
    n, c, h, w = x.shape
    xd = x.double()
    power = torch.fft.fft2(xd - xd.mean((-2, -1), keepdim=True)).abs().square() / (h * w)
    fy = torch.fft.fftfreq(h, dtype=torch.float64, device=x.device)
    fx = torch.fft.fftfreq(w, dtype=torch.float64, device=x.device)
    r = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt()
    bins = min(h, w) // 2
    idx = (r * min(h, w)).round().long()  # bin k holds radii in [(k - 1/2), (k + 1/2)) / min
    keep = (idx >= 1) & (idx <= bins)
    flat_idx = idx[keep] - 1
    counts = torch.bincount(flat_idx, minlength=bins).double()
    p = power.mean(1)[:, keep]  # channels averaged: (N, K)
    sums = torch.zeros(n, bins, dtype=torch.float64, device=x.device).index_add_(1, flat_idx, p)
    return sums / counts.clamp(min=1)


def per_image_psd_error(sr: torch.Tensor, hr: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mean |log10 PSD(SR) - log10 PSD(HR)| over the radial bins of the upper half of the
    band (radius above a quarter cycle per pixel), `radial_psd`: (N, C, H, W) -> (N,).
    0 = the same spectrum; blur shows as a deficit of high frequencies, over-sharpening or
    noise as an excess, both counted."""
    a, b = radial_psd(sr), radial_psd(hr)
    upper = a.shape[1] // 2  # bins k > B/2: radius above 0.25
    diff = (torch.log10(a[:, upper:] + eps) - torch.log10(b[:, upper:] + eps)).abs()
    return diff.mean(1)


def _pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Laplacian pyramid with the 5-tap binomial filter [1, 4, 6, 4, 1] / 16: finest level
    first, the last level the low-pass residual."""
    k1 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=x.dtype, device=x.device) / 16
    k = (k1[:, None] * k1[None, :]).expand(x.shape[1], 1, 5, 5)

    def blur(z):
        return F.conv2d(F.pad(z, (2, 2, 2, 2), mode="reflect"), k, groups=z.shape[1])

    out, cur = [], x
    for _ in range(levels - 1):
        small = blur(cur)[..., ::2, ::2]
        up = torch.zeros_like(cur)
        up[..., ::2, ::2] = small
        out.append(cur - 4 * blur(up))
        cur = small
    out.append(cur)
    return out


def laplacian_descriptors(
    x: torch.Tensor, levels: int, per_image: int = 64, patch: int = 7, seed: int = 0
) -> list[torch.Tensor]:
    """Karras et al.'s SWD descriptors: per pyramid level, `per_image` random `patch x patch`
    neighbourhoods (all channels) of each image, positions seeded by (`seed`, level) so SR and
    HR sets are sampled alike: (N, C, H, W) -> [(N * per_image, C * patch^2)] per level.
    Levels whose side is smaller than the patch are skipped."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for level in _pyramid(x.double(), levels):
        h, w = level.shape[-2:]
        if min(h, w) < patch:
            continue
        ys = torch.randint(0, h - patch + 1, (per_image,), generator=gen)
        xs = torch.randint(0, w - patch + 1, (per_image,), generator=gen)
        patches = level.unfold(2, patch, 1).unfold(3, patch, 1)  # (N, C, h', w', p, p)
        sel = patches[:, :, ys.to(level.device), xs.to(level.device)]  # (N, C, K, p, p)
        out.append(sel.permute(0, 2, 1, 3, 4).reshape(-1, x.shape[1] * patch * patch))
    return out


def _unit_directions(dim: int, directions: int, seed: int) -> torch.Tensor:
    """`directions` seeded random unit vectors of R^dim: (dim, directions) float64."""
    dirs = torch.randn(
        dim, directions, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    return dirs / dirs.norm(dim=0, keepdim=True)


def _project(d: torch.Tensor, dirs: torch.Tensor) -> np.ndarray:
    """A descriptor set (M, D), normalised by its own per-dimension mean and standard
    deviation, projected on the unit columns of `dirs` (D, L): (M, L), numpy, in float32 for
    float32 descriptors (else float64)."""
    dtype = torch.promote_types(d.dtype, torch.float32)
    d = d.to(dtype)
    d = (d - d.mean(0)) / d.std(0).clamp(min=1e-12)
    return (d @ dirs.to(device=d.device, dtype=dtype)).cpu().numpy()


def _sorted_distance(pa: np.ndarray, pb: np.ndarray) -> float:
    """Mean over the L columns of the 1-D Wasserstein-1 distance of two equal-size samples
    (M, L): the mean absolute difference of their sorted values, in float64."""
    return _sorted_rows_distance(np.ascontiguousarray(pa.T), np.ascontiguousarray(pb.T))


def _sorted_rows_distance(ra: np.ndarray, rb: np.ndarray) -> float:
    """`_sorted_distance` of samples laid out as rows (L, M): the mean absolute difference of
    each row's sorted values, averaged over rows, in float64."""
    # numpy's sort along contiguous rows is about ten times torch's on CPU here.
    sa, sb = np.sort(ra, axis=1), np.sort(rb, axis=1)
    return float(np.abs(sa - sb).mean(dtype=np.float64))


def sliced_wasserstein(
    a: torch.Tensor,
    b: torch.Tensor,
    directions: int = 128,
    seed: int = 0,
    dirs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sliced Wasserstein-1 distance of two equal-size descriptor sets (M, D), each normalised
    by its own per-dimension mean and standard deviation (Karras et al.): the mean over
    `directions` random unit directions (seeded; or the columns of `dirs` (D, L)) of the 1-D
    Wasserstein distance of the projections (the mean absolute difference of the sorted
    projections). -> scalar float64."""
    if a.shape != b.shape:
        raise ValueError(f"descriptor sets differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if dirs is None:
        dirs = _unit_directions(a.shape[1], directions, seed)
    else:
        dirs = dirs / dirs.norm(dim=0, keepdim=True)
    return torch.tensor(_sorted_distance(_project(a, dirs), _project(b, dirs)), dtype=torch.float64)


class SlicedWasserstein(Metric):
    """SWD between the SR and HR image sets (Karras et al., ICLR 2018): Laplacian-pyramid
    7 x 7 descriptors (`laplacian_descriptors`, 32 per image and level), `sliced_wasserstein`
    per level (128 directions, float32), averaged over levels; and a bootstrap spread (the
    standard deviation of the SWD over `bootstrap` = 20 resamplings of the images, each on
    the projections of the whole sets: the normalisation is not refitted per resampling).

    update(sr, hr): (N, C, H, W) in [0, 1]; only the descriptors are kept (float32, per
    image: levels x per_image x C 49 values, 19 KB at 3 levels, RGB), not the images.
    compute() -> (swd, spread), x 1e3 as Karras reports it. A set metric: it depends on the
    number of images, state it beside it."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, levels: int = 3, per_image: int = 32, bootstrap: int = 20, **kwargs):
        super().__init__(**kwargs)
        self.levels, self.per_image, self.bootstrap = levels, per_image, bootstrap
        self.add_state("sr", [], dist_reduce_fx="cat")
        self.add_state("hr", [], dist_reduce_fx="cat")

    def _descriptors(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, per_image, D) float32; levels too small for a patch are
        left out (the same ones for SR and HR)."""
        levels = laplacian_descriptors(x, self.levels, self.per_image)
        return torch.stack([d.reshape(x.shape[0], self.per_image, -1) for d in levels], 1).float()

    def update(self, sr: torch.Tensor, hr: torch.Tensor) -> None:
        self.sr.append(self._descriptors(sr.detach()))
        self.hr.append(self._descriptors(hr.detach()))

    def compute(self) -> tuple[float, float]:
        sr = torch.cat(self.sr) if isinstance(self.sr, list) else self.sr
        hr = torch.cat(self.hr) if isinstance(self.hr, list) else self.hr
        n, levels, k, dim = sr.shape
        dirs = _unit_directions(dim, 128, 0)  # sliced_wasserstein's seeded directions
        # Per level, both sets projected once, kept per direction and image: (L, N, K) each,
        # so that a resampling's values of one direction are a contiguous row.
        proj = [
            tuple(
                np.ascontiguousarray(
                    _project(x[:, lv].reshape(-1, dim), dirs).reshape(n, k, -1).transpose(2, 0, 1)
                )
                for x in (sr, hr)
            )
            for lv in range(levels)
        ]

        def swd(images: np.ndarray) -> float:
            """The SWD of these images (indices, repeats allowed), averaged over levels."""
            return float(
                np.mean(
                    [
                        _sorted_rows_distance(pa[:, images].reshape(pa.shape[0], -1),
                                              pb[:, images].reshape(pb.shape[0], -1))
                        for pa, pb in proj
                    ]
                )
            )  # fmt: skip

        # The value, then the spread: images resampled with replacement, on the projections
        # of the whole sets (the normalisation is not refitted per resampling). Each is a
        # few independent numpy sorts, which release the GIL: run on torch's threads.
        gen = torch.Generator().manual_seed(0)
        draws = [np.arange(n)]
        if n >= 2 and self.bootstrap >= 2:
            draws += [
                torch.randint(0, n, (n,), generator=gen).numpy() for _ in range(self.bootstrap)
            ]
        with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
            value, *boots = pool.map(swd, draws)
        if not boots:
            return 1e3 * value, math.nan
        return 1e3 * value, 1e3 * float(np.std(boots, ddof=1))
