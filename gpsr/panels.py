"""Image panels for loggers and evaluation: rows of images in [0, 1] -> one uint8 grid."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.utils import make_grid

from gpsr import ops

__all__ = ["panel_rows", "to_uint8_grid"]


def panel_rows(
    lr: torch.Tensor,
    hr: torch.Tensor,
    samples: dict[str, torch.Tensor],
    scale: int,
    error_of: str,
    std: torch.Tensor | None = None,
    width: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The panel's columns: LR (nearest-upsampled) | samples ... | HR | |error| x4 [| std x8]
    [| interval width x2].

    lr (N, C, h, w), hr and each sample (N, C, s*h, s*w), all in [0, 1]; `error_of` names the
    sample whose absolute error is shown; std (N, C, s*h, s*w) over samples, optional; width
    (N, C, s*h, s*w) the calibrated interval's width (docs/uncertainty.md), optional.
    """
    rows = {"LR": ops.upsample_nearest(lr, scale).clamp(0, 1), **samples, "HR": hr}
    rows["|error| x4"] = ((samples[error_of] - hr).abs() * 4).clamp(0, 1)
    if std is not None:
        rows["std x8"] = (std * 8).clamp(0, 1)
    if width is not None:
        rows["interval width x2"] = (width * 2).clamp(0, 1)
    return rows


def to_uint8_grid(rows: dict[str, torch.Tensor], max_images: int = 8) -> np.ndarray:
    """Rows of images (N, 3, H, W) in [0, 1] -> one (H', W', 3) uint8 grid, a column per row."""
    n = min(max_images, min(r.shape[0] for r in rows.values()))
    tiles = torch.stack(
        [r[:n].detach().float().cpu() for r in rows.values()], dim=1
    )  # (n, R, 3, H, W)
    grid = make_grid(tiles.flatten(0, 1), nrow=len(rows), padding=2, pad_value=1.0)
    return (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
