"""FlowModule: trains the degradation flow (Algorithm 1) by exact relaxed likelihood."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchmetrics import MeanMetric

from gpsr import ops
from gpsr.diffusion import IndexNoise
from gpsr.models.flow import DegradationFlow, flow_loss_terms
from gpsr.models.gpsr import GPSR
from gpsr.panels import panel_rows
from gpsr.stages.base import StageModule, metric_targets, plain

__all__ = ["FlowModule", "flow_loss_terms"]  # the loss lives in gpsr.models.flow


class FlowModule(StageModule):
    """Lightning wrapper of the flow stage.

    Args:
        scale: SR factor s.
        flow: DegradationFlow settings (num_blocks, num_convs, growth, clamp, channels).
        sigma: width of the relaxed Dirac (one 8-bit level, 1/127.5).
        val_seed: seed of the flow-only validation samples (per image index).
        optimizer, scheduler, grad_clip, nonfinite, max_skipped_steps: see StageModule.
    """

    stage = "flow"

    def __init__(
        self,
        *,
        optimizer: Callable[..., torch.optim.Optimizer],
        scale: int = 8,
        flow: dict[str, Any] | None = None,
        sigma: float = ops.QUANT_STEP,
        val_seed: int = 0,
        scheduler=None,
        grad_clip: float | None = 10.0,
        nonfinite: str = "raise",
        max_skipped_steps: int = 10,
        speed: dict[str, Any] | None = None,
    ):
        super().__init__(optimizer, scheduler, grad_clip, nonfinite, speed, max_skipped_steps)
        flow = plain(dict(flow or {}))
        self.save_hyperparameters(
            {"scale": scale, "flow": flow, "sigma": sigma, "val_seed": val_seed}
        )
        self.flow = DegradationFlow(scale=scale, **flow)
        self.sigma = sigma
        self.coarse_mse = torch.nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})

    def apply_speedups(self, checkpointing: bool, channels_last: bool, compile: bool) -> None:
        self.flow.speed_up(checkpointing, channels_last, compile)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        x = ops.dequantize(batch["hr"])
        terms = flow_loss_terms(self.flow, x, self.sigma)
        loss = self.guard_loss(terms["loss"])
        if loss is None:
            return None
        bs = x.shape[0]
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=bs)
        for name in ("coarse", "latent", "logdet", "bpd"):
            self.log(f"train/{name}", terms[name], batch_size=bs)
        return loss

    def _samples(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        lr = batch["lr"]
        zero = torch.zeros(lr.shape[0], *self.flow.latent_shape(*lr.shape[-2:]), device=lr.device)
        noise = IndexNoise(batch["index"].tolist(), self.hparams["val_seed"], lr.device)
        return {
            "flow_zero": self.flow.pseudoinverse(lr, zero),
            "flow_sample": GPSR(self.flow).sample_signed(lr, steps=0, noise_fn=noise),
        }

    def validation_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, split: str = "val"
    ) -> dict[str, Any]:
        """Flow-only samples (z ~ N(0, I) and z = 0) for the metrics callback, and the flow's
        own fit `mean((coarse - U_k(lr))^2)` per image ([-1, 1] units)."""
        hr, lr = batch["hr"], batch["lr"]
        coarse = self.flow(hr)[0]
        fit = ((coarse - ops.upsample_nearest(lr, self.flow.k)) ** 2).flatten(1).mean(1)
        self.coarse_mse[split].update(fit)
        self.log(f"{split}/coarse_mse", self.coarse_mse[split], batch_size=hr.shape[0])
        sr = {name: ops.to_unit(x).clamp(0, 1) for name, x in self._samples(batch).items()}
        return {**metric_targets(batch), "sr": sr}

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        return self.validation_step(batch, batch_idx, split="test")

    @torch.no_grad()
    def panel(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hr, lr = batch["hr"], batch["lr"]
        sr = {name: ops.to_unit(x).clamp(0, 1) for name, x in self._samples(batch).items()}
        samples = {"flow z=0": sr["flow_zero"], "flow sample": sr["flow_sample"]}
        return panel_rows(ops.to_unit(lr), ops.to_unit(hr), samples, self.flow.scale, "flow sample")
