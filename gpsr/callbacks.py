"""Lightning callbacks: validation metrics for both stages, the image panel, and
checkpoints whose last.ckpt always holds the final step."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from PIL import Image
from torch import nn

from gpsr.metrics import SRMetrics
from gpsr.panels import to_uint8_grid

log = logging.getLogger(__name__)

__all__ = ["SRMetricsCallback", "ImagePanelCallback", "FinalCheckpoint"]


class FinalCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` that also saves last.ckpt when training ends between two periodic
    saves (Lightning keeps the last periodic one), so a finished run's last.ckpt holds its
    final step and the results it logged; and that flushes the loggers before each save, so
    what was logged up to a checkpoint is on disk with it."""

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        # Lightning logs a training step's metrics after its batch-end callbacks, i.e. after
        # a periodic save: log them now, so a run killed right after this save keeps them
        # (the CSV logger drops the identical row Lightning logs again a moment later).
        connector = getattr(trainer, "_logger_connector", None)
        in_batch = isinstance(getattr(connector, "_first_loop_iter", None), bool)
        if trainer.training and in_batch and hasattr(connector, "update_train_step_metrics"):
            connector.update_train_step_metrics()
        for logger in trainer.loggers:
            logger.save()
        super()._save_checkpoint(trainer, filepath)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_global_step_saved = trainer.global_step
        else:
            super().on_train_end(trainer, pl_module)


class SRMetricsCallback(Callback):
    """PSNR, SSIM and consistency (x1e-5) of every method a validation step returns.

    The module's `validation_step` returns {"hr", "lr", "sr": {method: image}}, all in
    [0, 1], and "lr_clean" when the data adds noise to the LR (then `consistency_clean` is
    logged too). One `SRMetrics` per method accumulates over the epoch; values are reduced
    across DDP processes by torchmetrics and logged as `val/<method>/<metric>`.
    """

    def __init__(self) -> None:
        self.metrics = nn.ModuleDict()
        self.last: dict[str, float] = {}

    def _update(self, pl_module, outputs: Any) -> None:
        if not isinstance(outputs, dict) or "sr" not in outputs:
            return
        clean = outputs.get("lr_clean")
        for method, sr in outputs["sr"].items():
            if method not in self.metrics:
                scale = pl_module.hparams["scale"]
                self.metrics[method] = SRMetrics(scale, clean=clean is not None).to(sr.device)
            self.metrics[method].update(sr, outputs["hr"], outputs["lr"], clean)

    def _log(self, pl_module, prefix: str) -> None:
        self.last = {}
        for method, metric in self.metrics.items():
            for name, value in metric.compute().items():
                key = f"{prefix}/{method}/{name}"
                self.last[key] = value
                # Already reduced across processes by torchmetrics; sync_dist only averages
                # identical values (and keeps Lightning from warning).
                pl_module.log(key, value, sync_dist=True)
            metric.reset()

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ):
        self._update(pl_module, outputs)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._log(pl_module, "val")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._update(pl_module, outputs)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._log(pl_module, "test")


class ImagePanelCallback(Callback):
    """After each validation, a grid (columns: LR | SR ... | HR | |error| | std) of the first
    validation images, written as PNG under `<output_dir>/samples/` and logged as uint8."""

    def __init__(self, output_dir: str, max_images: int = 8):
        self.output_dir = Path(output_dir)
        self.max_images = max_images
        self.batch: dict[str, torch.Tensor] | None = None

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self.batch = {k: v[: self.max_images] for k, v in batch.items()}

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.batch is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        rows = pl_module.panel(self.batch)
        grid = to_uint8_grid(rows, self.max_images)
        path = self.output_dir / "samples" / f"step{trainer.global_step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(path)
        caption = " | ".join(rows)
        for logger in trainer.loggers:
            log_image = getattr(logger, "log_image", None)
            if log_image is not None:  # WandbLogger
                log_image("val/panel", [grid], step=trainer.global_step, caption=[caption])
            elif hasattr(logger, "experiment") and hasattr(logger.experiment, "add_image"):
                logger.experiment.add_image(
                    "val/panel", grid, trainer.global_step, dataformats="HWC"
                )
        self.batch = None
