"""Inference for users: `from gpsr.inference import GPSR`, then
`GPSR.load(ckpt).super_resolve(lr, steps=7)` (LR in [0, 1]). The class lives in
`gpsr.models.gpsr`. Also the one way the entry points (`gpsr.evaluate`, `gpsr.calibrate`,
`gpsr.sample`) get their model and its sampler from a config."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from omegaconf import DictConfig

from gpsr.models.gpsr import GPSR
from gpsr.tiling import Tiling
from gpsr.utils.device import keep_freed_memory, pick_device, set_cpu_threads

__all__ = ["GPSR", "load_from_config", "sampled_method"]

log = logging.getLogger("gpsr")


def load_from_config(cfg: DictConfig) -> GPSR:
    """The model of an entry point's config: `ckpt` (with `noise_ckpt`, `ema`) on
    `device` (on a CPU: threads set from the usable cores, freed memory kept for reuse,
    `keep_freed_memory`), `sampler.sigma_y` checked against it;
    says once the precision the sampler's networks will run in (`sampler.precision`)."""
    device = pick_device(cfg.device)
    if device.type == "cpu":
        set_cpu_threads()
        keep_freed_memory()
    model = GPSR.load(cfg.ckpt, device=device, ema=cfg.ema, noise_ckpt=cfg.get("noise_ckpt"))
    model.check_sigma_y(cfg.sampler.get("sigma_y", 0.0))
    requested = cfg.sampler.get("precision", "fp32")
    log.info(
        "Sampling precision: %s (sampler.precision=%s%s)",
        model.resolve_precision(requested),
        requested,
        ": bf16 on CPUs with bfloat16 matrix units, else fp32" if requested == "auto" else "",
    )
    return model


def sampled_method(
    model: GPSR, cfg: DictConfig, steps: int, tiling: Tiling | None = None
) -> Callable[[torch.Tensor, list[int], torch.Tensor], torch.Tensor]:
    """fn(lr01 (N, C, h, w), indices, sigma (N,)) -> (N, C, H, W), or (N, K, C, H, W) for
    `sampler.samples` K > 1: `super_resolve` with the config's sampler (eta, spacing,
    tiling, precision) and seed, `steps` UNet evaluations (0: flow-only sampling), samples seeded per
    image index."""
    sampler = cfg.sampler
    tiling = Tiling.from_config(sampler) if tiling is None else tiling
    return lambda lr, idx, sig: model.super_resolve(
        lr,
        steps=steps,
        eta=sampler.eta,
        samples=sampler.samples,
        seed=cfg.seed,
        indices=idx,
        spacing=sampler.spacing,
        tiling=tiling,
        sigma_y=sig,
        precision=sampler.get("precision", "fp32"),
    )
