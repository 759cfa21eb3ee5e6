"""Diffusion math kept apart from networks and from Lightning."""

from gpsr.diffusion.gaussian import (
    GaussianDiffusion,
    cosine_betas,
    linear_betas,
    make_betas,
    sampling_timesteps,
)

__all__ = ["GaussianDiffusion", "cosine_betas", "linear_betas", "make_betas", "sampling_timesteps"]
