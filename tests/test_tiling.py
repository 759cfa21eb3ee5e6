"""Tiled inference (gpsr.tiling): the blend is a weighted mean of the tiles in the right
places, the tiled flow inverse is exact with its halo, memory guards, and no seams."""

import pytest
import torch
from torch import nn

from gpsr import ops
from gpsr.diffusion import GaussianDiffusion
from gpsr.models.gpsr import GPSR
from gpsr.models.stats import LatentStats
from gpsr.models.unet import UNet
from gpsr.tiling import (
    TiledDenoiser,
    Tiling,
    blend_window,
    seam_ratio,
    tile_starts,
    tiled_inverse,
)
from gpsr.utils.errors import ConfigError, TooLargeError
from tests.helpers import SMALL_UNET, randomize_, tiny_flow


@pytest.mark.parametrize(
    "size,tile,overlap,align",
    [(64, 16, 4, 1), (70, 16, 4, 1), (16, 16, 4, 1), (9, 16, 4, 1), (64, 16, 5, 2), (96, 16, 6, 4)],
)
def test_tiles_cover_the_side_and_overlap(size, tile, overlap, align):
    starts = tile_starts(size, tile, overlap, align)
    side = min(tile, size)
    assert starts[0] == 0 and starts[-1] + side == size
    assert all(s % align == 0 for s in starts)
    covered = torch.zeros(size, dtype=torch.bool)
    for s in starts:
        covered[s : s + side] = True
    assert covered.all()
    assert all(b - a <= side - overlap for a, b in zip(starts, starts[1:]))


def test_blend_window_tapers_only_towards_neighbours():
    w = blend_window(32, 8)
    assert torch.allclose(w, w.flip(0))
    assert w[0] > 0 and (w[:8].diff() > 0).all()  # every pixel of the overlap takes part
    assert torch.equal(w[8:24], torch.ones(16, dtype=torch.float64))
    # Two tiles overlapping by exactly 8 pixels: their ramps add up to one there.
    assert torch.allclose(w[24:] + w[:8], torch.ones(8, dtype=torch.float64))
    # At the image border (no tile before it) the tile keeps its full weight.
    first = blend_window(32, 8, start=False)
    assert torch.equal(first[:24], torch.ones(24, dtype=torch.float64))
    assert torch.equal(first[24:], w[24:])


class _Pointwise(nn.Module):
    """A 1x1 conv plus the timestep: its output at a pixel depends on that pixel only."""

    def __init__(self):
        super().__init__()
        self.conv = randomize_(nn.Conv2d(5, 3, 1).double(), std=0.5)

    def forward(self, x, t):
        return self.conv(x) + t[:, None, None, None]


def test_tiled_denoiser_places_and_normalises_every_tile():
    """For a network whose output at a pixel depends only on that pixel, every tile predicts
    the same value there, so any weighted mean of tiles must return the whole-image output:
    a tile written at the wrong offset, or weights that do not sum to one, would not."""
    model = _Pointwise()
    x = torch.randn(2, 5, 37, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([3.0, 7.0], dtype=torch.float64)
    tiled = TiledDenoiser(model, tile=16, overlap=5, batch=7)(x, t)
    assert torch.allclose(tiled, model(x, t), atol=1e-12, rtol=0)


def _blend_by_loop(model, x, t, tile, overlap, batch, align):
    """The tiled blend written out tile by tile: crop, predict, add the weighted prediction
    in place, divide by the summed weights."""
    n, _, h, w = x.shape
    ys, xs = tile_starts(h, tile, overlap, align), tile_starts(w, tile, overlap, align)
    weight = {
        (y0, x0): (
            blend_window(tile, overlap, y0 > 0, y0 + tile < h)[:, None]
            * blend_window(tile, overlap, x0 > 0, x0 + tile < w)[None, :]
        ).to(x.device, x.dtype)
        for y0 in ys
        for x0 in xs
    }
    places = [(i, y0, x0) for i in range(n) for y0 in ys for x0 in xs]
    out, total = None, torch.zeros(h, w, dtype=x.dtype, device=x.device)
    for y0, x0 in weight:
        total[y0 : y0 + tile, x0 : x0 + tile] += weight[(y0, x0)]
    for start in range(0, len(places), batch):
        chunk = places[start : start + batch]
        crops = torch.stack([x[i, :, y : y + tile, c : c + tile] for i, y, c in chunk])
        pred = model(crops, t[[i for i, _, _ in chunk]])
        out = x.new_zeros(n, pred.shape[1], h, w) if out is None else out
        for (i, y, c), p in zip(chunk, pred):
            out[i, :, y : y + tile, c : c + tile] += p * weight[(y, c)]
    return out / total


def test_tiled_denoiser_equals_the_tile_by_tile_blend_bit_for_bit():
    """With a network that mixes neighbouring pixels (tiles really differ where they
    overlap), the batched blend equals the tile-by-tile loop to the last bit: float32 sums
    taken in another order, a tile or a channel in the wrong place, or a weight swapped
    between tiles would not. Two images, batches that straddle them, 2-aligned starts."""
    model = nn.Conv2d(5, 3, 3, padding=1)
    randomize_(model, std=0.5)
    x = torch.randn(2, 5, 38, 50, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3.0, 7.0])

    def net(crops, steps):
        return model(crops) * steps[:, None, None, None]

    with torch.no_grad():
        got = TiledDenoiser(net, tile=16, overlap=6, batch=7, align=2)(x, t)
        want = _blend_by_loop(net, x, t, 16, 6, 7, 2)
    assert torch.equal(got, want)


