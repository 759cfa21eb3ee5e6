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

from gpsr import ops, progress
from gpsr.diffusion import GaussianDiffusion, IndexNoise, diagnostic_timesteps
from gpsr.models.bf16 import BF16Copy
from gpsr.models.conditioning import CoarseConditioned
from gpsr.models.flow import DegradationFlow
from gpsr.models.noise import LRNoiseModel
from gpsr.models.stats import LatentStats
from gpsr.projection import project_consistent_box, project_noise_ball
from gpsr.tiling import TiledDenoiser, Tiling, tile_starts
from gpsr.utils.device import available_memory
from gpsr.utils.errors import ConfigError, NonFiniteOutputError, TooLargeError

__all__ = ["GPSR", "PRECISIONS", "cpu_has_bf16_matrix_units", "resolve_precision"]

PRECISIONS = ("auto", "fp32", "bf16")
# UNets at least this wide run bf16 in NHWC; narrower ones (the demo's 32 channels on 16 x 16
# tiles) gained nothing from NHWC on the CPU measured (docs/benchmarks.md), so stay NCHW.
CHANNELS_LAST_MIN_WIDTH = 64


def resolve_precision(precision: str, device: torch.device) -> str:
    """`sampler.precision` -> "fp32" or "bf16" for the sampler's networks (the UNet and the
    flow's coupling subnets) on `device`: "auto" is bf16 on
    a CPU with bfloat16 matrix units (`cpu_has_bf16_matrix_units`), fp32 elsewhere (GPUs,
    whose path is unchanged, and CPUs without them, where bf16 does not pay)."""
    if precision not in PRECISIONS:
        raise ConfigError(
            f"sampler.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
        )
    if precision != "auto":
        return precision
    return "bf16" if torch.device(device).type == "cpu" and cpu_has_bf16_matrix_units() else "fp32"


