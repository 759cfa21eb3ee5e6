"""One object for inference: a trained GPSR model (flow, EMA UNet, latent statistics)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from gpsr import ops
from gpsr.diffusion import GaussianDiffusion
from gpsr.loading import build_flow, build_latent_diffusion, read_checkpoint
from gpsr.models.flow import DegradationFlow
from gpsr.pipeline import IndexNoise, LatentStats, super_resolve_signed
from gpsr.projection import project_consistent_box
from gpsr.tiling import Tiling
from gpsr.utils.errors import ConfigError

__all__ = ["GPSR"]


class GPSR(nn.Module):
    """A trained generative pseudoinverse: `super_resolve(lr)` gives consistent SR samples.

    Build with `GPSR.load(ckpt)` from a DDPM-stage checkpoint (the flow is inside it), or from
    a flow-stage checkpoint for flow-only sampling (`steps=0`).
    """

    def __init__(
        self,
        flow: DegradationFlow,
        unet: nn.Module | None = None,
        diffusion: GaussianDiffusion | None = None,
        stats: LatentStats | None = None,
    ):
        super().__init__()
        self.flow = flow.eval()
        self.unet = unet.eval() if unet is not None else None
        self.diffusion = diffusion
        self.stats = stats

    @property
    def scale(self) -> int:
        return self.flow.scale

    def lr_size_rule(self) -> tuple[int, int]:
        """(multiple, minimum) for LR sides: the latent (k x the LR side) must divide by the
        UNet's down-sampling, and its deepest level must keep at least 2 x 2 pixels."""
        if self.unet is None:
            return 1, 1
        div = 2 ** (self.unet.levels - 1)
        multiple = div // math.gcd(div, self.flow.k)
        return multiple, max(multiple, -(-2 * div // self.flow.k))

    @property
    def device(self) -> torch.device:
        return next(self.flow.parameters()).device

    @classmethod
    def load(cls, ckpt: str | Path, device: str | torch.device = "cpu", ema: bool = True) -> GPSR:
        """Load a gpsr checkpoint (weights_only=True). `ema=False` takes the raw UNet weights."""
        data = read_checkpoint(ckpt)
        flow = build_flow(data, ckpt)
        if data["gpsr"]["stage"] == "flow":
            return cls(flow).to(device)
        unet, diffusion, stats = build_latent_diffusion(data, ckpt, ema=ema)
        return cls(flow, unet, diffusion, stats).to(device)

    @torch.no_grad()
    def super_resolve(
        self,
        lr: torch.Tensor,
        steps: int = 7,
        eta: float = 1.0,
        samples: int = 1,
        project: bool = False,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        indices: list[int] | None = None,
        spacing: str = "linspace",
        tiling: Tiling | None = None,
    ) -> torch.Tensor:
        """Super-resolve LR images of any size.

        lr: (N, C, h, w) float in [0, 1] (not rounded), on any device.
        steps: UNet evaluations (7 in the paper; 0 = flow-only sampling).
        samples: K samples per image. project: project each sample onto the images consistent
        with lr inside [0, 1] (`GPSR.project`).
        generator / seed + indices: randomness; `seed` with `indices` makes each image's
        samples independent of batching.
        spacing: timesteps visited, "linspace" (the paper) or "trailing".
        tiling: how large images are split (`gpsr.tiling.Tiling`); the default runs the UNet
        on overlapping tiles of its training size and the flow inverse on 128 x 128 coarse
        tiles with an exact halo, so memory is bounded by the tile; `Tiling.whole()` runs
        every image in one piece.
        Returns float in [0, 1]: (N, C, s*h, s*w) for samples=1, else (N, K, C, s*h, s*w).
        """
        if lr.dim() != 4 or lr.shape[1] != self.flow.channels:
            raise ConfigError(
                f"lr must be (N, {self.flow.channels}, h, w) in [0, 1], got {tuple(lr.shape)}"
            )
        if steps > 0 and self.unet is None:
            raise ConfigError("this checkpoint has no diffusion model (flow stage): use steps=0")
        multiple, minimum = self.lr_size_rule()
        h, w = lr.shape[-2:]
        if steps > 0 and (min(h, w) < minimum or h % multiple or w % multiple):
            raise ConfigError(
                f"LR images of {w}x{h}: this model needs sides of at least {minimum} that are "
                f"multiples of {multiple}"
            )
        lr = lr.to(self.device, torch.float32)
        y = ops.to_signed(lr)
        outs = []
        for k in range(samples):
            if seed is not None:
                ids = indices if indices is not None else list(range(lr.shape[0]))
                noise = IndexNoise(ids, seed + k, self.device)
            elif generator is not None:

                def noise(shape, _g=generator):
                    return torch.randn(shape, generator=_g, device=_g.device).to(self.device)

            else:
                noise = None
            x = super_resolve_signed(
                self.flow,
                y,
                steps,
                self.unet,
                self.diffusion,
                self.stats,
                eta=eta,
                noise_fn=noise,
                spacing=spacing,
                tiling=Tiling() if tiling is None else tiling,
            )
            x = ops.to_unit(x).clamp(0, 1)
            outs.append(self.project(x, lr)[0] if project else x)
        return outs[0] if samples == 1 else torch.stack(outs, dim=1)

    def project(self, sr: torch.Tensor, lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The closest images to `sr` that degrade exactly to `lr` and stay in [0, 1]
        (`gpsr.projection.project_consistent_box`).

        sr: (N, C, s*h, s*w) or (N, K, C, s*h, s*w) in [0, 1]; lr: (N, C, h, w) in [0, 1].
        Returns (projected, same shape as sr; Newton steps per image, (N,) or (N, K)).
        """
        if sr.dim() == 5:
            k = sr.shape[1]
            flat, steps = self.project(sr.flatten(0, 1), lr.repeat_interleave(k, 0))
            return flat.reshape(sr.shape), steps.reshape(-1, k)
        return project_consistent_box(sr, lr.to(sr), self.scale)
