"""Device helpers for the entry points."""

from __future__ import annotations

import torch

__all__ = ["pick_device", "synchronize"]


def pick_device(name: str) -> torch.device:
    """ "auto" -> CUDA when available, else CPU; any other name as torch understands it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work (for timing); nothing to do on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
