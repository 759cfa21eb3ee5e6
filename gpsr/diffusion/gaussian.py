"""Gaussian diffusion in the flow's latent space: schedules, forward process, loss, sampler.

A plain object holding float64 schedules (the paper's Algorithms 2 and 3); the network is
passed into each call as `model(x_t, t_scaled)`, already conditioned (for GPSR on the coarse
image: `gpsr.models.conditioning.CoarseConditioned`). The number of sampling steps and eta are
chosen at sampling time, so one trained model serves every NFE count. Never imports
Lightning.

The network's output is read through one of three parameterizations (`prediction`):

- "eps" (the paper, Ho et al. 2020): the noise, `eps`.
- "v" (Salimans & Ho 2022): the velocity `v = sqrt(abar) eps - sqrt(1 - abar) x0`.
- "x0": the clean latent itself.

Whatever the network predicts, the sampler converts it to `x0` and `eps` with the named
identities below (`x0_from_eps`, `eps_from_x0`, `x0_from_v`), so every parameterization
shares one DDIM update (`ddim_step`, Song et al. 2021, Eq. 12).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from gpsr.utils.errors import ConfigError

__all__ = [
    "PREDICTIONS",
    "SPACINGS",
    "WEIGHTINGS",
    "linear_betas",
    "cosine_betas",
    "make_betas",
    "sampling_timesteps",
    "diagnostic_timesteps",
    "GaussianDiffusion",
]

PREDICTIONS = ("eps", "v", "x0")
SPACINGS = ("linspace", "trailing")
WEIGHTINGS = ("none", "min_snr")

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
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
    raise ConfigError(f"unknown model.diffusion.schedule {schedule!r}; use 'linear' or 'cosine'")


def sampling_timesteps(T: int, steps: int, spacing: str = "linspace") -> list[int]:
    """The timesteps visited by an S-step sampler, from noisiest to cleanest.

    "linspace" (the paper): `linspace(T-1, 0, S)` truncated to integers; S = 7, T = 1000
    gives 999, 832, 666, 499, 333, 166, 0. "trailing": evenly strided from T-1 down.
    """
    if not 1 <= steps <= T:
        raise ConfigError(f"sampler.steps must be between 1 and {T}, got {steps}")
    if spacing == "linspace":
        ts = torch.linspace(T - 1, 0, steps, dtype=torch.float64).long().tolist()
    elif spacing == "trailing":
        stride = T / steps
        ts = [int(round(T - 1 - i * stride)) for i in range(steps)]
    else:
        raise ConfigError(f"unknown sampler.spacing {spacing!r}; use 'linspace' or 'trailing'")
    if len(set(ts)) != len(ts):
        raise ConfigError(f"{steps} steps over T={T} repeat a timestep: {ts}")
    return ts


def diagnostic_timesteps(T: int, buckets: int = 10) -> list[int]:
    """The middle timestep of each of `buckets` equal t-ranges: T=1000, 10 -> 50, 150, .., 950."""
    return [int((2 * b + 1) * T // (2 * buckets)) for b in range(buckets)]


def _gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values (T,) float64 at t (N,) -> (N, 1, 1, 1) in like's dtype and device."""
    out = values.to(like.device)[t.to(like.device)].to(like.dtype)
    return out.reshape(-1, *([1] * (like.dim() - 1)))


