"""Device-wide speed switches shared by the training stages and the benchmark; the models'
own switches are their `speed_up` methods."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

__all__ = ["set_tf32", "resolve_auto"]


def resolve_auto(value: bool | str, device: torch.device | str) -> bool:
    """`"auto"` -> True on CUDA only; booleans pass through."""
    if value == "auto":
        return torch.device(device).type == "cuda"
    return bool(value)


def set_tf32(enabled: bool) -> None:
    """TF32 matmuls and convolutions on Ampere+ GPUs (no effect on CPU)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
