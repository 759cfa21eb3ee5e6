"""GPSR, the one composite model: the flow, the latent UNet, the diffusion and the latent
statistics, with the paper's sampling (Algorithm 3), the DDPM training loss (Algorithm 2)
and the diagnostic as its methods.

Images are float tensors; `*_signed` methods take the model's range [-1, 1],
`super_resolve` and `project` the user's [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from gpsr import ops
from gpsr.diffusion import GaussianDiffusion, IndexNoise, diagnostic_timesteps
from gpsr.models.conditioning import CoarseConditioned
from gpsr.models.flow import DegradationFlow
from gpsr.models.stats import LatentStats
from gpsr.projection import project_consistent_box
from gpsr.tiling import TiledDenoiser, Tiling
from gpsr.utils.device import available_memory
from gpsr.utils.errors import ConfigError, TooLargeError

__all__ = ["GPSR"]


class GPSR(nn.Module):
    """A generative pseudoinverse: `super_resolve(lr)` gives consistent SR samples.

    Build with `GPSR.load(ckpt)` from a DDPM-stage checkpoint (the flow is inside it), or from
    a flow-stage checkpoint for flow-only sampling (`steps=0`). The DDPM stage holds one as a
    view of its own modules (`LatentDiffusionModule.model`, EMA weights). The modules are
    used as given (their train / eval mode is the caller's).
    """

    def __init__(
        self,
        flow: DegradationFlow,
        unet: nn.Module | None = None,
        diffusion: GaussianDiffusion | None = None,
        stats: LatentStats | None = None,
    ):
        super().__init__()
        self.flow = flow
        self.unet = unet
        self.diffusion = diffusion
        self.stats = stats

    @classmethod
    def load(cls, ckpt: str | Path, device: str | torch.device = "cpu", ema: bool = True) -> GPSR:
        """Load a gpsr checkpoint (weights_only=True, `gpsr.loading`), in eval mode.
        `ema=False` takes the raw UNet weights."""
        from gpsr.loading import build_flow, build_latent_diffusion, read_checkpoint

        data = read_checkpoint(ckpt)
        flow = build_flow(data, ckpt)
        if data["gpsr"]["stage"] == "flow":
            return cls(flow).to(device).eval()
        unet, diffusion, stats = build_latent_diffusion(data, ckpt, ema=ema)
        return cls(flow, unet, diffusion, stats).to(device).eval()

    @property
    def scale(self) -> int:
        return self.flow.scale

    @property
    def device(self) -> torch.device:
        return next(self.flow.parameters()).device

    def lr_size_rule(self) -> tuple[int, int]:
        """(multiple, minimum) for LR sides: the latent (k x the LR side) must divide by the
        UNet's down-sampling, and its deepest level must keep at least 2 x 2 pixels."""
        if self.unet is None:
            return 1, 1
        div = 2 ** (self.unet.levels - 1)
        multiple = div // math.gcd(div, self.flow.k)
        return multiple, max(multiple, -(-2 * div // self.flow.k))

    def _require_diffusion(self) -> None:
        if self.unet is None or self.diffusion is None or self.stats is None:
            raise ConfigError(
                "sampling with steps > 0 needs a UNet, a diffusion and latent statistics"
            )

    # ------------------------------------------------------------------ Algorithm 2
    def training_loss(self, x: torch.Tensor, net: nn.Module | None = None) -> torch.Tensor:
        """The latent DDPM's training loss (Algorithm 2) on dequantised HR images x
        (N, C, H, W) in [-1, 1]: the frozen flow gives the coarse image and the latent, which
        is normalised and noised; `net` (default: this model's UNet) denoises it. -> ()."""
        with torch.no_grad():
            coarse, z, _ = self.flow(x)
            zhat = self.stats.normalise(z.float())
        net = self.unet if net is None else net
        return self.diffusion.training_loss(CoarseConditioned(net, coarse.float()), zhat)

    # ------------------------------------------------------------------ Algorithm 3
    def denoisers(self, coarse: torch.Tensor, tiling: Tiling) -> tuple[nn.Module, nn.Module]:
        """The UNet conditioned on coarse (N, C, h, w), for every step but the last and for
        the last: on overlapping latent tiles (`tiling.overlap`, then `tiling.final_overlap`)
        when `tiling` asks for it and the latent is larger than one tile; otherwise whole (the
        same module twice), after checking once that its global attention fits in memory."""
        # Tiles start on the grid the UNet saw in training: whole LR pixels (k latent
        # pixels) and whole pixels of its deepest level.
        align = math.lcm(self.flow.k, 2 ** (getattr(self.unet, "levels", 1) - 1))
        tile = tiling.unet_tile(self.unet, align)
        h, w = coarse.shape[-2:]
        if tile is None or (h <= tile and w <= tile):
            self._check_whole_latent(coarse.shape[0], h, w, coarse.device)
            whole = CoarseConditioned(self.unet, coarse)
            return whole, whole
        steps, last = (
            CoarseConditioned(
                TiledDenoiser(
                    self.unet, tile, tiling.unet_overlap(tile, final), tiling.batch, align
                ),
                coarse,
            )
            for final in (False, True)
        )
        return steps, last

    def _check_whole_latent(self, n: int, h: int, w: int, device: torch.device) -> None:
        """Refuse, in one line, a whole-latent UNet call whose global attention cannot fit
        (networks without `attention_bytes` are not checked)."""
        estimate = getattr(self.unet, "attention_bytes", None)
        if estimate is None:
            return
        need = estimate(h, w, n)
        free = available_memory(device)
        if free is not None and need > free:
            raise TooLargeError(
                f"a latent of {w}x{h} without tiling needs {need / 2**30:.1f} GiB "
                f"for the UNet's global attention ({free / 2**30:.1f} GiB available); set "
                f"sampler.tile=auto (tiles of the UNet's training size) or a tile side"
            )

    @torch.no_grad()
    def sample_signed(
        self,
        y: torch.Tensor,
        steps: int,
        eta: float = 1.0,
        noise_fn=None,
        spacing: str = "linspace",
        tiling: Tiling | None = None,
    ) -> torch.Tensor:
        """GPSR sampling (Algorithm 3): y (N, C, h, w) in [-1, 1] -> x (N, C, s*h, s*w) in
        about [-1, 1], x = G(y, z) (`DegradationFlow.pseudoinverse`).

        `steps` UNet evaluations in the normalised latent space give z; steps = 0 is
        flow-only sampling, z ~ N(0, I) straight into the flow (Remark 3). `noise_fn(shape)`
        draws the noise (e.g. `IndexNoise`). `tiling` (None: the whole image at once) runs
        the UNet on overlapping latent tiles (denser at the last evaluation) and the flow
        inverse on tiles with a halo (`gpsr.tiling`), so memory is bounded by the tile.
        """
        tiling = tiling or Tiling.whole()
        draw = noise_fn or (lambda s: torch.randn(s, device=y.device))
        shape = (y.shape[0], *self.flow.latent_shape(*y.shape[-2:]))
        if steps == 0:
            z = draw(shape).to(y.dtype)
        else:
            self._require_diffusion()
            coarse = ops.upsample_nearest(y, self.flow.k)
            model, final_model = self.denoisers(coarse, tiling)
            zhat = self.diffusion.sample(
                model,
                shape,
                steps=steps,
                eta=eta,
                clip=self.stats.bounds(),
                noise_fn=draw,
                spacing=spacing,
                final_model=final_model,
            )
            z = self.stats.denormalise(zhat.to(y.dtype))
        return self.flow.pseudoinverse(y, z, tiling.flow_tile, tiling.halo(self.flow))

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
        on overlapping tiles of its training size and the flow inverse on 256 x 256 coarse
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
            x = self.sample_signed(
                y, steps, eta=eta, noise_fn=noise, spacing=spacing,
                tiling=Tiling() if tiling is None else tiling,
            )  # fmt: skip
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

    # ------------------------------------------------------------------ diagnostic
    @torch.no_grad()
    def diagnostic(
        self, hr: torch.Tensor, indices: Sequence[int], seed: int, buckets: int = 10
    ) -> dict[str, torch.Tensor]:
        """The latent DDPM's error by noise level on clean images, as in training (Algorithm 2).

        hr (N, C, H, W) in [-1, 1]. The normalised latent of each image is noised at the
        middle timestep of each of `buckets` t-ranges with noise seeded by (seed, image
        index). Returns float64 sums over the batch: "loss" (K,) (the training target's MSE),
        "x0_mse" (K,) (error of the predicted clean latent), "mean_x0_mse" () (the x0 MSE of
        always predicting the latent mean, i.e. the latent's mean square) and "count" (). A
        network whose x0 MSE at some t exceeds the mean predictor's is worse than useless
        there: the sampler starts at the noisiest t and amplifies that error.
        """
        self._require_diffusion()
        coarse, z, _ = self.flow(hr)
        zhat = self.stats.normalise(z)
        ts = diagnostic_timesteps(self.diffusion.num_timesteps, buckets)
        noise = IndexNoise(indices, seed, hr.device)
        out = self.diffusion.loss_by_timestep(
            CoarseConditioned(self.unet, coarse), zhat, ts, noise_fn=noise
        )
        out["mean_x0_mse"] = zhat.double().pow(2).flatten(1).mean(1).sum()
        out["count"] = torch.tensor(float(hr.shape[0]), dtype=torch.float64, device=hr.device)
        return out