class GaussianDiffusion:
    """DDPM forward process, training loss and a DDIM-style few-step sampler.

    Args:
        num_timesteps: T.
        schedule: "linear" (paper) or "cosine".
        time_scale: the network sees `t * time_scale / T` (1000 in the paper).
        prediction: what the network outputs: "eps" (paper), "v" or "x0".
        loss_weighting: "none" (paper: plain MSE of the prediction target) or "min_snr"
            (Hang et al. 2023: the x0-error weighted by min(SNR_t, gamma), expressed in the
            prediction's own units).
        min_snr_gamma: gamma of "min_snr".
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        schedule: str = "linear",
        time_scale: float = 1000.0,
        prediction: str = "eps",
        loss_weighting: str = "none",
        min_snr_gamma: float = 5.0,
    ):
        if prediction not in PREDICTIONS:
            raise ConfigError(
                f"unknown model.diffusion.prediction {prediction!r}; use one of {', '.join(PREDICTIONS)}"
            )
        if loss_weighting not in WEIGHTINGS:
            raise ConfigError(
                f"unknown model.diffusion.loss_weighting {loss_weighting!r}; use one of "
                f"{', '.join(WEIGHTINGS)}"
            )
        self.num_timesteps = int(num_timesteps)
        self.time_scale = float(time_scale)
        self.prediction = prediction
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = float(min_snr_gamma)
        self.betas = make_betas(schedule, self.num_timesteps)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """Integer timesteps (N,) -> float times (N,) fed to the network."""
        return t.float() * (self.time_scale / self.num_timesteps)

    def _abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _gather(self.alphas_cumprod, t, like)

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """`x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`: x0, noise (N, ...), t (N,) -> (N, ...)."""
        abar = self._abar(t, x0)
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise

    def sample_t(
        self, n: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Uniform timesteps `t ~ U{0..T-1}`: (n,) long."""
        return torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator)

    # ------------------------------------------------------------------ identities
    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """`x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`; all (N, ...), t (N,)."""
        abar = self._abar(t, x_t)
        return (x_t - (1.0 - abar).sqrt() * eps) / abar.sqrt()

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """`eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)`; all (N, ...), t (N,)."""
        abar = self._abar(t, x_t)
        return (x_t - abar.sqrt() * x0) / (1.0 - abar).sqrt()

    def x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v`; all (N, ...), t (N,)."""
        abar = self._abar(t, x_t)
        return abar.sqrt() * x_t - (1.0 - abar).sqrt() * v

    def velocity(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """`v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0`; all (N, ...), t (N,)."""
        abar = self._abar(t, x0)
        return abar.sqrt() * noise - (1.0 - abar).sqrt() * x0

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output at (x0, t, noise), by `prediction`."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "v":
            return self.velocity(x0, t, noise)
        return x0

    def x0_from_output(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's output (N, ...) at (x_t, t) read as a prediction of x0 (N, ...)."""
        if self.prediction == "eps":
            return self.x0_from_eps(x_t, t, out)
        if self.prediction == "v":
            return self.x0_from_v(x_t, t, out)
        return out

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio `abar_t / (1 - abar_t)`, float64 (N,)."""
        abar = self.alphas_cumprod.to(t.device)[t]
        return abar / (1.0 - abar)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weight (N,) float64 of the target MSE (all ones for "none").

        "min_snr" makes the weighted loss `min(SNR, gamma) * ||x0_hat - x0||^2`: the target
        MSE is SNR (eps), SNR + 1 (v) or 1 (x0) times the x0 MSE.
        """
        if self.loss_weighting == "none":
            return torch.ones(t.shape, dtype=torch.float64, device=t.device)
        snr = self.snr(t)
        clipped = snr.clamp(max=self.min_snr_gamma)
        per_unit = {"eps": snr, "v": snr + 1.0, "x0": torch.ones_like(snr)}[self.prediction]
        return clipped / per_unit

    # ------------------------------------------------------------------ training
    def predict(
        self, model: Model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise x0 to x_t and run the network on it: -> (x_t, output), (N, ...)."""
        xt = self.q_sample(x0, t, noise)
        return xt, model(xt, self.model_time(t))

    def training_losses(
        self, model: Model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """Unweighted per-sample MSE (N,) between `model(x_t, t)` and the target.

        x0 (N, Cz, h, w) normalised latent, t (N,) long, noise like x0.
        """
        _, out = self.predict(model, x0, t, noise)
        dtype = torch.promote_types(x0.dtype, torch.float32)  # bf16 outputs: loss in fp32
        err = out.to(dtype) - self.target(x0, t, noise).to(dtype)
        return err.pow(2).flatten(1).mean(1)

    def training_loss(
        self,
        model: Model,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        return_parts: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training objective (Algorithm 2): the weighted mean of `training_losses`.

        With eps prediction and no weighting this is `mean((eps_phi(z_t, t) - eps)^2)`.
        `return_parts` also returns the per-sample losses (N,) and the timesteps t (N,).
        """
        if t is None:
            t = self.sample_t(x0.shape[0], x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        per_sample = self.training_losses(model, x0, t, noise)
        loss = (self.loss_weight(t).to(per_sample) * per_sample).mean()
        return (loss, per_sample.detach(), t) if return_parts else loss

    @torch.no_grad()
    def loss_by_timestep(
        self,
        model: Model,
        x0: torch.Tensor,
        timesteps: Sequence[int],
        noise_fn: NoiseFn | None = None,
    ) -> dict[str, torch.Tensor]:
        """Diagnostic: at each of K timesteps, the batch-mean target MSE and x0 MSE.

        x0 (N, Cz, h, w). Returns {"loss": (K,), "x0_mse": (K,)} float64
        sums over the batch (divide by N for means), so batches and processes can be added.
        The x0 MSE does not depend on the parameterization: it shows where a network is worse
        than predicting the mean (whose x0 MSE is the data variance).
        """
        draw = noise_fn or (lambda s: torch.randn(s, device=x0.device, dtype=x0.dtype))
        loss, x0_mse = [], []
        for t_int in timesteps:
            t = torch.full((x0.shape[0],), int(t_int), device=x0.device, dtype=torch.long)
            noise = draw(tuple(x0.shape)).to(x0)
            xt, out = self.predict(model, x0, t, noise)
            out = out.to(x0.dtype)
            target = self.target(x0, t, noise)
            x0_hat = self.x0_from_output(out, xt, t)
            loss.append((out - target).double().pow(2).flatten(1).mean(1).sum())
            x0_mse.append((x0_hat - x0).double().pow(2).flatten(1).mean(1).sum())
        return {"loss": torch.stack(loss), "x0_mse": torch.stack(x0_mse)}

    # ------------------------------------------------------------------ sampling
    def ddim_step(
        self,
        x_t: torch.Tensor,
        x0: torch.Tensor,
        eps: torch.Tensor,
        t: int,
        t_prev: int,
        eta: float,
        noise: torch.Tensor | None,
    ) -> torch.Tensor:
        """One generalised DDIM update (Song et al. 2021, Eq. 12) from t to t_prev < t.

        `x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma * noise`,
        `sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)`.
        eta = 1 is DDPM's ancestral step, eta = 0 deterministic DDIM. All tensors (N, ...).
        """
        abar_t = self.alphas_cumprod[t].item()
        abar_prev = self.alphas_cumprod[t_prev].item()
        sigma = (
            eta
            * math.sqrt((1 - abar_prev) / (1 - abar_t))
            * math.sqrt(max(0.0, 1 - abar_t / abar_prev))
        )
        x = math.sqrt(abar_prev) * x0 + math.sqrt(max(0.0, 1 - abar_prev - sigma**2)) * eps
        if sigma > 0:
            if noise is None:
                raise ConfigError("ddim_step with eta > 0 needs noise")
            x = x + sigma * noise
        return x

    @torch.no_grad()
    def sample(
        self,
        model: Model,
        shape: tuple[int, ...],
        steps: int,
        eta: float = 1.0,
        clip: tuple[torch.Tensor | float, torch.Tensor | float] | None = None,
        noise_fn: NoiseFn | None = None,
        spacing: str = "linspace",
        device: torch.device | str = "cpu",
        final_model: Model | None = None,
    ) -> torch.Tensor:
        """Few-step sampler (Algorithm 3): `steps` network evaluations -> x0 of `shape`.

        `model(x_t, t)` is called once per visited t (`final_model`, if given, at the last
        one, whose x0 is returned: the same network tiled differently). At each visited t the
        output becomes x0 (`x0_from_output`), clamped to `clip` (scalars or tensors
        broadcastable to `shape`), then eps (`eps_from_x0`); the last step returns x0,
        the others take `ddim_step`. `noise_fn(shape)` draws standard normal noise (defaults
        to `torch.randn` on `device`); pass a seeded one for reproducible samples. `eta = 0` is
        deterministic given the initial noise.
        """
        draw = noise_fn or (lambda s: torch.randn(s, device=device))
        ts = sampling_timesteps(self.num_timesteps, steps, spacing)
        x = draw(shape)
        x0 = x
        for i, t in enumerate(ts):
            tt = torch.full((shape[0],), t, device=x.device, dtype=torch.long)
            net = final_model if final_model is not None and i == len(ts) - 1 else model
            out = net(x, self.model_time(tt)).to(x.dtype)
            x0 = self.x0_from_output(out, x, tt)
            if clip is not None:
                lo, hi = (torch.as_tensor(c, dtype=x0.dtype, device=x0.device) for c in clip)
                x0 = torch.maximum(torch.minimum(x0, hi), lo)
            if i == len(ts) - 1:
                break
            eps = self.eps_from_x0(x, tt, x0)
            x = self.ddim_step(x, x0, eps, t, ts[i + 1], eta, draw(shape) if eta > 0 else None)
        return x0
