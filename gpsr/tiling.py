"""Inference on images of any size with memory bounded by a tile, not by the image.

Two pieces, used by `gpsr.models.gpsr.GPSR.sample_signed`:

- `TiledDenoiser`: the UNet runs on overlapping latent tiles of its training size, in
  batches, and the tiles' outputs are blended with smooth weights into one output for the
  whole latent (the MultiDiffusion idea, Bar-Tal et al. 2023). The sampler then takes its
  one DDIM update on the whole latent, so the noise and the update know nothing of tiles.
  The last evaluation, whose prediction is the sample, uses tiles twice as dense, so no
  tile border of the earlier steps is left in the sample.
- `tiled_inverse`: the flow inverse on non-overlapping tiles of the coarse space, each
  computed with a halo of context. The flow is convolutional, so a halo at least its
  receptive radius (`DegradationFlow.receptive_radius`) gives the whole-image result.

Tile settings are gathered in `Tiling` (the `sampler.tile*` / `sampler.flow_*` settings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from gpsr.utils.errors import ConfigError

__all__ = [
    "Tiling",
    "tile_starts",
    "blend_window",
    "TiledDenoiser",
    "tiled_inverse",
    "seam_ratio",
]

AUTO = "auto"


def _setting(value, name: str, zero: bool = False, auto: bool = True, null: bool = True):
    """Check one tile setting: a positive (or, with `zero`, non-negative) integer, or where
    allowed "auto" or None; refuses anything else in one line naming `sampler.<name>`."""
    number = isinstance(value, int) and not isinstance(value, bool)
    if (
        (number and value >= (0 if zero else 1))
        or (auto and value == AUTO)
        or (null and value is None)
    ):
        return value
    allowed = ["0 or more" if zero else "a positive integer"]
    allowed += ["'auto'"] * auto + ["null"] * null
    words = allowed[0] if len(allowed) == 1 else ", ".join(allowed[:-1]) + " or " + allowed[-1]
    shown = "null" if value is None else repr(value)
    raise ConfigError(f"sampler.{name} must be {words}, got {shown}")


AUTO_BATCH = 32  # tiles per UNet call (tile_batch=auto in fp32)
AUTO_BATCH_PIXELS = AUTO_BATCH * 64 * 64  # latent pixels per call (tile_batch=auto in bf16)
AUTO_BATCH_MAX = 256  # the largest batch measured (docs/benchmarks.md)


@dataclass(frozen=True)
class Tiling:
    """How a large image is split (settings `sampler.tile`, `tile_overlap`,
    `tile_final_overlap`, `tile_batch`, `flow_tile`, `flow_halo`).

    tile: latent tile side of the UNet; "auto" = the UNet's training size (`image_size`),
        None = the whole latent in one call (global attention: memory grows with the square
        of the area).
    overlap: latent pixels shared by neighbouring tiles; "auto" = tile / 4.
    final_overlap: the overlap of the last UNet evaluation, whose prediction is the sample's
        latent; "auto" = tile / 2 (twice the tiles for one step of seven: about 16 % more
        time, and the tile borders of the other steps no longer show in the sample).
    batch: tiles per UNet call; "auto" = `AUTO_BATCH` in fp32 (as before), and in bf16 as
        many tiles as hold `AUTO_BATCH_PIXELS` latent pixels, between `AUTO_BATCH` and
        `AUTO_BATCH_MAX` (`unet_batch`).
    flow_tile: coarse-space tile side of the flow inverse; None = the whole image.
    flow_halo: context around each flow tile; "auto" = the flow's receptive radius (exact).
    """

    tile: int | str | None = AUTO
    overlap: int | str = AUTO
    final_overlap: int | str = AUTO
    batch: int | str = AUTO
    flow_tile: int | None = 256
    flow_halo: int | str = AUTO

    def __post_init__(self):
        _setting(self.tile, "tile")
        _setting(self.overlap, "tile_overlap", zero=True, null=False)
        _setting(self.final_overlap, "tile_final_overlap", zero=True, null=False)
        _setting(self.batch, "tile_batch", null=False)
        _setting(self.flow_tile, "flow_tile", auto=False)
        _setting(self.flow_halo, "flow_halo", zero=True, null=False)

    @classmethod
    def whole(cls) -> Tiling:
        """No tiling at all: the whole latent through the UNet and the flow at once."""
        return cls(tile=None, flow_tile=None)

    @classmethod
    def from_config(cls, sampler) -> Tiling:
        """From a config block with keys tile, tile_overlap, tile_final_overlap, tile_batch,
        flow_tile, flow_halo (a missing key keeps this class's default)."""
        keys = {
            "tile": "tile",
            "tile_overlap": "overlap",
            "tile_final_overlap": "final_overlap",
            "tile_batch": "batch",
            "flow_tile": "flow_tile",
            "flow_halo": "flow_halo",
        }
        return cls(**{field: sampler[key] for key, field in keys.items() if key in sampler})

    def unet_tile(self, unet: nn.Module, align: int) -> int | None:
        """The latent tile side for this UNet (None: no tiling), a multiple of `align`."""
        if self.tile is None:
            return None
        tile = int(getattr(unet, "image_size", 0)) if self.tile == AUTO else int(self.tile)
        if tile < 1 or tile % align:
            raise ConfigError(
                f"sampler.tile={self.tile} gives latent tiles of {tile}: they must be positive "
                f"multiples of {align} (the UNet's down-sampling factor and the LR pixel's "
                f"size in the latent)"
            )
        return tile

    def unet_batch(self, tile: int, precision: str = "fp32") -> int:
        """Tiles of side `tile` per UNet call under the sampler's resolved `precision`
        ("fp32" or "bf16"). "auto": `AUTO_BATCH` in fp32, so fp32 samples stay bit-identical
        to those of earlier releases (another batch can round differently); in bf16 about
        `AUTO_BATCH_PIXELS` latent pixels per call (the pixels of `AUTO_BATCH` tiles of the
        paper UNet's 64 x 64), at least `AUTO_BATCH` and at most `AUTO_BATCH_MAX` tiles: small
        tiles in small batches leave a CPU's matrix units idle between calls, while a call
        never holds more pixels than the paper UNet's default batch."""
        if self.batch != AUTO:
            return int(self.batch)
        if precision == "fp32":
            return AUTO_BATCH
        return max(AUTO_BATCH, min(AUTO_BATCH_MAX, AUTO_BATCH_PIXELS // (tile * tile)))

    def unet_overlap(self, tile: int, final: bool = False) -> int:
        """Latent overlap between tiles of side `tile` (< tile); `final`: that of the last UNet
        evaluation (`final_overlap`)."""
        value, name, auto = (
            (self.final_overlap, "tile_final_overlap", tile // 2)
            if final
            else (self.overlap, "tile_overlap", tile // 4)
        )
        overlap = auto if value == AUTO else int(value)
        if overlap >= tile:
            raise ConfigError(f"sampler.{name}={overlap} must be smaller than the tile ({tile})")
        return overlap

    def halo(self, flow: nn.Module) -> int:
        """Coarse-space context around each flow tile."""
        return flow.receptive_radius if self.flow_halo == AUTO else int(self.flow_halo)


def tile_starts(size: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Offsets of tiles of side `tile` that cover [0, size), neighbours sharing at least
    `overlap` pixels, spread evenly from 0 to size - tile, each a multiple of `align`
    (size and tile must be multiples of it). size <= tile -> [0] (one tile of side size)."""
    if size <= tile:
        return [0]
    span = (size - tile) // align  # in units of align
    longest = max(1, (tile - overlap) // align)
    n = -(-span // longest) + 1
    return [round(i * span / (n - 1)) * align for i in range(n)]


def blend_window(side: int, overlap: int, start: bool = True, end: bool = True) -> torch.Tensor:
    """1-D blending weights (side,) float64 in (0, 1] of one tile: a raised-cosine ramp
    across the `overlap` pixels it shares with the tile before it (if `start`) and after it
    (if `end`), 1 elsewhere. Two neighbours' ramps add up to 1 over their overlap when it is
    exactly `overlap` wide, so the blend passes from one tile to the next as smoothly as the
    overlap allows: a sharper passage (e.g. a ramp that gives the pixels next to a tile's
    border no weight) makes the sample change abruptly there, which the flow decodes into
    pixels outside [0, 1] and a less consistent image (docs/large_images.md)."""
    w = torch.ones(side, dtype=torch.float64)
    if overlap <= 0:
        return w
    i = torch.arange(side, dtype=torch.float64)
    ramp = torch.sin(0.5 * math.pi * ((i + 0.5) / overlap).clamp(0.0, 1.0)) ** 2
    if start:
        w = torch.minimum(w, ramp)
    if end:
        w = torch.minimum(w, ramp.flip(0))
    return w


class TiledDenoiser(nn.Module):
    """A network applied tile by tile: x (N, C_in, H, W), t (N,) -> (N, C_out, H, W).

    Tiles of side `tile` (or the whole side, if smaller) start at multiples of `align` and
    overlap by at least `overlap`; each output pixel is the weighted mean of the outputs of
    the tiles covering it, with weights `blend_window` (outer product; every pixel has a
    tile of positive weight). An input no larger than one tile goes through the network
    unchanged. Peak memory is that of `batch` tiles plus the output.
    """

    def __init__(self, model: nn.Module, tile: int, overlap: int, batch: int = 16, align: int = 1):
        super().__init__()
        self.model, self.tile, self.overlap, self.batch = model, tile, overlap, batch
        self.align = align

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n, c_in, h, w = x.shape
        if h <= self.tile and w <= self.tile:
            return self.model(x, t)
        th, tw = min(self.tile, h), min(self.tile, w)
        ys = tile_starts(h, th, self.overlap, self.align)
        xs = tile_starts(w, tw, self.overlap, self.align)
        # Each tile tapers only towards the tiles that overlap it, never at the image border.
        wy = torch.stack([blend_window(th, self.overlap, y0 > 0, y0 + th < h) for y0 in ys])
        wx = torch.stack([blend_window(tw, self.overlap, x0 > 0, x0 + tw < w) for x0 in xs])
        weights = (wy[:, None, :, None] * wx[None, :, None, :]).reshape(-1, th, tw)
        weights = weights.to(x.device, x.dtype)  # (tiles, th, tw), tiles row by row
        # pixels[k]: the flat (row-major) positions in one h x w plane of tile k's pixels.
        rows = torch.tensor(ys, device=x.device)[:, None] + torch.arange(th, device=x.device)
        cols = torch.tensor(xs, device=x.device)[:, None] + torch.arange(tw, device=x.device)
        pixels = (rows[:, None, :, None] * w + cols[None, :, None, :]).reshape(-1, th * tw)
        total = torch.zeros(h * w, dtype=x.dtype, device=x.device)
        total.index_add_(0, pixels.flatten(), weights.flatten())
        places = [(i, k) for i in range(n) for k in range(len(pixels))]
        flat, out = x.reshape(-1), None
        for start in range(0, len(places), self.batch):
            chunk = places[start : start + self.batch]
            images = torch.tensor([i for i, _ in chunk], device=x.device)
            tiles = torch.tensor([k for _, k in chunk], device=x.device)
            where = pixels[tiles]  # (B, th * tw)
            crops = flat[_plane_index(images, where, c_in, h * w)]
            pred = self.model(crops.view(len(chunk), c_in, th, tw), t[images])
            if out is None:
                out = torch.zeros(n * pred.shape[1] * h * w, dtype=pred.dtype, device=x.device)
            index = _plane_index(images, where, pred.shape[1], h * w)
            _add_in_order(out, index, pred * weights[tiles, None].to(pred.dtype))
        return out.view(n, -1, h, w) / total.view(h, w).to(out.dtype)


def _add_in_order(out: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """out[index[j]] += values[j] for j = 0, 1, ... in that order: each output pixel adds its
    tiles' weighted predictions in tile order, as a loop over the tiles would (the same
    rounding, run after run). out (M,) flat; index (B, ...) int64; values like index.

    On a CPU one `index_add_` does it (serial, in order, for a 1-D tensor); on a GPU an
    `index_add_` with repeated indices adds in any order, so there each tile (whose own
    indices never repeat) is added in turn."""
    if out.device.type == "cpu":
        out.index_add_(0, index.flatten(), values.flatten())
        return
    for tile_index, tile_values in zip(index, values):
        out.index_add_(0, tile_index.flatten(), tile_values.flatten())


def _plane_index(
    images: torch.Tensor, pixels: torch.Tensor, channels: int, plane: int
) -> torch.Tensor:
    """Flat indices into an (N, channels, plane) tensor of the pixels (B, P) of images (B,):
    -> (B, channels, P) int64."""
    base = images[:, None] * channels + torch.arange(channels, device=pixels.device)
    return base[:, :, None] * plane + pixels[:, None, :]


def tiled_inverse(
    flow: nn.Module,
    coarse: torch.Tensor,
    latent: torch.Tensor,
    tile: int | None,
    halo: int,
) -> torch.Tensor:
    """`flow.inverse` on tiles: coarse (N, C, h, w), latent (N, 3C, h, w) -> (N, C, 2h, 2w).

    Output tile (y0, x0) of side `tile` (coarse pixels) is decoded from the input region
    grown by `halo` on every side (clipped to the image) and cropped back. With `halo` at
    least the flow's receptive radius this equals `flow.inverse(coarse, latent)` up to float
    rounding. `tile=None`, or an image no larger than one tile with its halo (sides at most
    tile + 2 halo: within the memory a tile takes, and exact), decodes in one call: tiles
    would decode most of such an image again and again (with the paper flow's halo of 640,
    each of the 16 tiles of 256 of a 1024 x 1024 coarse image would decode nearly all of it).
    """
    h, w = coarse.shape[-2:]
    if tile is None or (h <= tile + 2 * halo and w <= tile + 2 * halo):
        return flow.inverse(coarse, latent)
    out = coarse.new_empty(*coarse.shape[:-2], 2 * h, 2 * w)
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            top, left = max(0, y0 - halo), max(0, x0 - halo)
            bottom, right = min(h, y1 + halo), min(w, x1 + halo)
            part = flow.inverse(
                coarse[..., top:bottom, left:right],
                latent[..., top:bottom, left:right],
                offset=(top, left),
            )
            out[..., 2 * y0 : 2 * y1, 2 * x0 : 2 * x1] = part[
                ..., 2 * (y0 - top) : 2 * (y1 - top), 2 * (x0 - left) : 2 * (x1 - left)
            ]
    return out


def seam_ratio(x: torch.Tensor, cuts: list[int], dim: int, period: int) -> float:
    """How much an image changes across tile borders: mean |x[i] - x[i-1]| along `dim` at
    the cuts, over the mean at the other positions congruent to the same cut modulo
    `period` (averaged over the cuts); about 1 without seams. x: (N, C, H, W).

    Only like positions are compared: an LR pixel covers several HR pixels (the nearest
    embedding, the flow's 2 x 2 Haar blocks, the UNet's down-sampling), so differences
    across such borders differ from those inside whatever the tiling."""
    diff = x.diff(dim=dim).abs().movedim(dim, 0).flatten(1).mean(1)  # [i - 1]: x[i] - x[i-1]
    is_cut = torch.zeros(diff.shape[0], dtype=torch.bool)
    is_cut[[c - 1 for c in cuts]] = True
    ratios = []
    for c in cuts:
        like = torch.zeros_like(is_cut)
        like[(c - 1) % period :: period] = True
        ratios.append(diff[c - 1] / diff[like & ~is_cut].mean())
    return torch.stack(ratios).mean().item()
