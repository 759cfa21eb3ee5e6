"""The improved-diffusion UNet (Nichol & Dhariwal 2021) used as the latent noise predictor.

Knows nothing of diffusion: it maps (x, t) to an output of the same spatial size. Attention
goes through `F.scaled_dot_product_attention`. Module names and the attention's channel
layout are those of improved-diffusion (and of the paper authors' release), so their weights
load by name and compute the same function (`gpsr.convert`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from gpsr.utils.errors import ConfigError

__all__ = ["UNet", "timestep_embedding"]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding: t (N,) float timesteps -> (N, dim), values in [-1, 1]."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


# Feature maps with fewer pixels than this are group-normalised from a channels-first copy
# when they arrive channels-last (bf16 sampler on CPU): torch's channels-last CPU kernel was
# 4 to 30 times slower than copy + channels-first kernel below 32 x 32 pixels, and faster at
# 32 x 32 and above (docs/benchmarks.md).
NHWC_NORM_MIN_PIXELS = 1024


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) computed in at least float32 whatever the input dtype (safe under bf16
    autocast; float64 stays float64): x (N, C, H, W) -> the same shape and dtype.

    A bfloat16 input on CPU with float32 parameters (the bf16 sampler's UNet,
    `gpsr.models.bf16.BF16Copy`) takes torch's mixed-dtype kernel, which accumulates the
    statistics in float32 and returns bfloat16 without a float32 copy of the input; a
    channels-last one smaller than `NHWC_NORM_MIN_PIXELS` pixels is normalised channels-first
    (the same kernel on a contiguous copy) and returned channels-first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.dtype == torch.bfloat16
            and x.device.type == "cpu"
            and self.weight.dtype == torch.float32
        ):
            if x.shape[-2] * x.shape[-1] < NHWC_NORM_MIN_PIXELS:
                x = x.contiguous()
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x.to(torch.promote_types(x.dtype, torch.float32))).type(x.dtype)


def _norm(channels: int) -> nn.Module:
    return GroupNorm32(min(32, channels), channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """(N, c_in, h, w) + embedding (N, emb) -> (N, c_out, h, w).

    out_layers = [GroupNorm, SiLU, Dropout, zero-initialised conv]; the embedding is added
    before the norm, or with `scale_shift_norm` applied as `norm(h) * (1 + scale) + shift`.
    """

    def __init__(self, c_in: int, emb_dim: int, c_out: int, dropout: float, scale_shift_norm: bool):
        super().__init__()
        self.scale_shift_norm = scale_shift_norm
        self.in_layers = nn.Sequential(_norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_dim, 2 * c_out if scale_shift_norm else c_out)
        )
        self.out_layers = nn.Sequential(
            _norm(c_out),
            nn.SiLU(),
            nn.Dropout(dropout),
            _zero(nn.Conv2d(c_out, c_out, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        e = self.emb_layers(emb).type(h.dtype)[..., None, None]
        norm, rest = self.out_layers[0], self.out_layers[1:]
        if self.scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = norm(h) * (1 + scale) + shift
        else:
            h = norm(h + e)
        return self.skip_connection(x) + rest(h)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over spatial positions: (N, C, h, w) -> (N, C, h, w).

    The 3C qkv channels are grouped by head first, then (q, k, v) inside each head, each of
    d = C / heads channels: improved-diffusion's layout, `(heads, 3, d)`.
    """

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        if channels % num_heads:
            raise ConfigError(f"attention channels {channels} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x).reshape(n, c, h * w))
        qkv = rearrange(
            qkv, "n (heads three d) l -> three n heads l d", three=3, heads=self.num_heads
        )
        if qkv.dtype == torch.bfloat16:
            # Contiguous q, k, v take torch's fused (flash) CPU kernel, 3 to 8 times faster
            # than the strided views' fallback; float32 keeps the fallback's exact results.
            qkv = qkv.contiguous()
        q, k, v = qkv
        out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "n heads l d -> n (heads d) l")
        return x + self.proj_out(out).reshape(n, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = (
            nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Step(nn.ModuleList):
    """A sequence of layers; ResBlocks also receive the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNet(nn.Module):
    """Noise predictor eps_phi: x (N, in_channels, H, W), t (N,) -> (N, out_channels, H, W).

    H and W must be divisible by 2^(len(channel_mult) - 1). `attention_resolutions` are
    feature-map sizes relative to `image_size` (e.g. 16 and 8 for a 64 x 64 input).
    Paper config (base 96, mult 1,1,2,3,4, 4 res blocks, attention 16 and 8, 4 heads,
    in 12, out 9): 79,367,049 parameters.
    """

    def __init__(
        self,
        in_channels: int = 12,
        out_channels: int = 9,
        model_channels: int = 96,
        channel_mult: Sequence[int] = (1, 1, 2, 3, 4),
        num_res_blocks: int = 4,
        attention_resolutions: Sequence[int] = (16, 8),
        image_size: int = 64,
        num_heads: int = 4,
        dropout: float = 0.1,
        scale_shift_norm: bool = False,
        conv_resample: bool = True,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.model_channels = model_channels
        self.levels = len(channel_mult)
        self.image_size, self.num_heads = image_size, num_heads
        attn_ds = {image_size // r for r in attention_resolutions}
        # Down-sampling factors where attention runs (the middle block runs at the deepest).
        self.attention_factors = sorted(attn_ds | {2 ** (self.levels - 1)})
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

        def res(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(c_in, emb_dim, c_out, dropout, scale_shift_norm)

        self.input_blocks = nn.ModuleList(
            [_Step([nn.Conv2d(in_channels, model_channels, 3, padding=1)])]
        )
        skips, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attn_ds:
                    layers.append(AttentionBlock(ch, num_heads))
                self.input_blocks.append(_Step(layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(_Step([Downsample(ch, conv_resample)]))
                skips.append(ch)
                ds *= 2
        self.middle_block = _Step([res(ch, ch), AttentionBlock(ch, num_heads), res(ch, ch)])
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skips.pop(), mult * model_channels)]
                ch = mult * model_channels
                if ds in attn_ds:
                    layers.append(AttentionBlock(ch, num_heads))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(_Step(layers))
        self.out = nn.Sequential(
            _norm(ch), nn.SiLU(), _zero(nn.Conv2d(model_channels, out_channels, 3, padding=1))
        )

    def attention_bytes(self, height: int, width: int, batch: int = 1) -> int:
        """Bytes of the largest float32 attention matrix for inputs (batch, C, height, width):
        self-attention is global, so this grows with the square of the area."""
        tokens = max((height // f) * (width // f) for f in self.attention_factors)
        return 4 * batch * self.num_heads * tokens * tokens

    def speed_up(self, channels_last: bool = False, compile: bool = False) -> None:
        """In place, state-dict keys unchanged: the NHWC layout for the convolutions,
        `torch.compile` (`nn.Module.compile`)."""
        if channels_last:
            self.to(memory_format=torch.channels_last)
        if compile:
            self.compile()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        div = 2 ** (self.levels - 1)
        if x.shape[-1] % div or x.shape[-2] % div:
            raise ConfigError(f"UNet input {tuple(x.shape)}: H and W must be divisible by {div}")
        # The embedding takes the dtype of its own layers (float32 in a bf16 `BF16Copy`).
        emb = timestep_embedding(t, self.model_channels)
        emb = self.time_embed(emb.to(self.time_embed[0].weight.dtype))
        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
