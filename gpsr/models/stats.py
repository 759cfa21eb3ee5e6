"""Statistics of the flow latent that normalise it for the diffusion (saved in checkpoints)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LatentStats"]


class LatentStats(nn.Module):
    """Per-channel mean / variance and global min / max of the flow latent z (docs/method.md §4).

    Buffers (saved in checkpoints): mean, var (C,), zmin, zmax (), ready () bool.
    `normalise`: z (N, C, h, w) -> z^ = (z - mean) / (2 sqrt(var)), per-channel std 0.5.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("var", torch.ones(channels))
        self.register_buffer("zmin", torch.tensor(-1.0))
        self.register_buffer("zmax", torch.tensor(1.0))
        self.register_buffer("ready", torch.tensor(False))

    def _std2(self) -> torch.Tensor:
        return (2.0 * self.var.sqrt())[None, :, None, None]

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean[None, :, None, None]) / self._std2()

    def denormalise(self, zhat: torch.Tensor) -> torch.Tensor:
        return zhat * self._std2() + self.mean[None, :, None, None]

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel bounds (1, C, 1, 1) of the normalised latent implied by the global min/max."""
        m, s = self.mean[None, :, None, None], self._std2()
        return (self.zmin - m) / s, (self.zmax - m) / s

    @torch.no_grad()
    def fit(self, sums: dict) -> None:
        """Set the statistics from `accumulate`d sums: {"n", "s1" (C,), "s2" (C,), "min", "max"}."""
        n = sums["n"]
        mean = sums["s1"] / n
        var = (sums["s2"] / n - mean**2).clamp(min=1e-12)
        self.mean.copy_(mean.to(self.mean))
        self.var.copy_(var.to(self.var))
        self.zmin.fill_(float(sums["min"]))
        self.zmax.fill_(float(sums["max"]))
        self.ready.fill_(True)

    @staticmethod
    def accumulate(z: torch.Tensor, sums: dict | None) -> dict:
        """Add one batch z (N, C, h, w) to float64 running sums (start with sums=None)."""
        z64 = z.detach().double()
        per_channel = z64.transpose(0, 1).flatten(1)
        part = {
            "n": torch.tensor(float(per_channel.shape[1]), dtype=torch.float64, device=z.device),
            "s1": per_channel.sum(1),
            "s2": (per_channel**2).sum(1),
            "min": z64.min(),
            "max": z64.max(),
        }
        if sums is None:
            return part
        return {
            "n": sums["n"] + part["n"],
            "s1": sums["s1"] + part["s1"],
            "s2": sums["s2"] + part["s2"],
            "min": torch.minimum(sums["min"], part["min"]),
            "max": torch.maximum(sums["max"], part["max"]),
        }
