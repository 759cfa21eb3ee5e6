"""The latent denoiser as the diffusion sees it: conditioned on the LR image (Algorithm 2)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CoarseConditioned"]


class CoarseConditioned(nn.Module):
    """`model(z_t, t) = net([z_t, c], t)`: the normalised latent z_t (N, 3C, h, w) and the
    coarse image c (N, C, h, w) in [-1, 1] (the LR image, nearest-upsampled to the latent
    grid) concatenated on channels, as in improved-diffusion's super-resolution model.

    A view for one batch: `net` (a UNet, or a `gpsr.tiling.TiledDenoiser` around one, with
    4C input and 3C output channels) is shared, not copied, so its state dict is unchanged.
    """

    def __init__(self, net: nn.Module, coarse: torch.Tensor):
        super().__init__()
        self.net = net
        self.coarse = coarse

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x (N, 3C, h, w), t (N,) the model time -> the network's output (N, 3C, h, w)."""
        return self.net(torch.cat([x, self.coarse.to(x.dtype)], dim=1), t)
