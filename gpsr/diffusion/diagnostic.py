"""Sums of the per-timestep diagnostic (`GPSR.diagnostic`) over batches and processes."""

from __future__ import annotations

from typing import Any

import torch

from gpsr.diffusion.gaussian import diagnostic_timesteps

__all__ = ["add_diagnostic", "diagnostic_means"]


def add_diagnostic(
    total: dict[str, torch.Tensor] | None, part: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Running sum of `GPSR.diagnostic` results over batches (start with total=None)."""
    return part if total is None else {k: total[k] + part[k] for k in part}


def diagnostic_means(sums: dict[str, torch.Tensor], num_timesteps: int) -> dict[str, Any]:
    """Summed diagnostics -> per-image means: {"t": [K], "loss": [K], "x0_mse": [K],
    "mean_predictor_x0_mse": float}, t the middle timestep of each of the K buckets."""
    n = sums["count"]
    return {
        "t": diagnostic_timesteps(num_timesteps, len(sums["loss"])),
        "loss": (sums["loss"] / n).tolist(),
        "x0_mse": (sums["x0_mse"] / n).tolist(),
        "mean_predictor_x0_mse": (sums["mean_x0_mse"] / n).item(),
    }
