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


def to_uint8_grid(
    rows: dict[str, torch.Tensor], max_images: int = 8, min_side: int = 128, titles: bool = True
) -> np.ndarray:
    """Rows of images (N, 3, H, W) in [0, 1] -> one (H', W', 3) uint8 grid, a column per row:
    each tile enlarged by the smallest whole factor that makes its shorter side at least
    `min_side` pixels, by pixel replication (nearest: no smoothing, so the detail a method
    adds stays visible), 2-pixel white gaps, and with `titles` a white strip on top naming
    each column (the rows' keys, e.g. "LR", "gpsr", "|error| x4")."""
    n = min(max_images, min(r.shape[0] for r in rows.values()))
    tiles = torch.stack(
        [r[:n].detach().float().cpu() for r in rows.values()], dim=1
    )  # (n, R, 3, H, W)
    h, w = tiles.shape[-2:]
    factor = max(1, -(-min_side // min(h, w)))
    if factor > 1:
        tiles = tiles.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    grid = make_grid(tiles.flatten(0, 1), nrow=len(rows), padding=2, pad_value=1.0)
    out = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if not titles:
        return out
    return _with_titles(out, list(rows), w * factor)


def _with_titles(grid: np.ndarray, names: list[str], tile_width: int, pad: int = 2) -> np.ndarray:
    """A white strip above `grid` with each column's name centred over its tile."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    strip = Image.new("RGB", (grid.shape[1], 16), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for i, name in enumerate(names):
        left = pad + i * (tile_width + pad)
        text_width = draw.textlength(name, font=font)
        x = left + max(0, (tile_width - text_width) / 2)
        draw.text((x, 2), name, fill=(0, 0, 0), font=font)
    return np.concatenate([np.asarray(strip), grid], axis=0)
