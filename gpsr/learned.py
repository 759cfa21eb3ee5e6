"""Metrics with pretrained networks (docs/metrics.md): LPIPS with AlexNet or VGG-16
(Zhang et al., CVPR 2018), torchmetrics' implementation.

Their weights are torchvision's ImageNet backbones (plus LPIPS' linear layers, which
torchmetrics ships). Where the network is reachable the library downloads a missing backbone
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

__all__ = ["LEARNED", "weight_file", "build_learned"]

# metrics.learned name -> (torchmetrics' net_type, torchvision's weights enum name)
LEARNED = {"lpips_alex": ("alex", "AlexNet_Weights"), "lpips_vgg": ("vgg", "VGG16_Weights")}


def weight_file(name: str) -> Path:
    """Where torchvision keeps the backbone of metric `name`: the hub cache's checkpoints."""
    import torchvision

    weights = getattr(torchvision.models, LEARNED[name][1]).DEFAULT
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def build_learned(
    names: Sequence[str], device: torch.device
) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """name -> fn(sr, hr) -> (N,) per-image value, sr and hr (N, 3, H, W) in [0, 1]; one
    network per name, shared by every method. Unknown names and missing weights that
    cannot be downloaded are one-line ConfigErrors."""
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    unknown = [n for n in names if n not in LEARNED]
    if unknown:
        raise ConfigError(
            f"metrics.learned: unknown {', '.join(map(str, unknown))}; choose from "
            f"{', '.join(LEARNED)}"
        )
    fns = {}
    for name in names:
        try:
            metric = LearnedPerceptualImagePatchSimilarity(
                net_type=LEARNED[name][0], normalize=True
            )
        except (OSError, RuntimeError) as err:  # URLError is an OSError
            path = weight_file(name)
            reason = getattr(err, "reason", None) or type(err).__name__
            raise ConfigError(
                f"metrics.learned={name} needs {path.name} (torchvision's {LEARNED[name][1]} "
                f"ImageNet weights) in {path.parent}, and it could not be downloaded "
                f"({reason}): copy it there, or set TORCH_HOME to a folder whose "
                f"hub/checkpoints holds it"
            ) from None
        net = metric.net.to(device).eval()

        def fn(sr: torch.Tensor, hr: torch.Tensor, net=net) -> torch.Tensor:
            with torch.no_grad():
                return net(sr.float(), hr.float(), normalize=True).flatten().double()

        fns[name] = fn
    return fns
