"""Speed switches shared by the training stages and the benchmark (one implementation each)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from gpsr.models.flow import DegradationFlow

log = logging.getLogger(__name__)

__all__ = ["apply_speedups", "set_tf32", "resolve_auto"]


def resolve_auto(value: bool | str, device: torch.device | str) -> bool:
    """`"auto"` -> True on CUDA only; booleans pass through."""
    if value == "auto":
        return torch.device(device).type == "cuda"
    return bool(value)


def set_tf32(enabled: bool) -> None:
    """TF32 matmuls and convolutions on Ampere+ GPUs (no effect on CPU)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def apply_speedups(
    flow: DegradationFlow | None = None,
    unet: nn.Module | None = None,
    checkpointing: bool = False,
    channels_last: bool = False,
    compile: bool = False,
) -> None:
    """In place, state-dict keys unchanged:
    - checkpointing: recompute each flow block's activations in the backward pass instead of
      storing them (only the 4C-channel block inputs are kept);
    - channels_last: NHWC memory layout for the convolutions;
    - compile: `torch.compile` each flow subnet and the UNet (`nn.Module.compile`, so
      checkpoints keep their keys).
    """
    if flow is not None:
        flow.checkpointing = checkpointing
    for module in (flow, unet):
        if module is not None and channels_last:
            module.to(memory_format=torch.channels_last)
    if compile:
        if flow is not None:
            for block in flow.blocks:
                block.predict.compile()
                block.update.compile()
        if unet is not None:
            unet.compile()
