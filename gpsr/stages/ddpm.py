"""LatentDiffusionModule: the latent DDPM (Algorithm 2) on top of a frozen, trained flow."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel

from gpsr import ops
from gpsr.diffusion import GaussianDiffusion, IndexNoise, add_diagnostic, diagnostic_means
from gpsr.loading import ddpm_hyper_parameters, load_flow, read_checkpoint
from gpsr.models.flow import DegradationFlow
from gpsr.models.gpsr import GPSR
from gpsr.models.stats import LatentStats
from gpsr.models.unet import UNet
from gpsr.panels import panel_rows
from gpsr.stages.base import StageModule, metric_targets, plain
from gpsr.utils.errors import ConfigError

__all__ = ["LatentDiffusionModule", "ema_avg_fn"]

# The frozen flow is kept in eval mode on purpose.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


def ema_avg_fn(decay: float, warmup: bool = True):
    """EMA update for `AveragedModel`; with warmup the decay is min(decay, (1+n)/(10+n))."""

    def avg(
        averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor
    ) -> torch.Tensor:
        n = float(num_averaged)
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        return d * averaged + (1 - d) * current

    return avg


class LatentDiffusionModule(StageModule):
    """Lightning wrapper of the latent DDPM stage.

    Args:
        flow_ckpt: path of a trained flow-stage checkpoint (required unless init_ckpt).
        init_ckpt: start from the weights of a DDPM-stage checkpoint (e.g. the authors'
            model converted by `gpsr.convert`): flow, UNet, EMA, latent statistics, and its
            UNet / diffusion settings; the optimiser and step counter start fresh.
        scale: SR factor; must match the flow checkpoint.
        unet: UNet settings; in_channels must be 4C and out_channels 3C for C image channels.
        diffusion: GaussianDiffusion settings (num_timesteps, schedule, time_scale,
            prediction, loss_weighting, min_snr_gamma); stored in the checkpoint, so
            validation, evaluation, sampling and `GPSR.load` read the network the same way.
        diagnostic_buckets: validation also logs the loss and the x0 error at the middle of
            this many t-ranges (`val/loss_t/<t>`, `val/x0_mse_t/<t>`, EMA weights); 0 disables.
        ema_decay, ema_warmup: EMA of the UNet weights (torch.optim.swa_utils.AveragedModel).
        val_steps, val_eta, val_seed: sampler used for validation (with the EMA weights).
        panel_samples: samples per image for the uncertainty (std) row of the image panel.
        optimizer, scheduler, grad_clip, nonfinite, max_skipped_steps: see StageModule.
    """

    stage = "ddpm"

    def __init__(
        self,
        *,
        optimizer: Callable[..., torch.optim.Optimizer],
        val_steps: int,
        val_eta: float,
        flow_ckpt: str | None = None,
        scale: int = 8,
        unet: dict[str, Any] | None = None,
        diffusion: dict[str, Any] | None = None,
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
        val_seed: int = 0,
        panel_samples: int = 4,
        diagnostic_buckets: int = 10,
        scheduler=None,
        grad_clip: float | None = 1.0,
        nonfinite: str = "raise",
        max_skipped_steps: int = 10,
        flow: dict[str, Any] | None = None,
        speed: dict[str, Any] | None = None,
        init_ckpt: str | None = None,
    ):
        super().__init__(optimizer, scheduler, grad_clip, nonfinite, speed, max_skipped_steps)
        init_state = None
        if init_ckpt:  # fine-tuning: every weight and setting from a DDPM checkpoint
            init = read_checkpoint(init_ckpt, stage="ddpm", scale=scale)
            init_state, init_hp = init["state_dict"], init.get("hyper_parameters", {})
            flow, unet, diffusion = init_hp["flow"], init_hp["unet"], init_hp.get("diffusion")
        if flow is None:  # training: read the trained flow
            if not flow_ckpt:
                raise ConfigError(
                    "stage=ddpm needs a trained flow: set flow_ckpt=<path to a flow-stage .ckpt>"
                )
            self.flow, flow_hp = load_flow(flow_ckpt, scale)
            flow = dict(flow_hp.get("flow", {}))
        else:  # rebuilding from a DDPM checkpoint, whose state_dict holds the flow weights
            flow = plain(dict(flow))
            self.flow = DegradationFlow(scale=scale, **flow)
        self.flow.requires_grad_(False).eval()
        unet, diffusion = plain(dict(unet or {})), plain(dict(diffusion or {}))
        c = self.flow.channels
        if unet.get("in_channels", 4 * c) != 4 * c or unet.get("out_channels", 3 * c) != 3 * c:
            raise ConfigError(
                f"model.unet.in_channels / out_channels must be {4 * c} / {3 * c} for {c}-channel "
                f"images (latent {3 * c} + coarse {c}), got {unet.get('in_channels')} / "
                f"{unet.get('out_channels')}"
            )
        unet.update(in_channels=4 * c, out_channels=3 * c)
        self.save_hyperparameters(
            ddpm_hyper_parameters(
                scale,
                flow,
                unet,
                diffusion,
                flow_ckpt=flow_ckpt,
                init_ckpt=init_ckpt,
                ema_decay=ema_decay,
                ema_warmup=ema_warmup,
                val_steps=val_steps,
                val_eta=val_eta,
                val_seed=val_seed,
                panel_samples=panel_samples,
                diagnostic_buckets=diagnostic_buckets,
            )
        )
        self.unet = UNet(**unet)
        self.ema = AveragedModel(self.unet, avg_fn=ema_avg_fn(ema_decay, ema_warmup))
        self.ema.requires_grad_(False)
        self.diffusion = GaussianDiffusion(**diffusion)
        self.stats = LatentStats(3 * c)
        self._diag: dict[str, torch.Tensor] | None = None
        if init_state is not None:
            self.load_state_dict(init_state)

    @property
    def model(self) -> GPSR:
        """The GPSR model these modules make, with the EMA UNet: a view (no copy, no
        state-dict keys of its own) used for validation samples and the diagnostic."""
        return GPSR(self.flow, self.ema.module, self.diffusion, self.stats)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.unet.parameters())

    def apply_speedups(self, checkpointing: bool, channels_last: bool, compile: bool) -> None:
        # The flow is frozen (no backward), so it never needs checkpointing here.
        self.flow.speed_up(False, channels_last, compile)
        self.unet.speed_up(channels_last, compile)

    def train(self, mode: bool = True):
        super().train(mode)
        self.flow.eval()  # frozen: always in inference mode
        return self

    # ------------------------------------------------------------------ latent statistics
    @torch.no_grad()
    def fit_latent_stats(self, loader) -> None:
        """Per-channel mean / variance and global min / max of z over clean training images."""
        sums = None
        for batch in loader:
            z = self.flow(batch["hr"].to(self.device))[1]
            sums = LatentStats.accumulate(z, sums)
        if dist.is_available() and dist.is_initialized():
            for key in ("n", "s1", "s2"):
                dist.all_reduce(sums[key], op=dist.ReduceOp.SUM)
            dist.all_reduce(sums["min"], op=dist.ReduceOp.MIN)
            dist.all_reduce(sums["max"], op=dist.ReduceOp.MAX)
        self.stats.fit(sums)

    def on_fit_start(self) -> None:
        if not bool(self.stats.ready):
            self.fit_latent_stats(self.trainer.datamodule.stats_dataloader())

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        x = ops.dequantize(batch["hr"])
        loss = self.guard_loss(self.model.training_loss(x, net=self.unet))
        if loss is None:
            return None
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        # Lightning calls this once per optimiser step (after gradient accumulation); the EMA
        # averages the weights that step produced.
        super().optimizer_step(*args, **kwargs)
        self.ema.update_parameters(self.unet)

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        lr: torch.Tensor,
        indices,
        steps: int | None = None,
        eta: float | None = None,
        seed: int | None = None,
    ) -> torch.Tensor:
        """EMA-weight GPSR samples: lr (N, C, h, w) in [-1, 1] -> (N, C, sh, sw) in [0, 1]."""
        steps = self.hparams["val_steps"] if steps is None else steps
        eta = self.hparams["val_eta"] if eta is None else eta
        noise = IndexNoise(indices, self.hparams["val_seed"] if seed is None else seed, lr.device)
        x = self.model.sample_signed(lr, steps, eta=eta, noise_fn=noise)
        return ops.to_unit(x).clamp(0, 1)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        idx = batch["index"].tolist()
        if self.hparams.get("diagnostic_buckets", 0) > 0:
            part = self.model.diagnostic(
                batch["hr"], idx, self.hparams["val_seed"], self.hparams["diagnostic_buckets"]
            )
            self._diag = add_diagnostic(self._diag, part)
        sr = self.sample(batch["lr"], idx)
        return {**metric_targets(batch), "sr": {"gpsr": sr}}

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        return self.validation_step(batch, batch_idx)

    def _log_diagnostic(self, prefix: str) -> None:
        """Log the per-timestep loss / x0 error summed by `validation_step` (all processes)."""
        if self._diag is None:
            return
        sums = {k: self.trainer.strategy.reduce(v, reduce_op="sum") for k, v in self._diag.items()}
        self._diag = None
        means = diagnostic_means(sums, self.diffusion.num_timesteps)
        for t, loss, x0_mse in zip(means["t"], means["loss"], means["x0_mse"]):
            self.log(f"{prefix}/loss_t/{t:04d}", loss)
            self.log(f"{prefix}/x0_mse_t/{t:04d}", x0_mse)
        self.log(f"{prefix}/x0_mse_t/mean_predictor", means["mean_predictor_x0_mse"])

    def on_validation_epoch_end(self) -> None:
        self._log_diagnostic("val")

    def on_test_epoch_end(self) -> None:
        self._log_diagnostic("test")

    @torch.no_grad()
    def panel(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        lr, hr = batch["lr"], ops.to_unit(batch["hr"])
        idx = batch["index"].tolist()
        samples = torch.stack(
            [
                self.sample(lr, idx, seed=self.hparams["val_seed"] + k)
                for k in range(max(1, self.hparams["panel_samples"]))
            ]
        )
        std = samples.std(0) if samples.shape[0] > 1 else torch.zeros_like(samples[0])
        name = f"GPSR {self.hparams['val_steps']}+1"
        return panel_rows(ops.to_unit(lr), hr, {name: samples[0]}, self.flow.scale, name, std)
