"""The degradation flow: a learned bijection x <-> (coarse, latent) (docs/method.md §3, Algorithm 1).

`f` is one Haar level followed by `num_blocks` affine coupling blocks at half resolution.
Its coarse output is trained to equal `U_k(D_s(x))`, so `D_theta(x) = avgpool_k(coarse)` is a
learned degradation and `G(y, z) = f^-1(U_k(y), z)` a reflexive generalised inverse.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gpsr import ops
from gpsr.models.bf16 import BF16Copy
from gpsr.tiling import tiled_inverse
from gpsr.utils.errors import ConfigError
from gpsr.utils.parallel import split_batch

__all__ = [
    "DenseBlock",
    "CouplingBlock",
    "DegradationFlow",
    "block_position",
    "soft_clamp",
    "flow_loss_terms",
]


def soft_clamp(s: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """`(2/pi) * alpha * atan(s / alpha)`: any shape, values mapped into (-alpha, alpha)."""
    return (2.0 * alpha / math.pi) * torch.atan(s / alpha)


def block_position(
    h: int, w: int, k: int, offset: tuple[int, int] = (0, 0), like: torch.Tensor | None = None
) -> torch.Tensor:
    """Where each coarse pixel lies inside its LR pixel's k x k block: (1, 2, h, w), the row
    and the column index modulo k scaled to [-1, 1] (k = 2: -1 on even, +1 on odd rows and
    columns). `offset` (coarse pixels) is the position of pixel (0, 0) in the whole image, so
    a crop or a tile gets the whole image's values; `like` gives dtype and device. k >= 2
    (at k = 1 there is no position inside an LR pixel)."""
    if k < 2:
        raise ConfigError(f"block_position needs blocks of k >= 2 coarse pixels, got k={k}")
    dev = None if like is None else like.device
    dt = torch.float32 if like is None else like.dtype
    rows = (torch.arange(h, device=dev) + offset[0]) % k
    cols = (torch.arange(w, device=dev) + offset[1]) % k
    rows = (2.0 * rows / (k - 1) - 1.0).to(dt)[:, None].expand(h, w)
    cols = (2.0 * cols / (k - 1) - 1.0).to(dt)[None, :].expand(h, w)
    return torch.stack([rows, cols])[None]


class DenseBlock(nn.Module):
    """Dense convolutional subnet: (N, c_in, h, w) -> (N, c_out, h, w), unbounded output.

    `num_convs - 1` 3x3 convs of `growth` channels, each followed by LeakyReLU(0.2) and
    concatenated to its input, then a zero-initialised 3x3 output conv (so the coupling
    starts as the identity).
    """

    def __init__(self, c_in: int, c_out: int, num_convs: int, growth: int):
        super().__init__()
        if num_convs < 1:
            raise ConfigError(f"num_convs must be >= 1, got {num_convs}")
        self.hidden = nn.ModuleList(
            nn.Conv2d(c_in + i * growth, growth, 3, padding=1) for i in range(num_convs - 1)
        )
        self.out = nn.Conv2d(c_in + (num_convs - 1) * growth, c_out, 3, padding=1)
        self.act = nn.LeakyReLU(0.2)
        for conv in self.hidden:
            nn.init.xavier_normal_(conv.weight)
            nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = x
        for conv in self.hidden:
            feats = torch.cat([feats, self.act(conv(feats))], dim=1)
        return self.out(feats)


class CouplingBlock(nn.Module):
    """Two affine couplings between coarse c (N, C, h, w) and details d (N, 3C, h, w).

    Forward: d <- exp(sc(s1)) d + t1 with (s1, t1) = P(c); then c <- exp(sc(s2)) c + t2 with
    (s2, t2) = U(d). Log-det per sample: sum(sc(s1)) + sum(sc(s2)).
    """

    def __init__(
        self, channels: int, num_convs: int, growth: int, clamp: float = 2.0, extra: int = 0
    ):
        super().__init__()
        self.clamp = clamp
        # `extra` channels of position (`block_position`) are inputs of both subnets.
        self.predict = DenseBlock(channels + extra, 2 * 3 * channels, num_convs, growth)  # P
        self.update = DenseBlock(3 * channels + extra, 2 * channels, num_convs, growth)  # U

    def _scale_shift(
        self, net: nn.Module, x: torch.Tensor, pos: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Subnets may run in bf16 under autocast; the affine maps and log-det stay in float32
        # (or float64), so invertibility and consistency do not depend on the subnet precision.
        if pos is not None:
            x = torch.cat([x, pos.to(x.dtype).expand(x.shape[0], -1, -1, -1)], dim=1)
        out = net(x)
        out = out.to(torch.promote_types(out.dtype, torch.float32))
        s, t = out.chunk(2, dim=1)
        return soft_clamp(s, self.clamp), t

    def forward(
        self, c: torch.Tensor, d: torch.Tensor, pos: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s1, t1 = self._scale_shift(self.predict, c, pos)
        d = torch.exp(s1) * d + t1
        s2, t2 = self._scale_shift(self.update, d, pos)
        c = torch.exp(s2) * c + t2
        logdet = s1.flatten(1).sum(1) + s2.flatten(1).sum(1)
        return c, d, logdet

    def inverse(
        self, c: torch.Tensor, d: torch.Tensor, pos: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s2, t2 = self._scale_shift(self.update, d, pos)
        c = (c - t2) * torch.exp(-s2)
        s1, t1 = self._scale_shift(self.predict, c, pos)
        d = (d - t1) * torch.exp(-s1)
        return c, d


class DegradationFlow(nn.Module):
    """Generative pseudoinverse flow for `scale`-times super-resolution.

    Args:
        scale: SR factor s (even, >= 2); the coarse space is at half resolution, k = s / 2.
        channels: image channels C (3 for RGB).
        num_blocks, num_convs, growth: depth and width (paper: 16, 20, 24 -> 30,761,280 params).
        clamp: soft-clamp bound alpha of the log-scales.
        position: give every coupling subnet two more input channels, the position of each
            coarse pixel inside its LR pixel's block (`block_position`; nothing at scale 2,
            where an LR pixel is one coarse pixel). The coarse output must be constant on
            those blocks, and 3 x 3 convolutions alone can only find where they start from
            an image border: without this the flow learns the degradation near borders only
            (docs/method.md §8, docs/large_images.md). Not in the paper.
    """

    def __init__(
        self,
        scale: int = 8,
        channels: int = 3,
        num_blocks: int = 16,
        num_convs: int = 20,
        growth: int = 24,
        clamp: float = 2.0,
        position: bool = False,
    ):
        super().__init__()
        if scale < 2 or scale % 2:
            raise ConfigError(
                f"flow scale must be an even integer >= 2 (k = scale/2 nearest embedding), got {scale}"
            )
        self.scale = int(scale)
        self.k = self.scale // 2
        self.channels = channels
        self.num_blocks, self.num_convs = num_blocks, num_convs
        # At scale 2 an LR pixel is one coarse pixel: there is no position inside it, and
        # `position` adds nothing (so one setting serves every scale).
        self.position = bool(position) and self.k > 1
        extra = 2 if self.position else 0
        self.blocks = nn.ModuleList(
            CouplingBlock(channels, num_convs, growth, clamp, extra) for _ in range(num_blocks)
        )
        # Activation checkpointing per block (see `speed_up`).
        self.checkpointing = False
        # The inverse's images on separate CPU cores (`gpsr.utils.parallel.split_batch`):
        # set by `bf16_copy`, the sampler's CPU fast path.
        self.parallel_batch = False

    def speed_up(
        self, checkpointing: bool = False, channels_last: bool = False, compile: bool = False
    ) -> None:
        """In place, state-dict keys unchanged: `checkpointing` recomputes each block's
        activations in the backward pass instead of storing them (only the 4C-channel block
        inputs are kept); `channels_last` the NHWC layout for the convolutions; `compile`
        `torch.compile`s each subnet (`nn.Module.compile`)."""
        self.checkpointing = checkpointing
        if channels_last:
            self.to(memory_format=torch.channels_last)
        if compile:
            for block in self.blocks:
                block.predict.compile()
                block.update.compile()

    def bf16_copy(self, channels_last: bool = True) -> DegradationFlow:
        """A copy for sampling whose coupling subnets run in bfloat16 (`BF16Copy`; NHWC when
        `channels_last`) while the couplings' affine maps, the Haar transform and the
        position channels stay float32: the same split as bf16 autocast on a GPU. It
        differs from this flow by the subnets' bfloat16 rounding (on the demo model's test
        images, samples moved by 0.01 dB PSNR or less; docs/benchmarks.md). Its inverse
        decodes the images of a batch on separate CPU cores (`parallel_batch`,
        `gpsr.utils.parallel.split_batch`). Inference only."""
        fast = copy.deepcopy(self)
        fast.parallel_batch = True
        for block in fast.blocks:
            block.predict = BF16Copy(block.predict, channels_last)
            block.update = BF16Copy(block.update, channels_last)
        return fast.eval()

    @property
    def receptive_radius(self) -> int:
        """How far (in coarse pixels) an output of `forward` or `inverse` can depend on its
        input: each coupling runs two dense blocks of `num_convs` 3x3 convs in sequence."""
        return 2 * self.num_blocks * self.num_convs

    def _check_image(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ConfigError(
                f"DegradationFlow expects (N, {self.channels}, H, W) images, got {tuple(x.shape)}"
            )
        ops.check_divisible(x.shape[-2], x.shape[-1], self.scale)

    def _position(self, c: torch.Tensor, offset: tuple[int, int]) -> torch.Tensor | None:
        if not self.position:
            return None
        return block_position(c.shape[-2], c.shape[-1], self.k, offset, like=c)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, C, H, W) in [-1, 1], its LR grid starting at pixel (0, 0) -> coarse
        (N, C, H/2, W/2) ~ U_k(D_s(x)), latent (N, 3C, H/2, W/2) ~ N(0, I), logdet (N,) of
        the coupling blocks (the Haar log-det is a constant and left out)."""
        self._check_image(x)
        c, d = ops.haar2d(x)
        pos = self._position(c, (0, 0))
        logdet = x.new_zeros(x.shape[0])
        recompute = self.checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                c, d, ld = checkpoint(block, c, d, pos, use_reentrant=False)
            else:
                c, d, ld = block(c, d, pos)
            logdet = logdet + ld
        return c, d, logdet

    def inverse(
        self, coarse: torch.Tensor, latent: torch.Tensor, offset: tuple[int, int] = (0, 0)
    ) -> torch.Tensor:
        """coarse (N, C, h, w), latent (N, 3C, h, w) -> image (N, C, 2h, 2w), about [-1, 1].
        `offset`: where coarse pixel (0, 0) lies in the whole image (a tile's corner), used
        by a flow with `position`."""
        if coarse.dim() != 4 or latent.shape != (
            coarse.shape[0],
            3 * coarse.shape[1],
            *coarse.shape[2:],
        ):
            raise ConfigError(
                f"inverse: coarse {tuple(coarse.shape)} and latent {tuple(latent.shape)} must be "
                f"(N, C, h, w) and (N, 3C, h, w)"
            )
        if self.parallel_batch:  # one image (or one thread): split_batch calls it directly
            return split_batch(lambda c, z: self._inverse(c, z, offset), coarse, latent)
        return self._inverse(coarse, latent, offset)

    def _inverse(
        self, coarse: torch.Tensor, latent: torch.Tensor, offset: tuple[int, int]
    ) -> torch.Tensor:
        c, d = coarse, latent
        pos = self._position(c, offset)
        for block in reversed(self.blocks):
            c, d = block.inverse(c, d, pos)
        return ops.ihaar2d(c, d)

    def pseudoinverse(
        self,
        y: torch.Tensor,
        latent: torch.Tensor,
        tile: int | None = None,
        halo: int | None = None,
    ) -> torch.Tensor:
        """G(y, z): LR y (N, C, h, w) in [-1, 1] and latent (N, 3C, k*h, k*w) -> (N, C, s*h, s*w).

        `tile` (coarse pixels) decodes in tiles with a halo of `halo` coarse pixels (default
        the receptive radius, which makes it equal to the whole-image inverse; see
        `gpsr.tiling.tiled_inverse`), so memory is bounded by the tile.
        """
        coarse = ops.upsample_nearest(y, self.k)
        if tile is None:
            return self.inverse(coarse, latent)
        return tiled_inverse(
            self, coarse, latent, tile, self.receptive_radius if halo is None else halo
        )

    def degrade(self, x: torch.Tensor) -> torch.Tensor:
        """Learned degradation D_theta: (N, C, H, W) -> (N, C, H/s, W/s), average-pooled coarse."""
        return ops.downsample_average(self.forward(x)[0], self.k)

    def latent_shape(self, lr_height: int, lr_width: int) -> tuple[int, int, int]:
        """Shape (3C, k*h, k*w) of the latent for an LR input of size h x w."""
        return 3 * self.channels, self.k * lr_height, self.k * lr_width


