"""Import the paper authors' published model into gpsr.

    python -m gpsr.convert release=<file.pt> out=<file.ckpt> [ema=true] [config=<json>]

A Hydra app like the other entry points (conf/convert.yaml; `hydra.run.dir=` and the other
`key=value` overrides work the same way).

The authors' release saves, with `torch.save`, a dict holding `model_state_dict` (its
`SuperResolver`: the flow under `flow.transform.`, the UNet under `dpm.unet.`, the noise
schedule as `dpm.*` buffers, the latent statistics as `flow.transform.details_*` buffers),
optionally `ema_state_dict` (a `torch.optim.swa_utils.AveragedModel` of it: keys prefixed
`module.`, plus `n_averaged`), `optimizer_state_dict` and `scheduler_state_dict`. Its model
settings are a JSON file (`configs/ffhq128_8x.json` in the release); without `config=` the
paper's FFHQ-128 8x settings are assumed.

The result is a gpsr DDPM-stage checkpoint (flow, UNet, EMA UNet, latent statistics exactly
as the release computed them: per-channel mean, unbiased variance, global min / max) that
`GPSR.load`, `gpsr.evaluate`, `gpsr.sample` and `gpsr.train stage=ddpm init_ckpt=...` accept.
The file is read with `weights_only=True`; every key is mapped, none is left over, every
shape is checked, and anything else is refused with one line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from gpsr.diffusion import GaussianDiffusion
from gpsr.loading import FORMAT_VERSION, ddpm_hyper_parameters, sub_state
from gpsr.models.flow import DegradationFlow
from gpsr.models.unet import UNet
from gpsr.utils.checkpoint import CheckpointError, atomic_save, checkpoint_digest
from gpsr.utils.cli import CONFIG_DIR, check_output_dir, preflight, report_errors
from gpsr.utils.errors import ConfigError

log = logging.getLogger("gpsr.convert")

__all__ = ["PAPER_RELEASE_CONFIG", "gpsr_settings", "convert_release", "convert", "main"]

# The release's configs/ffhq128_8x.json (model settings only).
PAPER_RELEASE_CONFIG: dict[str, Any] = {
    "num_channels": 3,
    "scale": 8,
    "flow": {"transform": {"num_inv": 16, "num_convs": 20, "growth_rate": 24}},
    "dpm": {
        "ema_decay": 0.9999,
        "diffuser": {
            "T": 1000,
            "linear": True,
            "unet": {
                "base_channels": 96,
                "num_res_attn_blocks": 4,
                "channel_mults": [1, 2, 3, 4],
                "is_attn": [False, False, True, True, False],
                "num_heads": 4,
                "dropout": 0.1,
                "use_scale_shift_norm": False,
            },
        },
    },
}

# Noise-schedule buffers of the release's `Diffuser`: recomputed by gpsr, checked, not copied.
_SCHEDULE_BUFFERS = (
    "betas",
    "sqrt_betas",
    "alphas",
    "alphas_cumprod",
    "one_minus_alphas_cumprod",
    "sqrt_alphas",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "T",
)
_STATS = ("details_mean", "details_var", "details_min", "details_max")
_FLOW_KEY = re.compile(r"blocks\.(\d+)\.([pu])\.(?:blocks\.(\d+)|conv_out)\.(weight|bias)")


def gpsr_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The release's model settings -> gpsr's: {"scale", "flow", "unet", "diffusion", "ema_decay"}."""
    try:
        c = int(config["num_channels"])
        tr = config["flow"]["transform"]
        diffuser = config["dpm"]["diffuser"]
        u = diffuser["unet"]
        image_size = 64  # attention is placed by downsampling factor; only the ratio matters
        return {
            "scale": int(config["scale"]),
            "flow": {
                "num_blocks": int(tr["num_inv"]),
                "num_convs": int(tr["num_convs"]),
                "growth": int(tr["growth_rate"]),
                "clamp": 2.0,
                "channels": c,
            },
            "unet": {
                "in_channels": 4 * c,
                "out_channels": 3 * c,
                "model_channels": int(u["base_channels"]),
                "channel_mult": [1, *[int(m) for m in u["channel_mults"]]],
                "num_res_blocks": int(u["num_res_attn_blocks"]),
                "attention_resolutions": [
                    image_size // 2**i for i, on in enumerate(u["is_attn"]) if on
                ],
                "image_size": image_size,
                "num_heads": int(u["num_heads"]),
                "dropout": float(u["dropout"]),
                "scale_shift_norm": bool(u["use_scale_shift_norm"]),
                "conv_resample": True,
            },
            "diffusion": {
                "num_timesteps": int(diffuser["T"]),
                "schedule": "linear" if diffuser["linear"] else "cosine",
                "time_scale": 1000.0,
                "prediction": "eps",
                "loss_weighting": "none",
                "min_snr_gamma": 5.0,
            },
            "ema_decay": float(config["dpm"].get("ema_decay", 0.9999)),
        }
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"release config: missing or bad setting {err}") from None