def test_tiled_denoiser_passes_small_inputs_through_unchanged():
    model = _Pointwise()
    x = torch.randn(1, 5, 16, 12, dtype=torch.float64)
    t = torch.ones(1, dtype=torch.float64)
    assert torch.equal(TiledDenoiser(model, 16, 4)(x, t), model(x, t))


@torch.no_grad()
def test_receptive_radius_is_exact():
    """Changing one latent pixel changes the decoded image exactly up to the receptive
    radius (in coarse pixels) and no further."""
    flow = tiny_flow(scale=4, dtype=torch.float64, std=0.2)
    r = flow.receptive_radius
    assert r == 2 * 3 * 3
    n = 2 * r + 9
    gen = torch.Generator().manual_seed(0)
    coarse = torch.randn(1, 3, n, n, dtype=torch.float64, generator=gen)
    latent = torch.randn(1, 9, n, n, dtype=torch.float64, generator=gen)
    out = flow.inverse(coarse, latent)
    c = n // 2
    latent[0, :, c, c] += 1.0
    changed = (flow.inverse(coarse, latent) - out).abs().amax((0, 1))
    changed = changed.reshape(n, 2, n, 2).amax((1, 3)) > 0  # per coarse pixel
    rows = changed.any(1).nonzero().flatten()
    assert rows.min() == c - r and rows.max() == c + r


@torch.no_grad()
def test_tiled_inverse_equals_the_whole_inverse_with_its_halo():
    """Exact with the receptive radius as halo; one pixel short and the tiles differ (the
    weights are large enough, std 0.1, that the last pixel of context matters by ~4e-7 of
    the output's scale, far above float64's 1e-12 agreement)."""
    flow = tiny_flow(scale=4, dtype=torch.float64, std=0.1)
    gen = torch.Generator().manual_seed(1)
    coarse = torch.randn(2, 3, 45, 70, dtype=torch.float64, generator=gen)
    latent = torch.randn(2, 9, 45, 70, dtype=torch.float64, generator=gen)
    whole = flow.inverse(coarse, latent)
    tiled = tiled_inverse(flow, coarse, latent, tile=16, halo=flow.receptive_radius)
    big = whole.abs().max()
    assert torch.allclose(tiled, whole, atol=1e-12 * big, rtol=0)
    # One pixel less context than the radius: the tiles differ near their borders.
    short = tiled_inverse(flow, coarse, latent, tile=16, halo=flow.receptive_radius - 1)
    assert (short - whole).abs().max() > 1e-9 * big


@torch.no_grad()
def test_the_samplers_default_halo_decodes_tiles_exactly():
    """The halo the sampler uses by default (`Tiling.halo`, flow_halo=auto) is the receptive
    radius: decoding in 16-pixel tiles through `pseudoinverse` equals the whole-image decode
    to float64 precision (a default one pixel short differs by > 1e-9, as above)."""
    flow = tiny_flow(scale=4, dtype=torch.float64, std=0.1)
    gen = torch.Generator().manual_seed(1)
    y = torch.rand(2, 3, 24, 36, dtype=torch.float64, generator=gen)  # coarse 48 x 72
    z = torch.randn(2, *flow.latent_shape(*y.shape[-2:]), dtype=torch.float64, generator=gen)
    tiling = Tiling(flow_tile=16)
    assert tiling.halo(flow) == flow.receptive_radius
    whole = flow.pseudoinverse(y * 2 - 1, z)
    tiled = flow.pseudoinverse(y * 2 - 1, z, tiling.flow_tile, tiling.halo(flow))
    assert torch.allclose(tiled, whole, atol=1e-12 * whole.abs().max(), rtol=0)


