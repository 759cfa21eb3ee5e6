"""Super-resolve your own LR images: `python -m gpsr.sample ckpt=... input=<file|folder> output=<folder>`.

Writes `<name>_sr.png` (or `<name>_sr{k}.png` for `samples=K` plus `<name>_std.png`, the
per-pixel standard deviation over samples), optionally float32 `.npy` (`save_float=true`),
and prints each image's consistency. A bad file gets one line naming it; the rest go on.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from gpsr import ops
from gpsr.cli import CONFIG_DIR, preflight, report_errors
from gpsr.data.images import IMAGE_SUFFIXES, ImageFileError, decode_rgb
from gpsr.evaluate import pick_device
from gpsr.inference import GPSR
from gpsr.metrics import CONSISTENCY_UNIT, per_image_consistency

log = logging.getLogger("gpsr.sample")

__all__ = ["lr_multiple", "sample_images", "main"]


def lr_multiple(model: GPSR) -> int:
    """LR sides must be multiples of this, so the latent fits the UNet's down-sampling."""
    if model.unet is None:
        return 1
    div = 2 ** (model.unet.levels - 1)
    return div // math.gcd(div, model.flow.k)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W, C) uint8."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def sample_images(cfg: DictConfig) -> int:
    """Process every input image; returns the number of files that failed."""
    device = pick_device(cfg.device)
    model = GPSR.load(cfg.ckpt, device=device, ema=cfg.ema)
    steps = cfg.steps if model.unet is not None else 0
    src = Path(cfg.input)
    if not src.exists():
        raise FileNotFoundError(f"input={src} does not exist")
    files = [src] if src.is_file() else sorted(p for p in src.iterdir() if p.is_file())
    out_dir = Path(cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    multiple = lr_multiple(model)
    failures = 0
    for path in files:
        try:
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise ImageFileError(f"{path}: not an image file ({', '.join(IMAGE_SUFFIXES)})")
            img = decode_rgb(path)
        except ImageFileError as err:
            failures += 1
            print(f"skipped: {err}", file=sys.stderr, flush=True)
            continue
        h, w = img.shape[-2:]
        if h < multiple or w < multiple:
            failures += 1
            print(
                f"skipped: {path} is {w}x{h}; LR images must be at least {multiple}x{multiple}",
                file=sys.stderr,
                flush=True,
            )
            continue
        if h % multiple or w % multiple:
            img = ops.modcrop(img, multiple)
            log.warning(
                "%s: %dx%d is not a multiple of %d; cropped to %dx%d",
                path,
                w,
                h,
                multiple,
                img.shape[-1],
                img.shape[-2],
            )
        lr = (img.float() / 255.0)[None].to(device)
        sr = model.super_resolve(
            lr,
            steps=steps,
            eta=cfg.eta,
            samples=cfg.samples,
            project=cfg.project,
            seed=cfg.seed,
            indices=[0],
        )
        stack = sr if cfg.samples > 1 else sr[:, None]  # (1, K, C, H, W)
        stem = path.stem
        for k in range(stack.shape[1]):
            name = f"{stem}_sr" if cfg.samples == 1 else f"{stem}_sr{k}"
            Image.fromarray(_to_uint8(stack[0, k])).save(out_dir / f"{name}.png")
            if cfg.save_float:
                np.save(
                    out_dir / f"{name}.npy",
                    stack[0, k].permute(1, 2, 0).cpu().numpy().astype(np.float32),
                )
        if cfg.samples > 1:
            std = stack[0].std(0)
            Image.fromarray(_to_uint8(std / std.max().clamp(min=1e-8))).save(
                out_dir / f"{stem}_std.png"
            )
            if cfg.save_float:
                np.save(
                    out_dir / f"{stem}_std.npy",
                    std.permute(1, 2, 0).cpu().numpy().astype(np.float32),
                )
        cons = per_image_consistency(stack[0], lr.expand(stack.shape[1], -1, -1, -1), model.scale)
        rounded = (stack[0] * 255).round() / 255
        cons8 = per_image_consistency(rounded, lr.expand(stack.shape[1], -1, -1, -1), model.scale)
        print(
            f"{path.name}: {w}x{h} -> {stack.shape[-1]}x{stack.shape[-2]}, {stack.shape[1]} sample(s), "
            f"consistency x1e-5: float {cons.mean().item() / CONSISTENCY_UNIT:.4g}, "
            f"8-bit PNG {cons8.mean().item() / CONSISTENCY_UNIT:.4g}",
            flush=True,
        )
    return failures


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
@report_errors
def main(cfg: DictConfig) -> None:
    failures = sample_images(cfg)
    if failures:
        print(f"{failures} file(s) could not be processed", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    preflight(sys.argv[1:])
    main()
