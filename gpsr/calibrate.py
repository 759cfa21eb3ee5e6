"""Calibrate GPSR's per-pixel intervals: `python -m gpsr.calibrate ckpt=... risk.alpha=0.1
risk.delta=0.1 sampler.samples=8` (docs/uncertainty.md).

Samples K super-resolutions of every image of a held-out split (the validation split by
default; never the test split), finds for each HR pixel the smallest lambda whose interval
`mean +/- lambda (std + half a level)` holds it, and picks lambda by the Hoeffding-Bentkus
rule of Risk-Controlling Prediction Sets (`gpsr.uncertainty.calibrate_lambda`). Writes
`calibration.json` to the run folder: what `gpsr.evaluate calibration=...` and
`gpsr.sample calibration=...` read, tied to the checkpoint (its SHA-256) and to the sampler
settings it was made with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm import tqdm

from gpsr import ops, progress
from gpsr.configs import register as register_schemas
from gpsr.inference import load_from_config, sampled_method
from gpsr.models.bf16 import BF16_REVISION
from gpsr.models.gpsr import resolve_precision
from gpsr.uncertainty import (
    LAMBDA_GRID,
    SPREAD_FLOOR,
    calibrate_lambda,
    centre_spread,
    grid_index,
    hb_upper_bound,
    images_needed,
    losses_on_grid,
    needed_lambda,
    width_on_grid,
)
from gpsr.utils.cli import CONFIG_DIR, check_output_dir, preflight, report_errors
from gpsr.utils.device import pick_device
from gpsr.utils.errors import ConfigError, InputNotFoundError

log = logging.getLogger("gpsr.calibrate")

__all__ = [
    "calibrate",
    "calibration_for",
    "file_sha256",
    "sampler_record",
    "load_calibration",
    "main",
]

FORMAT = "gpsr-calibration-1"


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(2**20), b""):
            h.update(chunk)
    return h.hexdigest()


def sampler_record(cfg: DictConfig, steps: int) -> dict[str, Any]:
    """The settings that change the samples, and so what a calibration is worth: K, steps,
    eta, spacing, sigma_y, projection, EMA weights, seed-independent tiling, the networks'
    precision and, for bf16, the revision of its arithmetic (`BF16_REVISION`)."""
    s = cfg.sampler
    record = {
        "samples": int(s.samples),
        "steps": int(steps),
        "eta": float(s.eta),
        "spacing": str(s.spacing),
        "sigma_y": s.get("sigma_y", 0.0) if s.get("sigma_y", 0.0) == "auto" else float(s.sigma_y),
        "project": bool(s.project),
        "ema": bool(cfg.ema),
        "tile": OmegaConf.to_container(s, resolve=True).get("tile"),
    }
    # The networks' arithmetic as resolved on this machine (auto -> fp32 or bf16), and for
    # bf16 the revision of its arithmetic (fp32 samples never change between releases).
    record["precision"] = resolve_precision(s.get("precision", "fp32"), pick_device(cfg.device))
    if record["precision"] == "bf16":
        record["bf16_revision"] = BF16_REVISION
    return record


def _seal(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "seal"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def check_risk(alpha: Any, delta: Any, samples: Any) -> None:
    """alpha, delta in (0, 1) and K >= 2 samples, or one line naming the setting."""
    for name, v in (("risk.alpha", alpha), ("risk.delta", delta)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
            raise ConfigError(f"{name} must be a number in (0, 1), got {v!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise ConfigError(
            f"sampler.samples must be at least 2 for an interval (a spread needs two samples), "
            f"got {samples!r}"
        )


def load_calibration(path: str | Path, ckpt: str | Path, record: dict[str, Any]) -> dict[str, Any]:
    """Read `calibration.json` and check it belongs to this checkpoint and these sampler
    settings (`sampler_record`); one-line errors for a missing, damaged or hand-edited file,
    another checkpoint or other settings."""
    return check_calibration(read_calibration(path), path, ckpt, record)


def read_calibration(path: str | Path) -> dict[str, Any]:
    """`calibration.json` as written by gpsr.calibrate; one-line errors for a missing,
    damaged or hand-edited file."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"calibration={path} does not exist")
    try:
        cal = json.loads(path.read_text())
        if not isinstance(cal, dict) or cal.get("format") != FORMAT:
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(
            f"calibration={path} is not a gpsr calibration file (write one with gpsr.calibrate)"
        ) from None
    if cal.get("seal") != _seal(cal):
        raise ConfigError(
            f"calibration={path} was changed after gpsr.calibrate wrote it (its seal does not "
            f"match): calibrate again"
        )
    return cal