def _flow_key(release_key: str) -> str | None:
    """`blocks.i.p.blocks.j.weight` (release) -> `blocks.i.predict.hidden.j.weight` (gpsr)."""
    m = _FLOW_KEY.fullmatch(release_key)
    if m is None:
        return None
    block, net, conv, kind = m.groups()
    layer = f"hidden.{conv}" if conv is not None else "out"
    return f"blocks.{block}.{'predict' if net == 'p' else 'update'}.{layer}.{kind}"


def _load_into(
    module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, what: str
) -> dict[str, torch.Tensor]:
    """Check that `state` has exactly `module`'s keys and shapes; return it as float32."""
    want = module.state_dict()
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    if missing or extra:
        raise CheckpointError(
            f"{path}: the {what} does not match the model settings (missing {missing[:3]}, "
            f"unexpected {extra[:3]}); pass the release's config=<json> if it is not the "
            f"paper's FFHQ-128 8x model"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(want[key].shape):
            raise CheckpointError(
                f"{path}: {what} weight {key} has shape {tuple(value.shape)}, the model settings "
                f"need {tuple(want[key].shape)}; pass the release's config=<json> if it is not "
                f"the paper's FFHQ-128 8x model"
            )
    return {k: v.detach().to(torch.float32).clone() for k, v in state.items()}


def convert_release(
    release: dict[str, Any],
    path: str | Path,
    ema: bool = True,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A loaded release checkpoint -> a gpsr DDPM-stage checkpoint dict (sealed, format 2)."""
    path = Path(path)
    model = release.get("model_state_dict") if isinstance(release, dict) else None
    if not isinstance(model, dict):
        raise CheckpointError(
            f"{path} is not a checkpoint of the authors' release (no model_state_dict)"
        )
    if not any(k.startswith("dpm.unet.") for k in model):
        if any(k.startswith("transform.") for k in model):
            raise CheckpointError(
                f"{path} is a flow-only release checkpoint (train_flow.py); gpsr.convert needs "
                f"a diffusion checkpoint (train_dpm.py), which holds the flow, the UNet and "
                f"the latent statistics"
            )
        raise CheckpointError(f"{path} is not a checkpoint of the authors' release (no UNet)")
    settings = gpsr_settings(config or PAPER_RELEASE_CONFIG)

    # Every key must be accounted for: flow weights, statistics, UNet, schedule buffers.
    known = ("flow.transform.", "dpm.unet.")
    schedule = {f"dpm.{b}" for b in _SCHEDULE_BUFFERS}
    leftover = [k for k in model if not k.startswith(known) and k not in schedule]
    if leftover:
        raise CheckpointError(f"{path}: unexpected release weights {sorted(leftover)[:3]}")
    absent = sorted(schedule - set(model))
    if absent:
        raise CheckpointError(
            f"{path} is not a complete diffusion checkpoint of the authors' release: its noise "
            f"schedule buffers {absent[:3]} are missing"
        )

    transform = sub_state(model, "flow.transform.")
    stats_raw = {k: transform.pop(k, None) for k in _STATS}
    if any(v is None for v in stats_raw.values()):
        raise CheckpointError(f"{path}: the flow's latent statistics (details_*) are missing")
    if not torch.isfinite(stats_raw["details_min"]).all():
        raise CheckpointError(f"{path}: the latent statistics were never computed")
    flow_state = {}
    for key, value in transform.items():
        mapped = _flow_key(key)
        if mapped is None:
            raise CheckpointError(f"{path}: unexpected flow weight flow.transform.{key}")
        flow_state[mapped] = value
    flow = DegradationFlow(scale=settings["scale"], **settings["flow"])
    flow_state = _load_into(flow, flow_state, path, "flow")

    unet = UNet(**settings["unet"])
    raw_unet = _load_into(unet, sub_state(model, "dpm.unet."), path, "UNet")
    if ema:
        averaged = release.get("ema_state_dict")
        if not isinstance(averaged, dict) or not any(
            k.startswith("module.dpm.unet.") for k in averaged
        ):
            raise CheckpointError(f"{path} holds no EMA weights (ema_state_dict): use ema=false")
        ema_unet = _load_into(unet, sub_state(averaged, "module.dpm.unet."), path, "EMA UNet")
        n_averaged = averaged.get("n_averaged", torch.tensor(1))
    else:
        ema_unet, n_averaged = raw_unet, torch.tensor(1)

    diffusion = GaussianDiffusion(**settings["diffusion"])
    theirs = model["dpm.alphas_cumprod"].double()
    ours = diffusion.alphas_cumprod
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-5, atol=1e-7):
        raise CheckpointError(
            f"{path}: its noise schedule differs from the configured "
            f"{settings['diffusion']['schedule']} schedule with T="
            f"{settings['diffusion']['num_timesteps']}"
        )

    c3 = 3 * settings["flow"]["channels"]
    mean, var = stats_raw["details_mean"], stats_raw["details_var"]
    if mean.numel() != c3 or var.numel() != c3:
        raise CheckpointError(f"{path}: latent statistics have {mean.numel()} channels, not {c3}")
    state: dict[str, torch.Tensor] = {}
    state.update({f"flow.{k}": v for k, v in flow_state.items()})
    state.update({f"unet.{k}": v for k, v in raw_unet.items()})
    state.update({f"ema.module.{k}": v for k, v in ema_unet.items()})
    state["ema.n_averaged"] = torch.as_tensor(n_averaged).long().reshape(())
    state["stats.mean"] = mean.reshape(-1).float().clone()
    state["stats.var"] = var.reshape(-1).float().clone()
    state["stats.zmin"] = stats_raw["details_min"].min().float().reshape(())
    state["stats.zmax"] = stats_raw["details_max"].max().float().reshape(())
    state["stats.ready"] = torch.tensor(True)
    hyper = ddpm_hyper_parameters(
        settings["scale"],
        settings["flow"],
        settings["unet"],
        settings["diffusion"],
        flow_ckpt=None,
        ema_decay=settings["ema_decay"],
        ema_warmup=False,
    )
    ckpt = {
        "state_dict": state,
        "hyper_parameters": hyper,
        "gpsr": {
            "stage": "ddpm",
            "scale": settings["scale"],
            "version": FORMAT_VERSION,
            "source": f"authors' release {path.name} ({'EMA' if ema else 'raw'} UNet weights)",
        },
    }
    ckpt["gpsr"]["sha256"] = checkpoint_digest(ckpt)
    return ckpt


def convert(cfg: DictConfig) -> Path:
    """`gpsr.convert`'s work: read `cfg.release` safely, convert it, write `cfg.out`
    atomically; a `GPSRError` (one line) for anything it cannot use. -> the written path."""
    config = None
    if cfg.config is not None:
        try:
            config = json.loads(Path(cfg.config).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"config={cfg.config}: cannot read it as JSON ({err})") from None
    settings = gpsr_settings(config or PAPER_RELEASE_CONFIG)
    if cfg.scale is not None and int(cfg.scale) != settings["scale"]:
        raise ConfigError(
            f"scale={cfg.scale} but the release model is {settings['scale']}x "
            f"(the paper's model is FFHQ-128 8x; pass its config=<json> for another)"
        )
    if not isinstance(cfg.ema, bool):
        raise ConfigError(f"ema must be true or false, got {cfg.ema!r}")
    src, out = Path(cfg.release), Path(cfg.out)
    if not src.is_file():
        raise ConfigError(f"release={src} does not exist")
    if out.exists():
        raise ConfigError(f"out={out} already exists; choose another name or remove it")
    check_output_dir(out.parent, setting="out=")  # before the release is read and converted
    try:
        release = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets one line
        with open(src, "rb") as fh:
            magic = fh.read(2)
        if magic == b"PK" and not zipfile.is_zipfile(src):
            raise CheckpointError(
                f"{src} is a damaged or truncated zip archive (torch's checkpoint format): "
                f"copy or download the release's .pt file again"
            ) from None
        if not zipfile.is_zipfile(src) and magic[:1] != b"\x80":
            raise CheckpointError(
                f"{src} is not a torch checkpoint (neither a zip archive nor a pickle); "
                f"release= takes the .pt file of the authors' release"
            ) from None
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(
            f"{src} cannot be read safely as a torch checkpoint (weights_only=True): {first}"
        ) from None
    ckpt = convert_release(release, src, ema=cfg.ema, config=config)
    atomic_save(ckpt, out)
    n = sum(v.numel() for k, v in ckpt["state_dict"].items() if k.startswith(("flow.", "unet.")))
    log.info(
        "wrote %s: %s (%s parameters, scale %d)",
        out,
        ckpt["gpsr"]["source"],
        f"{n:,}",
        settings["scale"],
    )
    return out


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="convert")
@report_errors
def main(cfg: DictConfig) -> None:
    convert(cfg)


if __name__ == "__main__":
    preflight(sys.argv[1:])
    main()
