"""NoiseModule: trains the LR noise model of noise-aware sampling (docs/method.md §10).

Not in the paper. Every training LR image `D_s(x)` gets its own noise level, drawn uniformly
from [0, sigma_max] (exactly 0 for a fraction of them), and is rounded to 8 bits for another
fraction, as a saved PNG is. The estimator learns the total noise level, the denoiser the
noise itself (the posterior mean of the clean LR image).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torchmetrics import MeanMetric

from gpsr import ops
from gpsr.diffusion.noise import measurement_noise
from gpsr.metrics import CONSISTENCY_UNIT
from gpsr.models.noise import LRNoiseModel
from gpsr.stages.base import StageModule, plain
from gpsr.utils.errors import ConfigError

__all__ = ["NoiseModule", "noise_model_losses"]

# Offset of the estimator's log loss (in [0, 1] units, about the std of 8-bit rounding): below it
# a noise level counts as "none".
LOG_FLOOR = 1e-3


def noise_model_losses(
    model: LRNoiseModel,
    clean: torch.Tensor,
    sigma: torch.Tensor,
    quantized: torch.Tensor,
    noise: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The two training losses on one batch.

    clean (N, C, h, w) LR in [0, 1] units; sigma (N,) Gaussian noise levels; quantized (N,)
    bool, rounded to 8 bits; noise standard normal like clean. The measurement is
    `gpsr.ops.noisy_measurement`; its total level `sqrt(sigma^2 + [quantized] / (12 * 255^2))`
    is the estimator's target (log loss, offset `LOG_FLOOR`), and the denoiser is conditioned
    on it and trained to predict the noise in its units (images without noise are left
    out: the denoiser is the identity there). -> {"loss", "denoise", "estimate"} scalars.
    """
    noisy = ops.noisy_measurement(clean, sigma, noise)
    noisy = torch.where(quantized[:, None, None, None], ops.quantize_8bit(noisy), noisy)
    total = (sigma.square() + quantized.to(sigma) * ops.QUANT_NOISE_STD**2).sqrt()
    estimate = model.estimator(noisy)
    est_loss = (torch.log(estimate + LOG_FLOOR) - torch.log(total + LOG_FLOOR)).square().mean()
    noisy_rows = total > 0
    level = total.clamp(min=ops.QUANT_NOISE_STD)
    target = (noisy - clean) / level[:, None, None, None]
    per_image = (model.denoiser.noise(noisy, level) - target).square().flatten(1).mean(1)
    den_loss = (per_image * noisy_rows).sum() / noisy_rows.sum().clamp(min=1)
    return {"loss": den_loss + est_loss, "denoise": den_loss, "estimate": est_loss}