@torch.no_grad()
def test_tiled_inverse_tells_a_position_flow_where_each_tile_lies():
    """A flow with `position` decodes a tile by where it lies in the image: with an odd
    halo the tiles start on odd coarse rows and columns, so a tile decoded as if it started
    at (0, 0) would come out different from the whole image."""
    flow = tiny_flow(scale=4, dtype=torch.float64, std=0.05, position=True)
    gen = torch.Generator().manual_seed(1)
    coarse = torch.randn(1, 3, 45, 70, dtype=torch.float64, generator=gen)
    latent = torch.randn(1, 9, 45, 70, dtype=torch.float64, generator=gen)
    whole = flow.inverse(coarse, latent)
    tiled = tiled_inverse(flow, coarse, latent, tile=16, halo=flow.receptive_radius + 1)
    assert torch.allclose(tiled, whole, atol=1e-12 * whole.abs().max(), rtol=0)


def test_tiled_inverse_decodes_an_image_within_one_haloed_tile_in_one_call(monkeypatch):
    """An image no larger than a tile with its halo on both sides (tile + 2 halo) is decoded
    in one call, the whole image (within the tiles' memory bound, and exact); one pixel more
    and it is tiled (3 x 3 tiles of 16 here)."""
    flow = tiny_flow(scale=4, dtype=torch.float64, std=0.05)
    gen = torch.Generator().manual_seed(2)
    coarse = torch.randn(1, 3, 40, 40, dtype=torch.float64, generator=gen)
    latent = torch.randn(1, 9, 40, 40, dtype=torch.float64, generator=gen)
    calls = []
    inverse = flow.inverse
    monkeypatch.setattr(
        flow, "inverse", lambda c, z, **kw: calls.append(c.shape[-2:]) or inverse(c, z, **kw)
    )
    out = tiled_inverse(flow, coarse, latent, tile=16, halo=12)
    assert calls == [(40, 40)] and torch.equal(out, inverse(coarse, latent))
    calls.clear()
    tiled_inverse(flow, coarse, latent, tile=16, halo=11)
    assert len(calls) == 9


def _small_model():
    flow = tiny_flow(scale=4, std=0.05)
    unet = randomize_(UNet(in_channels=12, out_channels=9, **SMALL_UNET), std=0.02)
    stats = LatentStats(9)
    return flow, unet.eval(), GaussianDiffusion(1000, prediction="x0"), stats


def test_tiling_changes_nothing_for_an_image_of_one_tile():
    flow, unet, diffusion, stats = _small_model()
    y = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1  # latent 16
    outs = []
    for tiling in (Tiling(), Tiling.whole()):
        torch.manual_seed(0)
        outs.append(GPSR(flow, unet, diffusion, stats).sample_signed(y, 3, tiling=tiling))
    assert torch.equal(outs[0], outs[1])


