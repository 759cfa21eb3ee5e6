"""Metrics with pretrained networks (docs/metrics.md): LPIPS with AlexNet or VGG-16
(Zhang et al., CVPR 2018), DISTS on VGG-16 (Ding et al., TPAMI 2022), and FID / KID on Inception-v3 pool features (the torch-fidelity
convention of SR3 / IDM tables), torchmetrics' implementations.

Their weights are torchvision's ImageNet backbones (plus LPIPS' linear layers, which
torchmetrics ships, as it ships DISTS' alpha / beta). Where the network is reachable the library downloads a missing backbone
into the torch hub cache as it always does; where it is not (most compute nodes), the file
must already be in `$TORCH_HOME/hub/checkpoints/` (default `~/.cache/torch`), and a missing
one is refused in one line, naming the file and the folder, before any sampling starts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from gpsr.utils.errors import ConfigError

__all__ = [
    "LEARNED",
    "SET_METRICS",
    "INCEPTION_FILE",
    "weight_file",
    "build_learned",
    "build_set_metrics",
    "build_all",
]

# metrics.learned name -> (network, torchvision's weights enum name of its backbone)
LEARNED = {
    "lpips_alex": ("alex", "AlexNet_Weights"),
    "lpips_vgg": ("vgg", "VGG16_Weights"),
    "dists": ("dists", "VGG16_Weights"),
}


SET_METRICS = ("fid", "kid")
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's file name


def weight_file(name: str) -> Path:
    """Where the library keeps the network of metric `name`: the hub cache's checkpoints."""
    import torchvision

    if name in SET_METRICS:
        return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    weights = getattr(torchvision.models, LEARNED[name][1]).DEFAULT
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def build_learned(
    names: Sequence[str], device: torch.device
) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """name -> fn(sr, hr) -> (N,) per-image value, sr and hr (N, 3, H, W) in [0, 1]; one
    network per name, shared by every method. Unknown names and missing weights that
    cannot be downloaded are one-line ConfigErrors."""
    unknown = [n for n in names if n not in LEARNED and n not in SET_METRICS]
    if unknown:
        raise ConfigError(
            f"metrics.learned: unknown {', '.join(map(str, unknown))}; choose from "
            f"{', '.join([*LEARNED, *SET_METRICS])}"
        )
    fns = {}
    for name in [n for n in names if n in LEARNED]:
        try:
            fns[name] = _network_metric(LEARNED[name][0], device)
        except (OSError, RuntimeError) as err:  # URLError is an OSError
            raise _refuse(name, err) from None
    return fns


def _network_metric(
    kind: str, device: torch.device
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """torchmetrics' network for LPIPS (`alex`, `vgg`) or DISTS, as fn(sr, hr) -> (N,)
    float64, sr and hr (N, 3, H, W) in [0, 1] (each network normalises them itself)."""
    if kind == "dists":
        from torchmetrics.functional.image.dists import DISTSNetwork

        net = DISTSNetwork().to(device).eval()

        def fn(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return net(sr.float(), hr.float()).reshape(-1).double()

        return fn
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    lpips_net = LearnedPerceptualImagePatchSimilarity(net_type=kind, normalize=True).net
    lpips_net = lpips_net.to(device).eval()

    def lpips_fn(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return lpips_net(sr.float(), hr.float(), normalize=True).flatten().double()

    return lpips_fn


def _refuse(name: str, err: Exception) -> ConfigError:
    path = weight_file(name)
    what = (
        "the Inception-v3 FID weights of torch-fidelity"
        if name in SET_METRICS
        else (f"torchvision's {LEARNED[name][1]} ImageNet weights")
    )
    reason = getattr(err, "reason", None) or type(err).__name__
    return ConfigError(
        f"metrics.learned={name} needs {path.name} ({what}) in {path.parent}, and it could not "
        f"be downloaded ({reason}): copy it there, or set TORCH_HOME to a folder whose "
        f"hub/checkpoints holds it"
    )


def _inception(feature: int) -> torch.nn.Module:
    """torchmetrics' Inception-v3 feature extractor (torch-fidelity's network), weights from
    the hub cache (checked to load with weights_only=True first: torch-fidelity itself
    loads the file without that guard) or downloaded there by torch-fidelity."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    path = weight_file("fid")
    if path.is_file():
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ConfigError(
                f"{path} is not a plain weights file (refused by torch.load(weights_only=True): "
                f"{type(err).__name__}); replace it with torch-fidelity's {INCEPTION_FILE}"
            ) from None
    try:
        return NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=[str(feature)],
            feature_extractor_weights_path=str(path) if path.is_file() else None,
        )
    except (OSError, RuntimeError) as err:
        raise _refuse("fid", err) from None


def build_set_metrics(names: Sequence[str], feature: int = 2048) -> dict[str, object]:
    """name -> a factory of fresh torchmetrics FID / KID objects (inputs (N, 3, H, W) uint8,
    HR as real, SR as fake: `SRMetrics` rounds its [0, 1] images), all sharing one
    Inception-v3 network; refused in one
    line, before any sampling, when its weights are missing and cannot be downloaded."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    wanted = [n for n in names if n in SET_METRICS]
    if not wanted:
        return {}
    net = _inception(feature)
    factories = {
        "fid": lambda: FrechetInceptionDistance(feature=net),
        "kid": lambda: KernelInceptionDistance(feature=net, subset_size=1000),
    }
    return {n: factories[n] for n in wanted}


def build_all(names: str | Sequence[str] | None, device: torch.device) -> tuple[dict, dict]:
    """`metrics.learned` (one name or a list) -> (per-image functions, set-metric factories):
    what `SRMetrics(learned=..., sets=...)` takes, for `gpsr.evaluate` and the validation
    callback alike."""
    names = [names] if isinstance(names, str) else list(names or [])
    return build_learned(names, device), build_set_metrics(names)