def check_calibration(
    cal: dict[str, Any], path: str | Path, ckpt: str | Path, record: dict[str, Any]
) -> dict[str, Any]:
    """`cal` (`read_calibration`) if it belongs to this checkpoint and these sampler settings
    (`sampler_record`), else a one-line error naming what differs."""
    if cal["ckpt_sha256"] != file_sha256(ckpt):
        raise ConfigError(
            f"calibration={path} was made for another checkpoint ({cal['ckpt']}, SHA-256 "
            f"{cal['ckpt_sha256'][:12]}...), not {ckpt}: calibrate this one"
        )
    names = {"ema": "ema=", "bf16_revision": "bf16 arithmetic revision "}
    name = lambda k: names.get(k, f"sampler.{k}=")  # noqa: E731
    made = {"precision": "fp32", **cal["sampler"]}  # files older than sampler.precision
    if made["precision"] == "bf16":
        made.setdefault("bf16_revision", "an earlier one")  # files older than the revision
    diff = [f"{name(k)}{record[k]} (calibrated: {made.get(k)})" for k in record
            if made.get(k) != record[k]]  # fmt: skip
    if diff:
        raise ConfigError(
            f"calibration={path} was made with other sampler settings: {', '.join(diff)}; "
            f"use those or calibrate again"
        )
    return cal


def calibration_for(cfg: DictConfig, steps: int) -> dict[str, Any] | None:
    """The record of `calibration=` for an entry point's config, checked against the
    checkpoint and the sampler settings (with `steps` the steps actually sampled), or None
    without one; before any model is loaded or any sampling starts. `sampler.precision=auto`
    becomes the calibration's precision (in `cfg`, which the sampler then uses)."""
    if not cfg.get("calibration"):
        return None
    if cfg.sampler.samples < 2:
        raise ConfigError("calibration= needs sampler.samples >= 2 (the interval's samples)")
    cal = read_calibration(cfg.calibration)
    if cfg.sampler.get("precision") == "auto":
        # Intervals hold for the sampler they were calibrated with: "auto" takes its precision.
        with open_dict(cfg):
            cfg.sampler.precision = cal["sampler"].get("precision", "fp32")
    return check_calibration(cal, cfg.calibration, cfg.ckpt, sampler_record(cfg, steps))


def _subset_rows(losses: np.ndarray, widths: np.ndarray, alpha: float, delta: float) -> list:
    """How lambda and the mean width (over all calibration images) change with the number
    of calibration images: the first n for n = the fewest usable, doubling, up to all."""
    n_all, rows = losses.shape[0], []
    n = images_needed(alpha, delta)
    sizes = []
    while n < n_all:
        sizes.append(n)
        n *= 2
    for n in [*sizes, n_all]:
        lam, _ = calibrate_lambda(losses[:n], alpha, delta)
        j = None if lam is None else grid_index(lam)
        rows.append(
            {"images": n, "lambda": lam, "width": None if j is None else widths[:, j].mean()}
        )
    return rows


