"""The fixed operators of GPSR: degradation, Haar transform, embeddings and projections.

One implementation of each operation, used by the data pipeline, the losses, the metrics and
the sampler alike (docs/method.md §1, §2, §8). Images are float tensors shaped (N, C, H, W).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from gpsr.banded import (
    degradation_band,
    dense_degradation,
    gram_inverse_band,
    separable,
    separable_adjoint,
)
from gpsr.utils.errors import ConfigError

__all__ = [
    "to_signed",
    "to_unit",
    "dequantize",
    "check_divisible",
    "modcrop",
    "degrade",
    "degradation_matrix",
    "pseudoinverse",
    "gram_inverse",
    "haar2d",
    "haar_logdet",
    "ihaar2d",
    "upsample_nearest",
    "downsample_average",
    "upsample_bicubic",
    "noisy_measurement",
    "quantize_8bit",
    "degradation_range",
    "QUANT_NOISE_STD",
]

QUANT_STEP = 2.0 / 255.0
"""Width of one 8-bit level in the [-1, 1] range."""

QUANT_NOISE_STD = 1.0 / (255.0 * math.sqrt(12.0))
"""Standard deviation of 8-bit rounding error in [0, 1] units (uniform over one level)."""


def to_signed(x01: torch.Tensor) -> torch.Tensor:
    """Map [0, 1] to [-1, 1]: `2x - 1`. Any shape."""
    return x01 * 2.0 - 1.0


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Map [-1, 1] to [0, 1]: `(x + 1) / 2`, without clamping. Any shape."""
    return (x + 1.0) * 0.5


def dequantize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform dequantization of 8-bit images in [-1, 1] (docs/method.md §1).

    The one place dequantization happens: the training steps of both stages call it.
    x: (N, C, H, W) in [-1, 1] on 8-bit levels -> same shape, `x + U[0, 2/255)`.
    """
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + noise * QUANT_STEP


def check_divisible(height: int, width: int, scale: int, what: str = "image") -> None:
    """Raise ValueError naming the sizes unless both sides are multiples of `scale`."""
    if scale < 1:
        raise ConfigError(f"scale must be a positive integer, got {scale}")
    if height % scale or width % scale:
        raise ConfigError(
            f"{what} of size {height}x{width} is not divisible by the scale {scale}; "
            f"crop it with gpsr.ops.modcrop or choose a size that is a multiple of {scale}"
        )


def modcrop(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Crop the bottom/right so both sides are multiples of `scale` (docs/method.md §1).

    x: (..., H, W) -> (..., H - H % scale, W - W % scale). Values unchanged.
    """
    h, w = x.shape[-2:]
    return x[..., : h - h % scale, : w - w % scale]


def degrade(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic antialiased downsampling `D_s` (a = -0.5), the degradation of the paper.

    Exactly `F.interpolate(mode="bicubic", antialias=True, align_corners=False)`.
    x: (N, C, H, W), any range, H and W multiples of `scale` -> (N, C, H/s, W/s), same range
    up to bicubic overshoot. Float output, never clamped or rounded (docs/method.md §1).
    """
    if x.dim() != 4:
        raise ConfigError(f"degrade expects (N, C, H, W), got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    check_divisible(h, w, scale)
    if scale == 1:
        return x
    return F.interpolate(
        x, size=(h // scale, w // scale), mode="bicubic", antialias=True, align_corners=False
    )


def degradation_matrix(
    n: int, scale: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The 1-D factor `A` of `D_s` as a dense matrix (n/s, n), so that `degrade(x) = A_h x A_w^T`
    per channel. O(n^2) memory: the projections use its banded form (`gpsr.banded`)."""
    check_divisible(n, n, scale, what="side")
    return dense_degradation(n, scale).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=8)
def degradation_range(scale: int) -> tuple[float, float]:
    """The smallest and largest value `D_s` gives any image in [0, 1]: per LR pixel, the sum of
    the negative (positive) products of its two 1-D rows, the extremes over every row of the
    dense factors of sides 1 to 32 LR pixels (border rows are cut and renormalised). About
    [-0.21, 1.21] at 2x and [-0.18, 1.18] at 8x: an LR value outside it comes from no image
    in [0, 1] (e.g. 0..255 or [-1, 1] pixels)."""
    lows, highs = [], []
    for side in range(1, 33):
        a = dense_degradation(side * scale, scale)
        pos, neg = a.clamp(min=0).sum(1), (-a).clamp(min=0).sum(1)
        highs.append(float((pos[:, None] * pos[None] + neg[:, None] * neg[None]).max()))
        lows.append(float(-(pos[:, None] * neg[None] + neg[:, None] * pos[None]).max()))
    return min(lows), max(highs)


def pseudoinverse(y: torch.Tensor, scale: int) -> torch.Tensor:
    """Linear Moore-Penrose pseudoinverse `D_s^+ y = A_h^+ y A_w^+T` (docs/method.md §8, Remark 1).

    `A^+ = A^T (A A^T)^-1` on each side, applied in linear time (`gpsr.banded`).
    y: (N, C, h, w) -> (N, C, h*s, w*s), minimum-norm solution of `degrade(x) = y`.
    """
    h, w = y.shape[-2:]
    a_h, a_w = degradation_band(h * scale, scale), degradation_band(w * scale, scale)
    y64 = y.to(torch.promote_types(y.dtype, torch.float64))
    return separable_adjoint(a_h, a_w, gram_inverse(y64, scale)).to(y.dtype)