def cpu_has_bf16_matrix_units() -> bool:
    """Whether this CPU has bfloat16 matrix units (Intel AMX tiles), through which oneDNN runs
    bfloat16 convolutions and matrix products several times faster than float32."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check and check())


class GPSR(nn.Module):
    """A generative pseudoinverse: `super_resolve(lr)` gives consistent SR samples.

    Build with `GPSR.load(ckpt)` from a DDPM-stage checkpoint (the flow is inside it), or from
    a flow-stage checkpoint for flow-only sampling (`steps=0`); `noise_ckpt` adds the LR
    noise model of noise-aware sampling (`sigma_y`, docs/method.md §10). The DDPM stage holds
    one as a view of its own modules (`LatentDiffusionModule.model`, EMA weights). The
    modules are used as given (their train / eval mode is the caller's).
    """

    def __init__(
        self,
        flow: DegradationFlow,
        unet: nn.Module | None = None,
        diffusion: GaussianDiffusion | None = None,
        stats: LatentStats | None = None,
        noise: LRNoiseModel | None = None,
    ):
        super().__init__()
        self.flow = flow
        self.unet = unet
        self.diffusion = diffusion
        self.stats = stats
        self.noise = noise
        self._fast: dict[str, tuple[tuple, nn.Module]] = {}  # name -> (source key, bf16 copy)

    @classmethod
    def load(
        cls,
        ckpt: str | Path,
        device: str | torch.device = "cpu",
        ema: bool = True,
        noise_ckpt: str | Path | None = None,
    ) -> GPSR:
        """Load a gpsr checkpoint (weights_only=True, `gpsr.loading`), in eval mode.
        `ema=False` takes the raw UNet weights; `noise_ckpt` a `stage=noise` checkpoint of the
        same scale (the LR noise model, for `sigma_y`)."""
        from gpsr.loading import (
            build_flow,
            build_latent_diffusion,
            load_noise_model,
            read_checkpoint,
        )

        data = read_checkpoint(ckpt)
        if data["gpsr"]["stage"] == "noise":
            raise ConfigError(
                f"ckpt={ckpt} is the LR noise model (a stage=noise checkpoint): give it as "
                f"noise_ckpt=, and a DDPM- or flow-stage checkpoint as ckpt="
            )
        flow = build_flow(data, ckpt)
        noise = None if noise_ckpt is None else load_noise_model(noise_ckpt, flow.scale)
        if data["gpsr"]["stage"] == "flow":
            return cls(flow, noise=noise).to(device).eval()
        unet, diffusion, stats = build_latent_diffusion(data, ckpt, ema=ema)
        return cls(flow, unet, diffusion, stats, noise).to(device).eval()

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

    def resolve_precision(self, precision: str) -> str:
        """`resolve_precision` on this model's device."""
        return resolve_precision(precision, self.device)

    def sampling_unet(self, precision: str) -> nn.Module:
        """The UNet the sampler calls: this model's own for "fp32"; for "bf16" a `BF16Copy`
        (NHWC for UNets of at least 64 channels), made once and remade when the UNet's
        weights, device or identity change."""
        if precision == "fp32":
            return self.unet
        wide = getattr(self.unet, "model_channels", 0) >= CHANNELS_LAST_MIN_WIDTH
        return self._cached_copy("unet", lambda: BF16Copy(self.unet, channels_last=wide).eval())

    def sampling_flow(self, precision: str) -> DegradationFlow:
        """The flow whose inverse decodes the samples: this model's own for "fp32"; for
        "bf16" its `DegradationFlow.bf16_copy` (bfloat16 NHWC coupling subnets, float32
        couplings), made once and remade when the flow's weights, device or identity change."""
        if precision == "fp32":
            return self.flow
        return self._cached_copy("flow", lambda: self.flow.bf16_copy(channels_last=True))

    def _cached_copy(self, name: str, make) -> nn.Module:
        """`make()` once per state of the module `name` (its identity, device and weights:
        the parameters' data pointers and version counters, which in-place updates bump)."""
        params = list(getattr(self, name).parameters())
        key = (
            id(getattr(self, name)),
            params[0].device,
            params[0].data_ptr(),
            sum(p._version for p in params),
        )
        if self._fast.get(name, (None,))[0] != key:
            self._fast[name] = (key, make())
        return self._fast[name][1]

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
    def denoisers(
        self,
        coarse: torch.Tensor,
        tiling: Tiling,
        net: nn.Module | None = None,
        precision: str = "fp32",
    ) -> tuple[nn.Module, nn.Module]:
        """The UNet (or `net`, a faster copy of it: `sampling_unet`) conditioned on coarse
        (N, C, h, w), for every step but the last and for
        the last: on overlapping latent tiles (`tiling.overlap`, then `tiling.final_overlap`)
        when `tiling` asks for it and the latent is larger than one tile; otherwise whole (the
        same module twice), after checking once that its global attention fits in memory."""
        net = progress.Counted(self.unet if net is None else net)  # each call: one unit
        align, tile = self._unet_tiling(tiling)
        h, w = coarse.shape[-2:]
        if tile is None or (h <= tile and w <= tile):
            self._check_whole_latent(coarse.shape[0], h, w, coarse.device)
            whole = CoarseConditioned(net, coarse)
            return whole, whole
        steps, last = (
            CoarseConditioned(
                TiledDenoiser(
                    net,
                    tile,
                    tiling.unet_overlap(tile, final),
                    tiling.unet_batch(tile, precision),
                    align,
                ),
                coarse,
            )
            for final in (False, True)
        )
        return steps, last

    def _unet_tiling(self, tiling: Tiling) -> tuple[int, int | None]:
        """(align, tile) of the UNet's latent tiles: tiles start on the grid the UNet saw in
        training, whole LR pixels (k latent pixels) and whole pixels of its deepest level;
        tile None: no tiling."""
        align = math.lcm(self.flow.k, 2 ** (getattr(self.unet, "levels", 1) - 1))
        return align, tiling.unet_tile(self.unet, align)

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
        precision: str = "fp32",
    ) -> torch.Tensor:
        """GPSR sampling (Algorithm 3): y (N, C, h, w) in [-1, 1] -> x (N, C, s*h, s*w) in
        about [-1, 1], x = G(y, z) (`DegradationFlow.pseudoinverse`).

        `precision` ("fp32", "bf16" or "auto": `resolve_precision`) is that of the networks:
        the UNet (`sampling_unet`) and the flow's coupling subnets (`sampling_flow`); the
        DDIM updates, the latent statistics and the couplings' affine maps stay float32
        whatever it is.

        `steps` UNet evaluations in the normalised latent space give z; steps = 0 is
        flow-only sampling, z ~ N(0, I) straight into the flow (Remark 3). `noise_fn(shape)`
        draws the noise (e.g. `IndexNoise`). `tiling` (None: the whole image at once) runs
        the UNet on overlapping latent tiles (denser at the last evaluation) and the flow
        inverse on tiles with a halo (`gpsr.tiling`), so memory is bounded by the tile.
        """
        tiling = tiling or Tiling.whole()
        resolved = self.resolve_precision(precision)
        draw = noise_fn or (lambda s: torch.randn(s, device=y.device))
        shape = (y.shape[0], *self.flow.latent_shape(*y.shape[-2:]))
        if steps == 0:
            z = draw(shape).to(y.dtype)
        else:
            self._require_diffusion()
            coarse = ops.upsample_nearest(y, self.flow.k)
            net = self.sampling_unet(resolved)
            model, final_model = self.denoisers(coarse, tiling, net, resolved)
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
        x = self.sampling_flow(resolved).pseudoinverse(
            y, z, tiling.flow_tile, tiling.halo(self.flow)
        )
        progress.advance()  # the decode: one unit
        return x

    def work_units(
        self,
        lr_height: int,
        lr_width: int,
        steps: int,
        tiling: Tiling,
        images: int = 1,
        precision: str = "fp32",
    ) -> int:
        """Units of progress (`gpsr.progress`) of one sample of a batch of `images` LR images
        of this size: the UNet calls of `steps` steps (one per batch of `tiling.unet_batch` tiles
        on a latent larger than one tile, as `denoisers` tiles it; else one per step) and one
        flow decode. `precision`: the sampler's (it sets the automatic tile batch)."""
        if steps == 0 or self.unet is None:
            return 1
        _, h, w = self.flow.latent_shape(lr_height, lr_width)
        align, tile = self._unet_tiling(tiling)
        if tile is None or (h <= tile and w <= tile):
            return steps + 1
        th, tw = min(tile, h), min(tile, w)
        batch = tiling.unet_batch(tile, self.resolve_precision(precision))
        calls = 0
        for i in range(steps):
            overlap = tiling.unet_overlap(tile, final=i == steps - 1)
            rows, cols = tile_starts(h, th, overlap, align), tile_starts(w, tw, overlap, align)
            calls += -(-images * len(rows) * len(cols) // batch)
        return calls + 1

    # ------------------------------------------------------------------ noisy LR images
    @torch.no_grad()
    def noise_level(self, lr: torch.Tensor, sigma_y: float | str | torch.Tensor) -> torch.Tensor:
        """The noise level of each LR image, (N,) float32 in [0, 1] pixel units, from
        `sampler.sigma_y`: a number (the same for every image), a tensor (N,) or "auto" (the
        noise model's blind estimate, `LRNoiseModel.estimate`). lr: (N, C, h, w) in [0, 1].
        A level above 0 needs the noise model (`noise_ckpt`) and at most the largest level
        it was trained on; anything else is one ConfigError naming `sampler.sigma_y`."""
        n = lr.shape[0]
        if isinstance(sigma_y, str):
            if sigma_y != "auto":
                raise ConfigError(
                    f"sampler.sigma_y must be a noise std >= 0 in [0, 1] pixel units or "
                    f"'auto', got {sigma_y!r}"
                )
            self._require_noise_model("sampler.sigma_y=auto")
            return self.noise.estimate(lr.to(self.device, torch.float32)).float()
        if isinstance(sigma_y, bool) or not isinstance(sigma_y, (int, float, torch.Tensor)):
            raise ConfigError(f"sampler.sigma_y must be a number or 'auto', got {sigma_y!r}")
        sig = torch.as_tensor(sigma_y, dtype=torch.float32, device=self.device).flatten()
        sig = sig.expand(n).clone() if sig.numel() == 1 else sig
        if sig.shape != (n,) or not bool(torch.isfinite(sig).all()) or bool((sig < 0).any()):
            raise ConfigError(
                f"sampler.sigma_y must be a noise std >= 0 in [0, 1] pixel units (one number, "
                f"or one per image), got {sigma_y!r}"
            )
        if bool((sig > 0).any()):
            self._require_noise_model(f"sampler.sigma_y={float(sig.max()):g}")
            if float(sig.max()) > self.noise.sigma_max * (1 + 1e-6):  # float32 rounding
                raise ConfigError(
                    f"sampler.sigma_y={float(sig.max()):g} is above the noise levels the noise "
                    f"model was trained on (up to {self.noise.sigma_max:g}); train one with a "
                    f"larger model.noise.sigma_max"
                )
        return sig

    def check_sigma_y(self, sigma_y: float | str) -> None:
        """Refuse a `sampler.sigma_y` this model cannot use (`noise_level`'s rules) before
        any image is read."""
        self.noise_level(torch.zeros(1, self.flow.channels, 1, 1, device=self.device), sigma_y)

    def _require_noise_model(self, what: str) -> None:
        if self.noise is None:
            raise ConfigError(
                f"{what} needs the LR noise model: set noise_ckpt=<a stage=noise checkpoint> "
                f"(python -m gpsr.train stage=noise ...), or sampler.sigma_y=0 for clean images"
            )

    def measurement(self, lr: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The LR image the sampler conditions on: lr itself where sigma = 0 (the paper),
        else the noise model's posterior-mean estimate of the clean LR image (docs/method.md
        §10). lr (N, C, h, w) in [0, 1], sigma (N,) -> (N, C, h, w), about [0, 1]."""
        noisy = sigma > 0
        if not bool(noisy.any()):
            return lr
        self._require_noise_model("a noise level above 0")
        clean = self.noise.denoise(lr, sigma.to(lr))
        return torch.where(noisy[:, None, None, None], clean, lr)

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
        sigma_y: float | str | torch.Tensor = 0.0,
        precision: str = "fp32",
    ) -> torch.Tensor:
        """Super-resolve LR images of any size.

        lr: (N, C, h, w) float in [0, 1] (not rounded), on any device. Non-finite values, and
        values no image in [0, 1] degrades to (`gpsr.ops.degradation_range`, e.g. 0..255 or
        [-1, 1] pixels), are refused (`check_lr`).
        steps: UNet evaluations (7 in the paper; 0 = flow-only sampling).
        samples: K samples per image. project: project each sample onto the images consistent
        with lr inside [0, 1] (`GPSR.project`; with noise, onto those within the noise).
        sigma_y: the LR images' noise std in [0, 1] pixel units, a number, (N,) or "auto"
        (`noise_level`): above 0 the sample is made from the noise model's estimate of the
        clean LR image and agrees with lr within the noise, not exactly (docs/method.md
        §10); 0 (default) is the paper's sampler, unchanged.
        generator / seed + indices: randomness; `seed` with `indices` makes each image's
        samples independent of batching.
        spacing: timesteps visited, "linspace" (the paper) or "trailing".
        tiling: how large images are split (`gpsr.tiling.Tiling`); the default runs the UNet
        on overlapping tiles of its training size and the flow inverse on 256 x 256 coarse
        tiles with an exact halo, so memory is bounded by the tile; `Tiling.whole()` runs
        every image in one piece.
        precision: the networks' arithmetic (the UNet and the flow's coupling subnets),
        "fp32" (default: bit-identical to earlier releases), "bf16" or "auto" (bf16 on CPUs
        with bfloat16 matrix units; `resolve_precision`); the couplings' affine maps, the
        DDIM updates and the projection stay float32 / float64.
        Returns float in [0, 1]: (N, C, s*h, s*w) for samples=1, else (N, K, C, s*h, s*w). A
        sample that is not finite (damaged or diverged weights) is never returned: it raises
        `NonFiniteOutputError` naming the images.
        """
        if lr.dim() != 4 or lr.shape[1] != self.flow.channels:
            raise ConfigError(
                f"lr must be (N, {self.flow.channels}, h, w) in [0, 1], got {tuple(lr.shape)}"
            )
        if steps > 0 and self.unet is None:
            raise ConfigError("this checkpoint has no diffusion model (flow stage): use steps=0")
        self.resolve_precision(precision)  # a bad value is refused before any work
        multiple, minimum = self.lr_size_rule()
        h, w = lr.shape[-2:]
        if steps > 0 and (min(h, w) < minimum or h % multiple or w % multiple):
            raise ConfigError(
                f"LR images of {w}x{h}: this model needs sides of at least {minimum} that are "
                f"multiples of {multiple}"
            )
        lr = lr.to(self.device, torch.float32)
        self.check_lr(lr)
        sigma = self.noise_level(lr, sigma_y)
        y = ops.to_signed(self.measurement(lr, sigma))
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
                tiling=Tiling() if tiling is None else tiling, precision=precision,
            )  # fmt: skip
            bad = ~torch.isfinite(x).flatten(1).all(1)
            if bool(bad.any()):
                raise NonFiniteOutputError(
                    f"the model produced NaN or infinite values for image(s) "
                    f"{bad.nonzero().flatten().tolist()} of this batch (sample {k}): nothing is "
                    f"returned; the checkpoint's weights or latent statistics are damaged or "
                    f"diverged"
                )
            x = ops.to_unit(x).clamp(0, 1)
            outs.append(self.project(x, lr, sigma)[0] if project else x)
        return outs[0] if samples == 1 else torch.stack(outs, dim=1)

    def check_lr(self, lr: torch.Tensor) -> None:
        """Refuse, in one line saying what was found, LR images (N, C, h, w) with NaN or
        infinite values or values outside the range `D_s` gives images in [0, 1]
        (`gpsr.ops.degradation_range`, a little wider than [0, 1]: the bicubic kernel
        overshoots): pixels in 0..255 or [-1, 1] would otherwise give an all-white or washed
        out image without a word."""
        finite = torch.isfinite(lr)
        if not bool(finite.all()):
            raise ConfigError(
                f"lr holds {int((~finite).sum())} NaN or infinite value(s): pass finite images "
                f"in [0, 1]"
            )
        lo, hi = float(lr.min()), float(lr.max())
        low, high = ops.degradation_range(self.scale)
        if lo < low - 1e-4 or hi > high + 1e-4:
            raise ConfigError(
                f"lr holds values outside [0, 1] (min {lo:.4g}, max {hi:.4g}): pass images in "
                f"[0, 1] (no image in [0, 1] degrades at {self.scale}x to values "
                f"outside [{low:.3f}, {high:.3f}]; 8-bit pixels are divided by 255)"
            )

    def project(
        self, sr: torch.Tensor, lr: torch.Tensor, sigma: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The closest images to `sr` that degrade exactly to `lr` and stay in [0, 1]
        (`gpsr.projection.project_consistent_box`); with noise levels `sigma` (N,) of which
        any is above 0, the closest whose degradation lies within the noise of lr,
        `||D_s(x) - lr||^2 <= m sigma^2` (`gpsr.projection.project_noise_ball`).

        sr: (N, C, s*h, s*w) or (N, K, C, s*h, s*w) in [0, 1]; lr: (N, C, h, w) in [0, 1].
        Returns (projected, same shape as sr; Newton steps per image, (N,) or (N, K)).
        """
        if sr.dim() == 5:
            k = sr.shape[1]
            sig = None if sigma is None else sigma.repeat_interleave(k, 0)
            flat, steps = self.project(sr.flatten(0, 1), lr.repeat_interleave(k, 0), sig)
            return flat.reshape(sr.shape), steps.reshape(-1, k)
        if sigma is None or not bool((sigma > 0).any()):
            return project_consistent_box(sr, lr.to(sr), self.scale)
        return project_noise_ball(sr, lr.to(sr), self.scale, sigma.double().cpu())

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
