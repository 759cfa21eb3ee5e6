"""Seeded noise: samples that do not depend on the batch size or the number of processes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["seeded_normal", "IndexNoise", "measurement_noise"]

# The measurement noise of `data.lr_noise` draws from its own stream, far from the seeds of
# the sampler's noise (`IndexNoise`), so the two never share a draw.
MEASUREMENT_STREAM = 2**32


def seeded_normal(
    shape: Sequence[int],
    indices: Sequence[int],
    seed: int,
    device: torch.device | str,
    dtype=torch.float32,
) -> torch.Tensor:
    """Standard normal noise (N, *shape) whose row i depends only on (seed, indices[i]).

    Makes samples reproducible whatever the batch size or the number of processes.
    """
    rows = [
        torch.randn(
            tuple(shape), generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i))
        )
        for i in indices
    ]
    return torch.stack(rows).to(device=device, dtype=dtype)


class IndexNoise:
    """A `noise_fn` for the sampler: each call draws the next seeded noise per image index."""

    def __init__(self, indices: Sequence[int], seed: int, device: torch.device | str):
        self.indices, self.seed, self.device, self.calls = list(indices), seed, device, 0

    def __call__(self, shape: tuple[int, ...]) -> torch.Tensor:
        self.calls += 1
        return seeded_normal(shape[1:], self.indices, self.seed * 7919 + self.calls, self.device)


def measurement_noise(
    shape: Sequence[int], indices: Sequence[int], seed: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Standard normal LR measurement noise (N, *shape) for `data.lr_noise`: row i depends
    only on (seed, indices[i]), so every method, batch size and run sees the same noisy LR."""
    return seeded_normal(shape, indices, MEASUREMENT_STREAM + int(seed), device)