def gram_inverse(y: torch.Tensor, scale: int) -> torch.Tensor:
    """`(D_s D_s^T)^-1 y = K_h y K_w^T` with `K = (A A^T)^-1` on each side, in linear time
    (`gpsr.banded`): the multipliers of the projection onto `degrade(x) = y`.
    y: (N, C, h, w) or (M, h, w) -> same shape and dtype."""
    h, w = y.shape[-2:]
    k_h, k_w = gram_inverse_band(h * scale, scale), gram_inverse_band(w * scale, scale)
    return separable(k_h, k_w, y)


def haar2d(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One-level Haar transform `H` on 2x2 blocks (docs/method.md §2).

    x: (N, C, H, W), even H and W -> coarse (N, C, H/2, W/2) = 2x2 average,
    details (N, 3C, H/2, W/2) = [horizontal | vertical | diagonal], each block of C channels
    `(TL+TR-BL-BR)/4`, `(TL+BL-TR-BR)/4`, `(TL+BR-TR-BL)/4`. Same range as x for coarse.
    """
    n, c, h, w = x.shape
    check_divisible(h, w, 2)
    p = F.pixel_unshuffle(x, 2).reshape(n, c, 4, h // 2, w // 2)
    tl, tr, bl, br = p.unbind(2)
    coarse = (tl + tr + bl + br) * 0.25
    d1 = (tl + tr - bl - br) * 0.25
    d2 = (tl + bl - tr - br) * 0.25
    d3 = (tl + br - tr - bl) * 0.25
    return coarse, torch.cat([d1, d2, d3], dim=1)


def haar_logdet(x: torch.Tensor) -> float:
    """log |det| of `haar2d`'s Jacobian for one image of x's shape (N, C, H, W): a constant.

    Each 2x2 block maps to its 4 outputs by (1/4) x a 4x4 Hadamard matrix, |det| = 1/16, so
    the transform contributes -log(2) per pixel (-1 bit per dimension).
    """
    return -math.log(2.0) * x[0].numel()


def ihaar2d(coarse: torch.Tensor, details: torch.Tensor) -> torch.Tensor:
    """Exact inverse of `haar2d`: (N, C, h, w) + (N, 3C, h, w) -> (N, C, 2h, 2w)."""
    n, c, h, w = coarse.shape
    if details.shape != (n, 3 * c, h, w):
        raise ConfigError(
            f"ihaar2d: details {tuple(details.shape)} do not match coarse {tuple(coarse.shape)}"
        )
    d1, d2, d3 = details.chunk(3, dim=1)
    tl = coarse + d1 + d2 + d3
    tr = coarse + d1 - d2 - d3
    bl = coarse - d1 + d2 - d3
    br = coarse - d1 - d2 + d3
    p = torch.stack([tl, tr, bl, br], dim=2).reshape(n, 4 * c, h, w)
    return F.pixel_shuffle(p, 2)


def upsample_nearest(y: torch.Tensor, k: int) -> torch.Tensor:
    """Nearest-neighbour embedding `U_k` of the measurement in the coarse space (docs/method.md §2).

    y: (N, C, h, w) -> (N, C, k*h, k*w); each pixel repeated on a k x k block.
    """
    if k == 1:
        return y
    return y.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)


def downsample_average(c: torch.Tensor, k: int) -> torch.Tensor:
    """Left inverse of `upsample_nearest`: k x k average pooling, (N, C, kh, kw) -> (N, C, h, w)."""
    if k == 1:
        return c
    return F.avg_pool2d(c, k)


def upsample_bicubic(y: torch.Tensor, scale: int) -> torch.Tensor:
    """Plain bicubic upsampling (the Table 1 baseline): (N, C, h, w) -> (N, C, s*h, s*w)."""
    return F.interpolate(y, scale_factor=scale, mode="bicubic", align_corners=False)


def quantize_8bit(y01: torch.Tensor) -> torch.Tensor:
    """Round to 8-bit levels, as saving a PNG does: any shape in [0, 1] -> `round(255 y) / 255`
    (values outside [0, 1] are clamped first)."""
    return (y01.clamp(0, 1) * 255.0).round() / 255.0


def noisy_measurement(
    y01: torch.Tensor,
    sigma: float | torch.Tensor,
    noise: torch.Tensor | None = None,
    quantize: bool = False,
) -> torch.Tensor:
    """A noisy LR measurement (docs/method.md §10): `clamp(y + sigma * noise, 0, 1)`, rounded to
    8-bit levels with `quantize`, as a camera and a saved PNG make it.

    y01: (N, C, h, w) clean LR in [0, 1] units (float, may overshoot [0, 1] slightly);
    sigma: a number or (N,) per image, in [0, 1] pixel units; noise: standard normal like y01
    (required when any sigma > 0). With sigma = 0 and no quantization y01 is returned as it
    is (not clamped): the noise-free protocol is unchanged. -> (N, C, h, w) in [0, 1].
    """
    sig = torch.as_tensor(sigma, dtype=y01.dtype, device=y01.device)
    if not bool((sig > 0).any()) and not quantize:
        return y01
    out = y01
    if bool((sig > 0).any()):
        if noise is None:
            raise ConfigError("noisy_measurement with sigma > 0 needs standard normal noise")
        out = y01 + sig.reshape(-1, *[1] * (y01.dim() - 1)) * noise.to(y01)
    out = out.clamp(0, 1)
    return quantize_8bit(out) if quantize else out
