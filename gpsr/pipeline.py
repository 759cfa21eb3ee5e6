"""The GPSR pipeline (Algorithm 3): latent statistics, seeded noise and the sampler, shared by
training validation, evaluation, the CLI and the inference object.

Images here are in the model's range [-1, 1] (hence `super_resolve_signed`);
`gpsr.inference.GPSR.super_resolve` is the user-facing [0, 1] wrapper."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gpsr import ops
from gpsr.diffusion import GaussianDiffusion, diagnostic_timesteps
from gpsr.models.flow import DegradationFlow
from gpsr.tiling import TiledDenoiser, Tiling, tiled_inverse
from gpsr.utils.device import available_memory
from gpsr.utils.errors import ConfigError, TooLargeError

__all__ = [
    "LatentStats",
    "seeded_normal",
    "IndexNoise",
    "super_resolve_signed",
    "timestep_diagnostic",
    "add_diagnostic",
    "diagnostic_means",
]


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


def _check_whole_latent(unet: nn.Module, shape: tuple[int, ...], device: torch.device) -> None:
    """Refuse, in one line, a whole-latent UNet call whose global attention cannot fit
    (networks without `attention_bytes` are not checked)."""
    estimate = getattr(unet, "attention_bytes", None)
    if estimate is None:
        return
    need = estimate(shape[-2], shape[-1], shape[0])
    free = available_memory(device)
    if free is not None and need > free:
        raise TooLargeError(
            f"a latent of {shape[-1]}x{shape[-2]} without tiling needs {need / 2**30:.1f} GiB "
            f"for the UNet's global attention ({free / 2**30:.1f} GiB available); set "
            f"sampler.tile=auto (tiles of the UNet's training size) or a tile side"
        )


@torch.no_grad()
def super_resolve_signed(
    flow: DegradationFlow,
    lr: torch.Tensor,
    steps: int,
    unet: nn.Module | None = None,
    diffusion: GaussianDiffusion | None = None,
    stats: LatentStats | None = None,
    eta: float = 1.0,
    noise_fn=None,
    spacing: str = "linspace",
    tiling: Tiling | None = None,
) -> torch.Tensor:
    """GPSR sampling (Algorithm 3): lr (N, C, h, w) in [-1, 1] -> x (N, C, s*h, s*w) in about [-1, 1].

    `steps` UNet evaluations in the normalised latent space, then one flow inverse.
    steps = 0 is flow-only sampling: z ~ N(0, I) straight into the flow (Remark 3).
    `tiling` (None: the whole image at once) runs the UNet on overlapping latent tiles and
    the flow inverse on tiles with a halo (`gpsr.tiling`), so memory is bounded by the tile.
    """
    tiling = tiling or Tiling.whole()
    draw = noise_fn or (lambda s: torch.randn(s, device=lr.device))
    coarse = ops.upsample_nearest(lr, flow.k)
    shape = (lr.shape[0], *flow.latent_shape(*lr.shape[-2:]))
    if steps == 0:
        z = draw(shape).to(coarse.dtype)
    else:
        if unet is None or diffusion is None or stats is None:
            raise ConfigError(
                "sampling with steps > 0 needs a UNet, a diffusion and latent statistics"
            )
        # Tiles start on the grid the UNet saw in training: whole LR pixels (k latent
        # pixels) and whole pixels of its deepest level.
        align = math.lcm(flow.k, 2 ** (getattr(unet, "levels", 1) - 1))
        tile = tiling.unet_tile(unet, align)
        if tile is None or (shape[-2] <= tile and shape[-1] <= tile):
            model = unet
            _check_whole_latent(unet, shape, lr.device)
        else:
            model = TiledDenoiser(unet, tile, tiling.unet_overlap(tile), tiling.batch, align)
        zhat = diffusion.sample(
            model,
            coarse,
            shape,
            steps=steps,
            eta=eta,
            clip=stats.bounds(),
            noise_fn=noise_fn,
            spacing=spacing,
        )
        z = stats.denormalise(zhat)
    return tiled_inverse(flow, coarse, z, tiling.flow_tile, tiling.halo(flow))


@torch.no_grad()
def timestep_diagnostic(
    flow: DegradationFlow,
    unet: nn.Module,
    diffusion: GaussianDiffusion,
    stats: LatentStats,
    hr: torch.Tensor,
    indices: Sequence[int],
    seed: int,
    buckets: int = 10,
) -> dict[str, torch.Tensor]:
    """The latent DDPM's error by noise level on clean images, as in training (Algorithm 2).

    hr (N, C, H, W) in [-1, 1]. The normalised latent of each image is noised at the middle
    timestep of each of `buckets` t-ranges with noise seeded by (seed, image index). Returns
    float64 sums over the batch: "loss" (K,) (the training target's MSE), "x0_mse" (K,) (error
    of the predicted clean latent), "mean_x0_mse" () (the x0 MSE of always predicting the
    latent mean, i.e. the latent's mean square) and "count" (). A network whose x0 MSE at
    some t exceeds the mean predictor's is worse than useless there: the sampler starts at
    the noisiest t and amplifies that error.
    """
    coarse, z, _ = flow(hr)
    zhat = stats.normalise(z)
    ts = diagnostic_timesteps(diffusion.num_timesteps, buckets)
    noise = IndexNoise(indices, seed, hr.device)
    out = diffusion.loss_by_timestep(unet, zhat, coarse, ts, noise_fn=noise)
    out["mean_x0_mse"] = zhat.double().pow(2).flatten(1).mean(1).sum()
    out["count"] = torch.tensor(float(hr.shape[0]), dtype=torch.float64, device=hr.device)
    return out


def add_diagnostic(
    total: dict[str, torch.Tensor] | None, part: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Running sum of `timestep_diagnostic` results over batches (start with total=None)."""
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