def test_tiled_sampling_of_a_large_non_square_image():
    flow, unet, diffusion, stats = _small_model()
    y = torch.rand(1, 3, 24, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = GPSR(flow, unet, diffusion, stats).sample_signed(y, 2, tiling=Tiling(flow_tile=16))
    assert out.shape == (1, 3, 96, 160) and torch.isfinite(out).all()


def test_the_last_step_uses_the_final_overlap(monkeypatch):
    """GPSR sampling tiles every step with `tile_overlap` except the last, whose prediction
    is the sample, with `tile_final_overlap`."""
    import gpsr.models.gpsr as module

    flow, unet, diffusion, stats = _small_model()
    seen = []

    class Recording(TiledDenoiser):
        def forward(self, x, t):
            seen.append(self.overlap)
            return super().forward(x, t)

    monkeypatch.setattr(module, "TiledDenoiser", Recording)
    y = torch.zeros(1, 3, 16, 16)  # latent 32 x 32: several tiles of 16
    GPSR(flow, unet, diffusion, stats).sample_signed(y, 3, tiling=Tiling(overlap=2))
    assert seen == [2, 2, 8]


def test_auto_tile_batch_is_32_in_fp32_and_a_pixel_budget_in_bf16():
    """tile_batch=auto: 32 tiles in fp32 (unchanged), in bf16 32 x 64 x 64 latent pixels per
    call within [32, 256] tiles; a number is used as given."""
    auto = Tiling()
    assert [auto.unet_batch(t, "fp32") for t in (8, 16, 64)] == [32, 32, 32]
    assert [auto.unet_batch(t, "bf16") for t in (8, 16, 32, 64, 128)] == [256, 256, 128, 32, 32]
    assert Tiling(batch=5).unet_batch(16, "bf16") == 5 and Tiling(batch=5).unet_batch(16) == 5
    with pytest.raises(ConfigError, match="^sampler.tile_batch must be a positive integer or"):
        Tiling(batch="many")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sampler_calls_the_unet_in_batches_of_unet_batch(precision):
    """49 tiles of 16 per step: in fp32 two calls per step (32 + 17 tiles), in bf16 one
    (the auto batch holds 256); the count equals `GPSR.work_units` (minus the decode)."""
    flow, unet, diffusion, stats = _small_model()
    model = GPSR(flow, unet, diffusion, stats)
    calls = []
    hook = unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    y = torch.zeros(1, 3, 44, 44)  # latent 88: 7 x 7 tiles of 16 at overlap 4 (and at 8)
    tiling = Tiling(final_overlap=4)
    model.sample_signed(y, 2, tiling=tiling, precision=precision)
    hook.remove()
    assert calls == ([32, 17, 32, 17] if precision == "fp32" else [49, 49])
    assert model.work_units(44, 44, 2, tiling, precision=precision) == len(calls) + 1


def test_whole_latent_that_cannot_fit_is_refused_in_one_line(monkeypatch):
    flow, unet, diffusion, stats = _small_model()
    monkeypatch.setattr("gpsr.models.gpsr.available_memory", lambda device: 2**20)
    y = torch.zeros(1, 3, 32, 32)  # latent 64 x 64: attention over 32 x 32 tokens, 8 MiB
    with pytest.raises(TooLargeError, match="sampler.tile"):
        GPSR(flow, unet, diffusion, stats).sample_signed(y, 1, tiling=Tiling.whole())
    # Tiles of the training size fit.
    GPSR(flow, unet, diffusion, stats).sample_signed(y, 1, tiling=Tiling())


def test_tile_settings_are_checked_by_name():
    _, unet, _, _ = _small_model()
    with pytest.raises(ConfigError, match="sampler.tile=6"):
        Tiling(tile=6).unet_tile(unet, align=4)
    with pytest.raises(ConfigError, match="sampler.tile_overlap"):
        Tiling(tile=16, overlap=16).unet_overlap(16)
    with pytest.raises(ConfigError, match="sampler.tile_final_overlap"):
        Tiling(tile=16, final_overlap=16).unet_overlap(16, final=True)
    with pytest.raises(
        ConfigError, match="^sampler.tile_final_overlap must be 0 or more or 'auto', got null$"
    ):
        Tiling(final_overlap=None)
    with pytest.raises(
        ConfigError, match="^sampler.flow_tile must be a positive integer or null, got 'auto'$"
    ):
        Tiling(flow_tile="auto")
    with pytest.raises(
        ConfigError, match="^sampler.tile must be a positive integer, 'auto' or null, got 2.5$"
    ):
        Tiling(tile=2.5)
    assert Tiling().unet_overlap(16) == 4 and Tiling().unet_overlap(16, final=True) == 8
    with pytest.raises(ConfigError, match="sampler.tile_batch"):
        Tiling(batch=0)
    with pytest.raises(ConfigError, match="sampler.flow_halo"):
        Tiling(flow_halo=-1)
    assert Tiling().unet_tile(unet, align=2) == SMALL_UNET["image_size"]


@torch.no_grad()
def test_no_seams_at_tile_borders():
    """Tiled sampling of 256 x 256 photos (latent 128 x 128 in 16 x 16 tiles): the image
    changes across tile borders as much as across like positions elsewhere (within 10 %).
    The UNet has random weights, so its output near a tile border, where it sees zero
    padding, differs from its output inside; without overlap that shows at every border
    (the check must fail there), and the blend must hide it. docs/large_images.md gives
    the same measure for the demo's trained model."""
    import skimage.data
    import torchvision.transforms.v2.functional as TF

    from gpsr.data.demo import DEMO_PHOTOS
    from gpsr.diffusion import IndexNoise

    flow = tiny_flow(scale=4, std=0.05)
    unet = randomize_(UNet(in_channels=12, out_channels=9, **SMALL_UNET), std=0.1).eval()
    diffusion, stats = GaussianDiffusion(1000, prediction="x0"), LatentStats(9)
    photos = [
        torch.from_numpy(getattr(skimage.data, name)().copy()).permute(2, 0, 1)
        for name in DEMO_PHOTOS[:4]
    ]
    hr = torch.stack([TF.center_crop(TF.resize(p, 256), [256, 256]) for p in photos])
    y = ops.degrade(hr.float() / 127.5 - 1, 4)
    ratios = {}
    for overlap in (0, 4):
        tiling = Tiling(tile=16, overlap=overlap, final_overlap=2 * overlap)
        out = GPSR(flow, unet, diffusion, stats).sample_signed(
            y, 3, noise_fn=IndexNoise(range(4), 0, "cpu"), tiling=tiling
        )
        starts = tile_starts(128, 16, overlap, align=2)
        cuts = sorted({2 * s for s in starts[1:]} | {2 * (s + 16) for s in starts[:-1]})
        ratios[overlap] = [seam_ratio(out, cuts, dim, period=16) for dim in (2, 3)]
    assert all(abs(r - 1) <= 0.1 for r in ratios[4]), ratios
    assert any(abs(r - 1) > 0.1 for r in ratios[0]), ratios
