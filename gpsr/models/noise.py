"""The LR noise model of noise-aware sampling (docs/method.md §10; not in the paper): a learned
estimate of the noise level of an LR image and a denoiser conditioned on that level.

Both work on LR images in [0, 1] pixel units, are fully convolutional (any size) and are
trained on the LR images of the training data (`gpsr.stages.NoiseModule`, `stage=noise`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpsr.utils.errors import ConfigError

__all__ = ["ConvStack", "NoiseLevelEstimator", "LRDenoiser", "LRNoiseModel"]


class ConvStack(nn.Module):
    """`depth` 3x3 convolutions with SiLU between them (replicate padding, so borders see
    copies of their own pixels and any side >= 1 works): (N, c_in, h, w) -> (N, c_out, h, w)."""

    def __init__(self, c_in: int, c_out: int, width: int, depth: int):
        super().__init__()
        if depth < 2 or width < 1:
            raise ConfigError(
                f"model.noise: depth must be >= 2 and width >= 1, got {depth}, {width}"
            )
        chans = [c_in] + [width] * (depth - 1) + [c_out]
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, 3, padding=1, padding_mode="replicate")
            for a, b in zip(chans[:-1], chans[1:])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < len(self.convs) - 1:
                x = F.silu(x)
        return x


class NoiseLevelEstimator(nn.Module):
    """Blind estimate of the standard deviation of white noise on an LR image.

    A learned correction of the classical estimators, which read the noise off the finest
    high-pass band: every pixel and channel gets a noise proxy `n(p) = L(y)(p) + a(p)`, with
    L the unit-norm Laplacian high-pass (fixed: for white noise of std sigma, `E[L(y)^2] =
    sigma^2`) and `a` learned, and every pixel a weight `w(p)` (softmax over the image's
    pixels: where to look, the role of a robust estimator's median), and
    `sigma^2 = sum_p w(p) mean_c n_c(p)^2`. The learned parts start at zero, so an untrained
    estimator is the plain high-pass RMS; trained on clean and noisy LR images of the
    training data, it learns how much fine structure the clean images have, which a generic
    estimator cannot tell from noise on small images.

    y: (N, C, h, w) in [0, 1] -> sigma (N,) >= 0 in [0, 1] pixel units.
    """

    def __init__(self, channels: int = 3, width: int = 48, depth: int = 6, sigma_max: float = 0.1):
        super().__init__()
        self.net = ConvStack(channels, channels + 1, width, depth)
        last = self.net.convs[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        laplacian = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]])
        self.register_buffer(
            "highpass", (laplacian / 20**0.5).expand(channels, 1, 3, 3).clone(), persistent=False
        )
        self.channels = channels
        self.sigma_max = float(sigma_max)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        c = self.channels
        high = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), self.highpass.to(y), groups=c)
        out = self.net(y * 2.0 - 1.0)
        proxy = high.float() / self.sigma_max + out[:, :c].float()  # units of sigma_max
        weight = torch.softmax(out[:, c].float().flatten(1), dim=1)
        var = (weight * proxy.square().mean(1).flatten(1)).sum(1)
        return var.sqrt() * self.sigma_max


class LRDenoiser(nn.Module):
    """Denoiser of LR images conditioned on the noise level (a noise-level map as input, as in
    FFDNet), trained for the posterior mean (MMSE) of the clean LR image.

    It predicts the noise in units of sigma, `e`, and returns `y - sigma * e`: at sigma = 0 it
    returns y exactly. y: (N, C, h, w) in [0, 1]; sigma: (N,) in [0, 1] pixel units ->
    (N, C, h, w), about [0, 1] (not clamped).
    """

    def __init__(self, channels: int = 3, width: int = 64, depth: int = 8, sigma_max: float = 0.1):
        super().__init__()
        self.net = ConvStack(channels + 1, channels, width, depth)
        self.sigma_max = float(sigma_max)

    def noise(self, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The predicted noise in units of sigma (N, C, h, w)."""
        level = (sigma / self.sigma_max).to(y)[:, None, None, None].expand(-1, 1, *y.shape[-2:])
        return self.net(torch.cat([y * 2.0 - 1.0, level], dim=1))

    def forward(self, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return y - sigma.to(y)[:, None, None, None] * self.noise(y, sigma)


class LRNoiseModel(nn.Module):
    """`estimate(y)` -> sigma (N,) and `denoise(y, sigma)` -> the clean LR estimate, for LR
    images y (N, C, h, w) in [0, 1] pixel units. `sigma_max` is the largest noise level it
    was trained on: larger ones are refused by the sampler (`GPSR.noise_level`)."""

    def __init__(
        self,
        channels: int = 3,
        width: int = 64,
        depth: int = 8,
        estimator_width: int = 48,
        estimator_depth: int = 6,
        sigma_max: float = 0.1,
    ):
        super().__init__()
        if not 0 < sigma_max <= 1:
            raise ConfigError(f"model.noise.sigma_max must be in (0, 1], got {sigma_max}")
        self.channels = channels
        self.sigma_max = float(sigma_max)
        self.estimator = NoiseLevelEstimator(channels, estimator_width, estimator_depth, sigma_max)
        self.denoiser = LRDenoiser(channels, width, depth, sigma_max)

    def estimate(self, y: torch.Tensor) -> torch.Tensor:
        """Blind noise level of each image: (N, C, h, w) in [0, 1] -> (N,), clamped to
        [0, sigma_max]."""
        return self.estimator(y).clamp(0.0, self.sigma_max)

    def denoise(self, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Posterior-mean estimate of the clean LR: (N, C, h, w), sigma (N,) -> (N, C, h, w)."""
        return self.denoiser(y, sigma)
