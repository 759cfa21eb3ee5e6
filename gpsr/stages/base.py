"""What both training stages share: optimiser and schedule from config, gradient clipping,
the non-finite loss guard, checkpoint metadata, and the image panel for loggers."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from gpsr.loading import FORMAT_VERSION, upgrade_checkpoint
from gpsr.utils.checkpoint import check_gpsr_checkpoint
from gpsr.utils.errors import ConfigError, GPSRError

log = logging.getLogger(__name__)

__all__ = ["StageModule", "NonFiniteLossError", "plain", "metric_targets"]


def plain(obj: Any) -> Any:
    """OmegaConf containers -> plain dicts / lists (checkpoints must load with weights_only)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def metric_targets(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the metrics callback compares samples with, in [0, 1]: "hr", "lr" (the LR the
    samples were made from) and, when the data adds noise to it, "lr_clean"."""
    from gpsr import ops

    keys = ("hr", "lr", "lr_clean") if "lr_clean" in batch else ("hr", "lr")
    return {k: ops.to_unit(batch[k]) for k in keys}


class NonFiniteLossError(GPSRError, FloatingPointError):
    """The training loss became NaN or infinite."""


class StageModule(L.LightningModule):
    """Base LightningModule of a gpsr stage.

    Args:
        optimizer: `functools.partial` of a torch optimiser (Hydra `_partial_: true`), completed
            with the trainable parameters.
        scheduler: optional partial of a torch LR scheduler, stepped every optimiser step.
        grad_clip: gradient-norm clip (0 or None disables).
        nonfinite: "raise" stops the run on a NaN / inf loss (the last good checkpoint is
            kept); "skip" skips that step on every process.
        max_skipped_steps: with "skip", the run stops after this many consecutive skipped
            steps (a diverged run is not a run).
        speed: {checkpointing, channels_last, compile, tf32} (see gpsr.utils.speed); "auto" means
            on for CUDA only.
    """

    stage: str = ""

    def __init__(
        self,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None,
        grad_clip: float | None,
        nonfinite: str,
        speed: dict[str, Any] | None,
        max_skipped_steps: int,
    ):
        super().__init__()
        self.speed = dict(speed or {})
        if nonfinite not in ("raise", "skip"):
            raise ConfigError(
                f"stage.module.nonfinite must be 'raise' or 'skip', got {nonfinite!r}"
            )
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.grad_clip = grad_clip
        self.nonfinite = nonfinite
        self.max_skipped_steps = int(max_skipped_steps)
        self.skipped_steps = 0
        self.consecutive_skips = 0

    def setup(self, stage: str) -> None:
        from gpsr.utils.speed import resolve_auto, set_tf32

        device = self.trainer.strategy.root_device if self._trainer is not None else self.device
        opts = {
            k: resolve_auto(self.speed.get(k, False), device)
            for k in ("checkpointing", "channels_last", "compile", "tf32")
        }
        set_tf32(opts.pop("tf32"))
        self.apply_speedups(**opts)

    def apply_speedups(self, checkpointing: bool, channels_last: bool, compile: bool) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ optimisation
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ):
        if gradient_clip_val is not None:  # one knob for one thing
            raise ConfigError(
                f"trainer.gradient_clip_val={gradient_clip_val} is not used by gpsr: set "
                f"stage.module.grad_clip (the gradient-norm clip of the stage) instead"
            )
        if self.grad_clip:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm"
            )

    def guard_loss(self, loss: torch.Tensor) -> torch.Tensor | None:
        """Return the loss, or None to skip the step, or raise, when it is not finite anywhere."""
        finite = bool(torch.isfinite(loss.detach()).item())
        finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            self.consecutive_skips = 0
            return loss
        step = self.global_step
        if self.nonfinite == "skip":
            self.skipped_steps += 1
            self.consecutive_skips += 1
            log.warning(
                "non-finite loss at step %d: step skipped (%d so far)", step, self.skipped_steps
            )
            if self.consecutive_skips < self.max_skipped_steps:
                return None
            raise NonFiniteLossError(
                f"the {self.stage} loss was not finite for {self.consecutive_skips} steps in a "
                f"row (up to step {step}): the run has diverged and stops here, keeping its "
                f"last good checkpoint (lower the learning rate, or raise "
                f"stage.module.max_skipped_steps)"
            )
        raise NonFiniteLossError(
            f"the {self.stage} loss became {loss.item()} at step {step}; the run stops here and "
            f"its last good checkpoint is kept (lower the learning rate, or set "
            f"stage.module.nonfinite=skip to skip such steps)"
        )

    # ------------------------------------------------------------------ checkpoints
    def gpsr_metadata(self) -> dict[str, Any]:
        return {"stage": self.stage, "scale": int(self.hparams["scale"]), "version": FORMAT_VERSION}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Resuming from a checkpoint of the other stage or scale would load silently (the
        # flow's weights have the same shapes at every scale): refuse it here.
        path = (self._trainer.ckpt_path if self._trainer is not None else None) or "ckpt_path"
        check_gpsr_checkpoint(checkpoint, path, stage=self.stage, scale=int(self.hparams["scale"]))
        upgrade_checkpoint(checkpoint, path)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # AtomicCheckpointIO seals this with a digest of the whole checkpoint.
        checkpoint["gpsr"] = self.gpsr_metadata()

    # ------------------------------------------------------------------ validation panel
    def panel(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named image rows in [0, 1] for the sample grid, each (N, 3, H, W)."""
        raise NotImplementedError