def flow_loss_terms(
    flow: DegradationFlow, x: torch.Tensor, sigma: float
) -> dict[str, torch.Tensor]:
    """Algorithm 1's loss (docs/method.md §3) of dequantized images x (N, C, H, W) in [-1, 1]: scalars, batch means.

    loss = ||c - U_k(D_s(x))||^2 / (2 sigma^2) + ||z||^2 / 2 - logdet, sums over elements.
    Also returns the parts ("coarse", "latent", "logdet": the couplings' log-det) and the
    bits per dimension of the relaxed likelihood of x, with every constant included: the
    Gaussian normalisers, the Haar transform's log-det (`ops.haar_logdet`, -1 bit/dim) and
    the 8-bit bin width. The loss leaves the constants out (they have no gradient).
    """
    coarse, latent, logdet = flow(x)
    target = ops.upsample_nearest(ops.degrade(x, flow.scale), flow.k)
    dt = torch.promote_types(coarse.dtype, torch.float32)  # bf16 autocast: losses in fp32
    coarse_sq = ((coarse.to(dt) - target.to(dt)) ** 2).flatten(1).sum(1)
    latent_sq = (latent.to(dt) ** 2).flatten(1).sum(1)
    coarse_term = coarse_sq / (2 * sigma**2)
    latent_term = latent_sq / 2
    loss = coarse_term + latent_term - logdet
    dims_c, dims_z = coarse[0].numel(), latent[0].numel()
    dims = x[0].numel()
    # -log p(x): the Gaussian normalisers and the Haar log-det, then (below) the 8-bit bin
    # volume in [-1, 1] units.
    nll = (
        loss
        + 0.5 * dims_z * math.log(2 * math.pi)
        + 0.5 * dims_c * math.log(2 * math.pi * sigma**2)
        - ops.haar_logdet(x)
    )
    bpd = (nll / dims - math.log(ops.QUANT_STEP)) / math.log(2)
    return {
        "loss": loss.mean(),
        "coarse": coarse_term.mean(),
        "latent": latent_term.mean(),
        "logdet": logdet.mean(),
        "bpd": bpd.mean(),
    }
