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
from gpsr.models.noise import LRNoiseModel
from gpsr.models.stats import LatentStats
from gpsr.models.unet import UNet
from gpsr.utils.checkpoint import CheckpointError, check_gpsr_checkpoint, load_checkpoint

__all__ = [
    "FORMAT_VERSION",
    "read_checkpoint",
    "upgrade_checkpoint",
    "ddpm_hyper_parameters",
    "sub_state",
    "build_flow",
    "build_latent_diffusion",
    "load_flow",
    "load_noise_model",
]

# 1: gpsr 0.1 (UNet attention qkv as (3, heads, d); ResBlock `out_norm`, `skip`).
# 2: improved-diffusion's layout and names (qkv as (heads, 3, d); `out_layers.0`,
#    `skip_connection`), identical to the paper authors' release.
FORMAT_VERSION = 2


def ddpm_hyper_parameters(
    scale: int,
    flow: dict[str, Any],
    unet: dict[str, Any],
    diffusion: dict[str, Any],
    **training: Any,
) -> dict[str, Any]:
    """What a DDPM-stage checkpoint stores as `hyper_parameters`, for the stage and for
    `gpsr.convert` alike: the settings that rebuild its models (`build_flow`,
    `build_latent_diffusion`) and the stage's training settings (`training`, keyword
    arguments of `LatentDiffusionModule`)."""
    return {
        "scale": int(scale),
        "flow": dict(flow),
        "unet": dict(unet),
        "diffusion": dict(diffusion),
        **training,
    }


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


def load_noise_model(path: str | Path, scale: int | None = None) -> LRNoiseModel:
    """The LR noise model (eval mode) of a `stage=noise` checkpoint trained at `scale`."""
    data = read_checkpoint(path, stage="noise", scale=scale)
    model = LRNoiseModel(**data.get("hyper_parameters", {}).get("noise", {}))
    _load(model, sub_state(data["state_dict"], "noise."), path, "noise model")
    return model.eval()


def _unet_v1_to_v2(state: dict[str, torch.Tensor], prefix: str, heads: int) -> dict:
    """Rename one UNet's ResBlock keys and regroup its attention qkv rows (format 1 -> 2)."""
    out = {}
    for key, value in state.items():
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            if rest.endswith(("qkv.weight", "qkv.bias")):
                value = _qkv_v1_to_v2(value, heads)
            rest = rest.replace(".out_layers.2.", ".out_layers.3.")
            rest = rest.replace(".out_norm.", ".out_layers.0.").replace(
                ".skip.", ".skip_connection."
            )
            key = prefix + rest
        out[key] = value
    return out


def _qkv_v1_to_v2(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows (3, heads, d) -> (heads, 3, d) of a qkv weight (3C, C, 1) or bias (3C,)."""
    rows = t.shape[0]
    return t.reshape(3, heads, rows // (3 * heads), *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def upgrade_checkpoint(ckpt: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Convert a checkpoint of an older format to `FORMAT_VERSION`, in place; return it.

    Format 1 DDPM checkpoints get their UNet and EMA weights, and the Adam moments of the
    qkv weights, regrouped (see the version notes above). A newer format than this gpsr
    knows is refused with one line.
    """
    meta = ckpt["gpsr"]
    version = int(meta.get("version", 1))
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format {version}, newer than this gpsr understands "
            f"({FORMAT_VERSION}): upgrade gpsr"
        )
    if version < 2 and meta.get("stage") == "ddpm":
        heads = int(ckpt.get("hyper_parameters", {}).get("unet", {}).get("num_heads", 4))
        state = ckpt["state_dict"]
        names = [k[len("unet.") :] for k in state if k.startswith("unet.")]
        for prefix in ("unet.", "ema.module."):
            state = _unet_v1_to_v2(state, prefix, heads)
        ckpt["state_dict"] = state
        # Adam's moments follow the UNet's parameters (the only trainable ones), in order.
        for opt in ckpt.get("optimizer_states", []):
            for idx, st in opt.get("state", {}).items():
                if int(idx) < len(names) and names[int(idx)].endswith(("qkv.weight", "qkv.bias")):
                    for k, v in st.items():
                        if isinstance(v, torch.Tensor) and v.dim() > 0:
                            st[k] = _qkv_v1_to_v2(v, heads)
    meta["version"] = FORMAT_VERSION
    return ckpt