@torch.no_grad()
def calibrate(cfg: DictConfig) -> dict[str, Any]:
    """Calibrate on cfg.split; writes and returns the calibration record."""
    alpha, delta = cfg.risk.alpha, cfg.risk.delta
    check_risk(alpha, delta, cfg.sampler.samples)
    if cfg.split == "test":
        raise ConfigError(
            "split=test: calibration never uses the test split (its guarantee is about images "
            "it has not seen); use split=val or another held-out split"
        )
    output_dir = check_output_dir(cfg.paths.output_dir)
    model = load_from_config(cfg)
    with open_dict(cfg):
        cfg.scale = model.scale  # the data's SR factor
    loader = instantiate(cfg.data).eval_dataloader(cfg.split)
    n_images = len(loader.dataset)
    if cfg.limit_batches is not None:
        n_images = min(n_images, cfg.limit_batches * loader.batch_size)
    need = images_needed(alpha, delta)
    if n_images < need:
        raise ConfigError(
            f"the {cfg.split} split has {n_images} images; with risk.alpha={alpha} and "
            f"risk.delta={delta} the bound cannot fall below alpha with fewer than {need} "
            f"(at {n_images} it is {float(hb_upper_bound(0.0, max(n_images, 1), delta)):.3g} "
            f"even if no pixel is ever outside): give a larger held-out split"
        )
    steps = cfg.sampler.steps if model.unet is not None else 0
    sample = sampled_method(model, cfg, steps)
    losses, widths, pixels, t0 = [], [], 0, time.perf_counter()
    for b, batch in enumerate(
        tqdm(loader, desc=f"calibrate {cfg.split}", disable=not progress.show_bars(cfg.progress))
    ):
        if cfg.limit_batches is not None and b >= cfg.limit_batches:
            break
        hr = ops.to_unit(batch["hr"].to(model.device))
        lr = ops.to_unit(batch["lr"].to(model.device))
        idx = batch["index"].tolist()
        sigma = model.noise_level(lr, cfg.sampler.get("sigma_y", 0.0))
        sr = sample(lr, idx, sigma)
        if cfg.sampler.project:
            sr, _ = model.project(sr, lr, sigma)
        centre, spread = centre_spread(sr)
        losses.append(losses_on_grid(needed_lambda(hr, centre, spread)))
        widths.append(width_on_grid(centre, spread))
        pixels += hr[0].numel() * hr.shape[0]
    seconds = time.perf_counter() - t0
    loss, width = np.concatenate(losses), np.concatenate(widths)
    lam, ucb = calibrate_lambda(loss, alpha, delta)
    if lam is None:
        raise ConfigError(
            f"no lambda up to {LAMBDA_GRID[-1]:g} keeps the bound below risk.alpha={alpha} on "
            f"{loss.shape[0]} images (at {LAMBDA_GRID[-1]:g}: {ucb[-1]:.3g}); raise risk.alpha "
            f"or calibrate on more images"
        )
    j, one = grid_index(lam), grid_index(1.0)
    record = {
        "format": FORMAT,
        "lambda": lam,
        "alpha": float(alpha),
        "delta": float(delta),
        "bound": float(ucb[j]),
        "empirical_risk": float(loss[:, j].mean()),
        "interval_width": float(width[:, j].mean()),
        "miscoverage_uncalibrated": float(loss[:, one].mean()),
        "interval_width_uncalibrated": float(width[:, one].mean()),
        "interval": f"mean +/- lambda * (std + {SPREAD_FLOOR:.6g}) over the K samples, in [0, 1]",
        "images": int(loss.shape[0]),
        "pixels": int(pixels),
        "split": cfg.split,
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "seed": int(cfg.seed),
        "ckpt": str(cfg.ckpt),
        "ckpt_sha256": file_sha256(cfg.ckpt),
        "noise_ckpt": cfg.get("noise_ckpt"),
        "sampler": sampler_record(cfg, steps),
        "scale": model.scale,
        "seconds": seconds,
        "by_images": _subset_rows(loss, width, alpha, delta),
    }
    record["seal"] = _seal(record)
    (output_dir / "calibration.json").write_text(json.dumps(record, indent=2))
    log.info(
        "lambda %.2f: bound %.4f <= alpha %g (delta %g) on %d images; calibration miscoverage "
        "%.4f, width %.4f (lambda 1: %.4f, %.4f); %s",
        lam, record["bound"], alpha, delta, record["images"], record["empirical_risk"],
        record["interval_width"], record["miscoverage_uncalibrated"],
        record["interval_width_uncalibrated"], output_dir / "calibration.json",
    )  # fmt: skip
    return record


register_schemas()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="calibrate")
@report_errors
def main(cfg: DictConfig) -> None:
    calibrate(cfg)


if __name__ == "__main__":
    preflight(sys.argv[1:])
    main()
