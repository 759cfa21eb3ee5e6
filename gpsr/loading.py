"""From a gpsr checkpoint file to models, one way for everyone: the DDPM stage (its frozen
flow, `init_ckpt`), `GPSR.load` (inference, evaluation, sampling, the benchmark).

Every path reads the file with `weights_only=True` and a verified seal, checks its stage and
scale, upgrades older formats, and builds the models from the settings stored with them; a
mismatch is one `CheckpointError` naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpsr.diffusion import GaussianDiffusion
from gpsr.models.flow import DegradationFlow
from gpsr.models.unet import UNet
from gpsr.pipeline import LatentStats
from gpsr.utils.checkpoint import (
    CheckpointError,
    check_gpsr_checkpoint,
    load_checkpoint,
    upgrade_checkpoint,
)

__all__ = ["read_checkpoint", "sub_state", "build_flow", "build_latent_diffusion", "load_flow"]


def read_checkpoint(
    path: str | Path, stage: str | None = None, scale: int | None = None
) -> dict[str, Any]:
    """Load, verify, check (stage, scale) and upgrade a gpsr checkpoint: -> its dict."""
    data = load_checkpoint(path)
    check_gpsr_checkpoint(data, path, stage=stage, scale=scale)
    return upgrade_checkpoint(data, path)


def sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a state dict under `prefix`, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _load(module: nn.Module, state: dict[str, torch.Tensor], path: str | Path, what: str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint {path}: {what} weights do not match its settings ({err})"
        ) from err


def build_flow(data: dict[str, Any], path: str | Path) -> DegradationFlow:
    """The trained flow (eval mode) of a flow- or DDPM-stage checkpoint dict."""
    hp = data.get("hyper_parameters", {})
    flow = DegradationFlow(scale=int(hp["scale"]), **hp.get("flow", {}))
    _load(flow, sub_state(data["state_dict"], "flow."), path, "flow")
    return flow.eval()


def build_latent_diffusion(
    data: dict[str, Any], path: str | Path, ema: bool = True
) -> tuple[UNet, GaussianDiffusion, LatentStats]:
    """(UNet (EMA weights unless ema=False), diffusion, latent statistics) of a DDPM checkpoint."""
    hp = data.get("hyper_parameters", {})
    if "unet" not in hp:
        raise CheckpointError(f"checkpoint {path} has no UNet settings")
    state = data["state_dict"]
    unet = UNet(**hp["unet"])
    _load(unet, sub_state(state, "ema.module." if ema else "unet."), path, "UNet")
    stats = LatentStats(3 * int(hp.get("flow", {}).get("channels", 3)))
    _load(stats, sub_state(state, "stats."), path, "latent statistics")
    if not bool(stats.ready):
        raise CheckpointError(f"checkpoint {path}: latent statistics were never computed")
    return unet.eval(), GaussianDiffusion(**hp.get("diffusion", {})), stats


def load_flow(path: str | Path, scale: int | None = None) -> tuple[DegradationFlow, dict[str, Any]]:
    """The trained flow of a flow-stage checkpoint: -> (flow in eval mode, its hparams)."""
    data = read_checkpoint(path, stage="flow", scale=scale)
    return build_flow(data, path), data.get("hyper_parameters", {})