class NoiseModule(StageModule):
    """Lightning wrapper of the noise stage (`stage=noise`): the LR noise model
    (`gpsr.models.noise.LRNoiseModel`) trained on the LR images of the data, at `scale`.

    Args:
        scale: SR factor s: the LR images are `D_s` of the HR images (its checkpoint serves
            GPSR models of this scale).
        noise: LRNoiseModel settings (width, depth, estimator_width, estimator_depth,
            sigma_max, channels).
        clean_fraction: share of training images without Gaussian noise.
        quantize_fraction: share of training images rounded to 8 bits.
        val_sigmas: noise levels of validation (seeded per image index, `val_seed`): the
            denoised and the noisy MSE against the clean LR and the estimated level, logged
            as `val/sigma_<s>/...`.
        optimizer, scheduler, grad_clip, nonfinite, max_skipped_steps: see StageModule.
    """

    stage = "noise"

    def __init__(
        self,
        *,
        optimizer: Callable[..., torch.optim.Optimizer],
        scale: int = 8,
        noise: dict[str, Any] | None = None,
        clean_fraction: float = 0.1,
        quantize_fraction: float = 0.5,
        val_sigmas: list[float] | None = None,
        val_seed: int = 0,
        scheduler=None,
        grad_clip: float | None = 1.0,
        nonfinite: str = "raise",
        max_skipped_steps: int = 10,
        speed: dict[str, Any] | None = None,
    ):
        super().__init__(optimizer, scheduler, grad_clip, nonfinite, speed, max_skipped_steps)
        noise = plain(dict(noise or {}))
        val_sigmas = [float(s) for s in (val_sigmas if val_sigmas is not None else [0, 0.02, 0.05])]
        for name, frac in (
            ("clean_fraction", clean_fraction),
            ("quantize_fraction", quantize_fraction),
        ):
            if not 0 <= frac <= 1:
                raise ConfigError(f"stage.module.{name} must be in [0, 1], got {frac}")
        self.save_hyperparameters(
            {
                "scale": int(scale),
                "noise": noise,
                "clean_fraction": float(clean_fraction),
                "quantize_fraction": float(quantize_fraction),
                "val_sigmas": val_sigmas,
                "val_seed": int(val_seed),
            }
        )
        self.noise = LRNoiseModel(**noise)
        if any(not 0 <= s <= self.noise.sigma_max for s in val_sigmas):
            raise ConfigError(
                f"stage.module.val_sigmas={val_sigmas} must lie in [0, model.noise.sigma_max="
                f"{self.noise.sigma_max}]"
            )
        self.scale = int(scale)
        # metrics[split][tag][what]; ModuleDict keys cannot hold dots: tag "sigma_0p05".
        whats = lambda s: ("estimate", "noisy_mse", "denoised_mse") if s > 0 else ("estimate",)  # noqa: E731
        self.val_metrics = nn.ModuleDict(
            {
                split: nn.ModuleDict(
                    {
                        self._tag(s): nn.ModuleDict({w: MeanMetric() for w in whats(s)})
                        for s in val_sigmas
                    }
                )
                for split in ("val", "test")
            }
        )

    @staticmethod
    def _tag(sigma: float) -> str:
        return f"sigma_{sigma:g}".replace(".", "p")

    def apply_speedups(self, checkpointing: bool, channels_last: bool, compile: bool) -> None:
        if channels_last:
            self.noise.to(memory_format=torch.channels_last)
        if compile:
            self.noise.estimator.compile()
            self.noise.denoiser.compile()

    def _clean_lr(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The noise-free LR images (N, C, h, w) in [0, 1] units, made from the HR images
        (whatever noise the data module adds to its own "lr")."""
        return ops.to_unit(ops.degrade(batch["hr"], self.scale))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        clean = self._clean_lr(batch)
        n, dev = clean.shape[0], clean.device
        hp = self.hparams
        sigma = torch.rand(n, device=dev) * self.noise.sigma_max
        sigma = torch.where(torch.rand(n, device=dev) < hp["clean_fraction"], 0.0, sigma)
        quantized = torch.rand(n, device=dev) < hp["quantize_fraction"]
        terms = noise_model_losses(self.noise, clean, sigma, quantized, torch.randn_like(clean))
        loss = self.guard_loss(terms["loss"])
        if loss is None:
            return None
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=n)
        self.log("train/denoise", terms["denoise"], batch_size=n)
        self.log("train/estimate", terms["estimate"], batch_size=n)
        return loss

    @torch.no_grad()
    def _noisy(self, clean: torch.Tensor, sigma: float, batch: dict[str, torch.Tensor]):
        noise = measurement_noise(
            clean.shape[1:], batch["index"].tolist(), self.hparams["val_seed"], clean.device
        )
        return ops.noisy_measurement(clean, sigma, noise)

    def validation_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, split: str = "val"
    ) -> dict[str, Any]:
        clean = self._clean_lr(batch)
        n = clean.shape[0]
        for s in self.hparams["val_sigmas"]:
            metrics = self.val_metrics[split][self._tag(s)]
            noisy = self._noisy(clean, s, batch)
            metrics["estimate"].update(self.noise.estimate(noisy))
            if s > 0:
                level = torch.full((n,), s, device=clean.device)
                mse = lambda x: (x - clean).square().flatten(1).mean(1) / CONSISTENCY_UNIT  # noqa: E731
                metrics["noisy_mse"].update(mse(noisy))
                metrics["denoised_mse"].update(mse(self.noise.denoise(noisy, level)))
            # Logged as val/sigma_0.05/denoised_mse (MSE x1e-5 against the clean LR).
            for what, metric in metrics.items():
                self.log(f"{split}/sigma_{s:g}/{what}", metric, batch_size=n)
        return {}

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        return self.validation_step(batch, batch_idx, split="test")

    @torch.no_grad()
    def panel(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        clean = self._clean_lr(batch)
        s = max(self.hparams["val_sigmas"])
        noisy = self._noisy(clean, s, batch)
        den = self.noise.denoise(noisy, torch.full((clean.shape[0],), s, device=clean.device))
        big = lambda x: ops.upsample_nearest(x, self.scale).clamp(0, 1)  # noqa: E731
        return {
            f"noisy LR (sigma {s:g})": big(noisy),
            "denoised": big(den),
            "clean LR": big(clean),
            "|error| x4": big((den - clean).abs() * 4),
        }
