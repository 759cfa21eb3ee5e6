"""Lightning callbacks: validation metrics for both stages, the image panel, and
checkpoints whose last.ckpt always holds the final step."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from PIL import Image
from torch import nn

from gpsr.learned import build_all
from gpsr.metrics import SRMetrics
from gpsr.panels import to_uint8_grid

log = logging.getLogger(__name__)

__all__ = ["SRMetricsCallback", "ImagePanelCallback", "FinalCheckpoint", "RandomState"]


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


class RandomState(Callback):
    """Saves the global random generators with every checkpoint and restores them when a run
    resumes, so a resumed run draws what the interrupted run would have drawn next.

    What is saved: torch's CPU generator, every CUDA device's generator, numpy's and
    Python's, of every process (DDP ranks are gathered into the checkpoint that rank 0
    writes). They are captured when the checkpoint is written (after the step's optimiser
    update and its batch-end callbacks) and restored when the resumed run's training loop
    has created its data iterator (`on_train_start`, before the first batch is drawn):
    creating an iterator draws a seed from torch's generator, and the interrupted run had
    drawn that one already. Lightning's own resume steps after this point (skipping a
    validation the checkpoint preceded, which creates the validation iterator) draw what
    the interrupted run drew at the same place. Stored as tensors and plain Python
    values, so checkpoints stay loadable with `torch.load(weights_only=True)`.

    Worker processes of the data loader keep generators of their own: the training dataset
    saves those with the loader's state (`gpsr.data.datamodule.ImageDataset.state_dict`).
    A checkpoint from a run with another number of processes restores nothing (a warning
    says so).
    """

    def __init__(self) -> None:
        self._pending: list[dict[str, Any]] | None = None

    @staticmethod
    def capture() -> dict[str, Any]:
        """This process's generators, as tensors and plain Python values."""
        np_state = np.random.get_state()
        version, py_state, gauss = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": [version, list(py_state), gauss],
        }

    @staticmethod
    def restore(state: dict[str, Any]) -> None:
        """Set this process's generators to what `capture` returned."""
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        version, py_state, gauss = state["python"]
        random.setstate((version, tuple(py_state), gauss))

    def state_dict(self) -> dict[str, Any]:
        state = self.capture()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, state)  # every rank dumps checkpoints
            return {"ranks": ranks}
        return {"ranks": [state]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("ranks")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ranks, self._pending = self._pending, None
        if ranks is None:
            return
        if len(ranks) != trainer.world_size:
            log.warning(
                "the checkpoint holds the random state of %d processes, this run has %d: "
                "random draws from here on differ from the interrupted run's",
                len(ranks),
                trainer.world_size,
            )
            return
        self.restore(ranks[trainer.global_rank])


class SRMetricsCallback(Callback):
    """PSNR, SSIM and consistency (x1e-5) of every method a validation step returns.

    The module's `validation_step` returns {"hr", "lr", "sr": {method: image}}, all in
    [0, 1], and "lr_clean" when the data adds noise to the LR (then `consistency_clean` is
    logged too). One `SRMetrics` per method accumulates over the epoch; values are reduced
    across DDP processes by torchmetrics and logged as `val/<method>/<metric>`.

    Opt-in, as they cost time: `extras` adds the weight-free metrics (MS-SSIM, HaarPSI,
    power-spectrum error, SWD; docs/metrics.md), `learned` any of `lpips_alex`, `lpips_vgg`,
    `dists`, `fid`, `kid`, whose weights are found (or refused, in one line) when fitting starts.
    """

    def __init__(self, extras: bool = False, learned: Sequence[str] = ()) -> None:
        self.metrics = nn.ModuleDict()
        self.last: dict[str, float] = {}
        self.extras, self.learned = bool(extras), learned
        self._learned: dict | None = None
        self._sets: dict | None = None

    def _build(self, pl_module) -> None:
        if self._learned is None:
            self._learned, self._sets = build_all(self.learned, pl_module.device)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._build(pl_module)  # missing weights are refused before the first step

    def on_validation_start(self, trainer, pl_module) -> None:
        self._build(pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self._build(pl_module)

    def _update(self, pl_module, outputs: Any) -> None:
        if not isinstance(outputs, dict) or "sr" not in outputs:
            return
        clean = outputs.get("lr_clean")
        for method, sr in outputs["sr"].items():
            if method not in self.metrics:
                scale = pl_module.hparams["scale"]
                self.metrics[method] = SRMetrics(
                    scale,
                    clean=clean is not None,
                    extras=self.extras,
                    learned=self._learned,
                    sets=self._sets,
                ).to(sr.device)
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
