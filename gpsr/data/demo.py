"""The bundled demo data: the colour photos that scikit-image ships offline, split by region.

Each photo is reduced (antialiased bicubic) so its shorter side is `zoom * size`. A strip
`size` pixels wide at the end of its longer side (the right edge of a landscape or square
photo, the bottom of a portrait one) is held out and cut into non-overlapping `size x size`
tiles for validation and testing; the rest of the photo is its training region. Training
patches are cut at random positions inside the training regions every time they are drawn,
so no validation or test pixel is ever seen in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from gpsr.utils.errors import ConfigError

__all__ = [
    "DEMO_PHOTOS",
    "DemoSplits",
    "RandomPatches",
    "demo_photos",
    "demo_splits",
    "heldout_pool",
]

DEMO_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "hubble_deep_field",
)


def demo_photos(size: int, zoom: float) -> list[torch.Tensor]:
    """The bundled photos, each (3, H, W) uint8 with min(H, W) = round(zoom * size)."""
    import skimage.data  # imported here: only the demo needs it

    short = int(round(zoom * size))
    if short < 2 * size:
        raise ConfigError(
            f"data.demo_zoom={zoom} leaves photos of {short} px: need at least 2 x data.size="
            f"{size} (a training region beside the held-out strip)"
        )
    photos = []
    for name in DEMO_PHOTOS:
        img = torch.from_numpy(np.ascontiguousarray(getattr(skimage.data, name)())).permute(2, 0, 1)
        img = TF.resize(img, short, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        photos.append(img.contiguous())
    return photos


def split_photo(img: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One photo (3, H, W) -> (training region (3, H', W'), held-out tiles (n, 3, size, size)).

    The held-out strip is the last `size` columns (W >= H) or rows (H > W); its tiles start at
    the strip's beginning and do not overlap.
    """
    if img.shape[-1] >= img.shape[-2]:  # landscape or square: hold out the right edge
        region, strip = img[:, :, :-size], img[:, :, -size:]
        tiles = strip.unfold(1, size, size).permute(1, 0, 3, 2)  # (n, 3, size, size)
    else:  # portrait: hold out the bottom
        region, strip = img[:, :-size, :], img[:, -size:, :]
        tiles = strip.unfold(2, size, size).permute(2, 0, 1, 3)
    return region.contiguous(), tiles.contiguous()


def grid_tiles(region: torch.Tensor, size: int) -> torch.Tensor:
    """Non-overlapping `size x size` tiles of a region (3, H, W), row by row: (n, 3, size, size)."""
    tiles = region.unfold(1, size, size).unfold(2, size, size)  # (3, nh, nw, size, size)
    return tiles.permute(1, 2, 0, 3, 4).reshape(-1, region.shape[0], size, size).contiguous()


@dataclass
class DemoSplits:
    """regions: the training regions (3, H_i, W_i) uint8; train: their grid tiles
    (fixed, for latent statistics); val, test: held-out tiles (n, 3, size, size) uint8."""

    regions: list[torch.Tensor]
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor


def heldout_pool(size: int, zoom: float, heldout_zoom: float) -> list[torch.Tensor]:
    """Per photo, the `size x size` tiles (n_i, 3, size, size) of its held-out strip seen at
    a larger zoom: the photo reduced to a shorter side of `heldout_zoom * size`, of which the
    part that the strip held out at `zoom` covers (its last floor(size * W' / W) columns,
    or rows for a portrait photo), cut into whole tiles from that edge. These pixels show
    only what the strip shows, so no tile touches a training region."""
    if heldout_zoom < zoom:
        raise ConfigError(
            f"data.demo_heldout_zoom={heldout_zoom} must be at least data.demo_zoom={zoom}"
        )
    pool = []
    for small, big in zip(demo_photos(size, zoom), demo_photos(size, heldout_zoom)):
        axis = -1 if small.shape[-1] >= small.shape[-2] else -2
        keep = (size * big.shape[axis]) // small.shape[axis]  # inside the held-out fraction
        m = keep // size
        pool.append(grid_tiles(big.narrow(axis, big.shape[axis] - m * size, m * size), size))
    return pool


def demo_splits(
    size: int,
    zoom: float = 4.0,
    n_val: int = 8,
    n_test: int = 16,
    heldout_zoom: float | None = None,
) -> DemoSplits:
    """Split the bundled photos into training regions and disjoint val / test tiles.

    Held-out tiles are taken round-robin over the photos (every photo's first tile, then
    every photo's second, ...); even positions go to test, odd ones to validation, so both
    splits cover every photo. With `heldout_zoom`, validation and test tiles come instead
    from the held-out strips seen at that larger zoom (`heldout_pool`: many more tiles, of
    the same held-out content; the training regions are unchanged), a seeded random quarter
    of them to test and the rest to validation, so the two are exchangeable (what a
    calibration's guarantee asks of them).
    """
    regions, held = [], []
    for img in demo_photos(size, zoom):
        region, tiles = split_photo(img, size)
        regions.append(region)
        held.append(tiles)
    if heldout_zoom is not None:
        held = heldout_pool(size, zoom, heldout_zoom)
    order = [t[j] for j in range(max(len(t) for t in held)) for t in held if j < len(t)]
    if heldout_zoom is None:
        test, val = order[0::2], order[1::2]
    else:  # a seeded random quarter: test and validation tiles are exchangeable
        perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(0)).tolist()
        test = [order[i] for i in sorted(perm[: len(order) // 4])]
        val = [order[i] for i in sorted(perm[len(order) // 4 :])]
    if n_test > len(test) or n_val > len(val):
        raise ConfigError(
            f"the demo holds out {len(test)} test and {len(val)} validation tiles at "
            f"data.size={size}, data.demo_zoom={zoom}; lower data.demo_test={n_test} / "
            f"data.demo_val={n_val} or raise data.demo_zoom (or data.demo_heldout_zoom)"
        )

    def stack(tiles: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(tiles) if tiles else torch.empty(0, 3, size, size, dtype=torch.uint8)

    train = torch.cat([grid_tiles(r, size) for r in regions])
    return DemoSplits(regions, train, stack(val[:n_val]), stack(test[:n_test]))


class RandomPatches:
    """`length` training patches, each cut at a fresh random position from a training region.

    Item i comes from region `i % len(regions)` (every photo equally often); positions use
    torch's global random generator, as the random flips do. Items are (3, size, size) uint8.
    """

    def __init__(self, regions: list[torch.Tensor], size: int, length: int):
        if length < 1:
            raise ConfigError(f"data.demo_count must be at least 1, got {length}")
        self.regions, self.size, self.length = regions, size, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        region = self.regions[index % len(self.regions)]
        h, w = region.shape[-2:]
        top = int(torch.randint(0, h - self.size + 1, ()))
        left = int(torch.randint(0, w - self.size + 1, ()))
        return region[:, top : top + self.size, left : left + self.size]
