"""Diffusion math kept apart from networks and from Lightning."""

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

__all__ = [
    "PREDICTIONS",
    "SPACINGS",
    "WEIGHTINGS",
    "GaussianDiffusion",
    "cosine_betas",
    "diagnostic_timesteps",
    "linear_betas",
    "make_betas",
    "sampling_timesteps",
]
