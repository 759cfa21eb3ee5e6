"""Diffusion math kept apart from networks and from Lightning."""

from gpsr.diffusion.diagnostic import add_diagnostic, diagnostic_means
from gpsr.diffusion.gaussian import (
    PREDICTIONS,
    SPACINGS,
    WEIGHTINGS,
    GaussianDiffusion,
    cosine_betas,
    diagnostic_timesteps,
    linear_betas,
    make_betas,
    sampling_timesteps,
)
from gpsr.diffusion.noise import IndexNoise, measurement_noise, seeded_normal

__all__ = [
    "PREDICTIONS",
    "SPACINGS",
    "WEIGHTINGS",
    "GaussianDiffusion",
    "IndexNoise",
    "add_diagnostic",
    "cosine_betas",
    "diagnostic_means",
    "diagnostic_timesteps",
    "linear_betas",
    "make_betas",
    "measurement_noise",
    "sampling_timesteps",
    "seeded_normal",
]
