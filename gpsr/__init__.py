"""gpsr: trustworthy image super-resolution via a generative pseudoinverse.

A normalizing flow learns the bicubic degradation together with its generalised inverse;
a latent diffusion model samples the missing details in the flow's latent space.
"""

__version__ = "0.1.0"
