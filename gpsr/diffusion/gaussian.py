"""Gaussian diffusion in the flow's latent space: schedules, forward process, loss, sampler.

A plain object holding float64 schedules (SPEC §4, §5); the network is passed into each call
as `model(x, t_scaled)`. The number of sampling steps and eta are chosen at sampling time,
so one trained model serves every NFE count. Never imports Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = [
    "linear_betas",
    "cosine_betas",
    "make_betas",
    "sampling_timesteps",
    "GaussianDiffusion",
]

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[tuple[int, ...]], torch.Tensor]


def linear_betas(T: int) -> torch.Tensor:
    """Ho et al.'s linear schedule scaled to T steps: `linspace(0.1/T, 20/T, T)`, float64 (T,).

    For T = 1000 this is 1e-4 .. 0.02.
    """
    return torch.linspace(0.1 / T, 20.0 / T, T, dtype=torch.float64)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule, float64 (T,), betas clipped at `max_beta`."""

    def abar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


def make_betas(schedule: str, T: int) -> torch.Tensor:
    """Betas by name: "linear" or "cosine"."""
    if schedule == "linear":
        return linear_betas(T)
    if schedule == "cosine":
        return cosine_betas(T)
    raise ValueError(f"unknown diffusion.schedule {schedule!r}; use 'linear' or 'cosine'")


def sampling_timesteps(T: int, steps: int, spacing: str = "linspace") -> list[int]:
    """The timesteps visited by an S-step sampler, from noisiest to cleanest.

    "linspace" (the paper): `linspace(T-1, 0, S)` truncated to integers; S = 7, T = 1000
    gives 999, 832, 666, 499, 333, 166, 0. "trailing": evenly strided from T-1 down.
    """
    if not 1 <= steps <= T:
        raise ValueError(f"sampler.steps must be between 1 and {T}, got {steps}")
    if spacing == "linspace":
        ts = torch.linspace(T - 1, 0, steps, dtype=torch.float64).long().tolist()
    elif spacing == "trailing":
        stride = T / steps
        ts = [int(round(T - 1 - i * stride)) for i in range(steps)]
    else:
        raise ValueError(f"unknown sampler.spacing {spacing!r}; use 'linspace' or 'trailing'")
    if len(set(ts)) != len(ts):
        raise ValueError(f"{steps} steps over T={T} repeat a timestep: {ts}")
    return ts


def _gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values (T,) float64 at t (N,) -> (N, 1, 1, 1) in like's dtype and device."""
    out = values.to(like.device)[t.to(like.device)].to(like.dtype)
    return out.reshape(-1, *([1] * (like.dim() - 1)))


class GaussianDiffusion:
    """DDPM forward process and a DDIM-style few-step sampler (SPEC §4, §5).

    Args:
        num_timesteps: T.
        schedule: "linear" (paper) or "cosine".
        time_scale: the network sees `t * time_scale / T` (1000 in the paper).
    """

    def __init__(
        self, num_timesteps: int = 1000, schedule: str = "linear", time_scale: float = 1000.0
    ):
        self.num_timesteps = int(num_timesteps)
        self.time_scale = float(time_scale)
        self.betas = make_betas(schedule, self.num_timesteps)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """Integer timesteps (N,) -> float times (N,) fed to the network."""
        return t.float() * (self.time_scale / self.num_timesteps)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """`sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`: x0, noise (N, ...) and t (N,) -> (N, ...)."""
        abar = _gather(self.alphas_cumprod, t, x0)
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise

    def sample_t(
        self, n: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Uniform timesteps `t ~ U{0..T-1}`: (n,) long."""
        return torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator)

    def training_loss(
        self,
        model: EpsModel,
        x0: torch.Tensor,
        cond: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Epsilon loss `mean((eps_phi([x_t, cond], t) - eps)^2)`: a scalar.

        x0 (N, Cz, h, w) normalised latent, cond (N, Cc, h, w) concatenated on channels.
        """
        if t is None:
            t = self.sample_t(x0.shape[0], x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise)
        eps = model(torch.cat([xt, cond], dim=1), self.model_time(t))
        return torch.mean((eps.float() - noise.float()) ** 2)

    @torch.no_grad()
    def sample(
        self,
        model: EpsModel,
        cond: torch.Tensor,
        shape: tuple[int, ...],
        steps: int,
        eta: float = 1.0,
        clip: tuple[torch.Tensor | float, torch.Tensor | float] | None = None,
        noise_fn: NoiseFn | None = None,
        spacing: str = "linspace",
    ) -> torch.Tensor:
        """Few-step sampler of SPEC §5: `steps` network evaluations -> x0 of `shape`.

        cond (N, Cc, h, w) is concatenated to the state at every call. `clip` bounds the
        predicted x0 (scalars or tensors broadcastable to `shape`). `noise_fn(shape)` draws
        standard normal noise (defaults to `torch.randn`); pass a seeded one for
        reproducible samples. `eta = 0` is deterministic given the initial noise.
        """
        draw = noise_fn or (lambda s: torch.randn(s, device=cond.device, dtype=cond.dtype))
        ts = sampling_timesteps(self.num_timesteps, steps, spacing)
        abars = self.alphas_cumprod
        x = draw(shape)
        x0 = x
        for i, t in enumerate(ts):
            tt = torch.full((shape[0],), t, device=cond.device, dtype=torch.long)
            eps = model(torch.cat([x, cond], dim=1), self.model_time(tt)).to(x.dtype)
            abar_t = abars[t].item()
            x0 = (x - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)
            if clip is not None:
                x0 = torch.maximum(
                    torch.minimum(x0, torch.as_tensor(clip[1]).to(x0)),
                    torch.as_tensor(clip[0]).to(x0),
                )
            if i == len(ts) - 1:
                break
            eps = (x - math.sqrt(abar_t) * x0) / math.sqrt(1 - abar_t)
            abar_prev = abars[ts[i + 1]].item()
            sigma = (
                eta
                * math.sqrt((1 - abar_prev) / (1 - abar_t))
                * math.sqrt(max(0.0, 1 - abar_t / abar_prev))
            )
            x = math.sqrt(abar_prev) * x0 + math.sqrt(max(0.0, 1 - abar_prev - sigma**2)) * eps
            if sigma > 0:
                x = x + sigma * draw(shape)
        return x0
