"""Metrics against scikit-image's references, on random and real images."""

import numpy as np
import pytest
import skimage.data
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from gpsr import ops
from gpsr.metrics import Consistency, SRMetrics, psnr_metric, ssim_metric


def _pairs(real: bool):
    gen = torch.Generator().manual_seed(0)
    if real:
        hr = (
            torch.stack(
                [
                    torch.from_numpy(skimage.data.astronaut()[:128, 200:328]),
                    torch.from_numpy(skimage.data.coffee()[100:228, 100:228]),
                    torch.from_numpy(skimage.data.chelsea()[50:178, 150:278]),
                ]
            )
            .permute(0, 3, 1, 2)
            .double()
            / 255
        )
    else:
        hr = torch.rand(4, 3, 64, 64, generator=gen, dtype=torch.float64)
    sr = (hr + 0.08 * torch.randn(hr.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    return sr, hr


def _np(x):
    return x.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("real", [False, True])
def test_psnr_and_ssim_match_skimage(real):
    sr, hr = _pairs(real)
    ref_psnr = np.mean(
        [peak_signal_noise_ratio(_np(h), _np(s), data_range=1.0) for s, h in zip(sr, hr)]
    )
    ref_ssim = np.mean(
        [
            structural_similarity(
                _np(h),
                _np(s),
                data_range=1.0,
                channel_axis=2,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
            )
            for s, h in zip(sr, hr)
        ]
    )
    psnr, ssim = psnr_metric(), ssim_metric()
    # Fed in two batches: the per-image average must not depend on batching.
    for part in (slice(0, 1), slice(1, None)):
        psnr.update(sr[part].float(), hr[part].float())
        ssim.update(sr[part].float(), hr[part].float())
    assert psnr.compute().item() == pytest.approx(ref_psnr, abs=1e-3)
    assert ssim.compute().item() == pytest.approx(ref_ssim, abs=1e-3)


def test_psnr_is_a_mean_over_images_not_a_global_psnr():
    hr = torch.zeros(2, 3, 8, 8)
    sr = hr.clone()
    sr[0] += 0.1
    sr[1] += 0.01
    m = psnr_metric()
    m.update(sr, hr)
    assert m.compute().item() == pytest.approx((20 + 40) / 2, abs=1e-3)


def test_consistency_units_and_definition():
    gen = torch.Generator().manual_seed(0)
    hr = torch.rand(3, 3, 32, 32, generator=gen, dtype=torch.float64)
    lr = ops.degrade(hr, 8)
    sr = (hr + 0.01 * torch.randn(hr.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    m = Consistency(8)
    m.update(sr[:1], lr[:1])
    m.update(sr[1:], lr[1:])
    expected = np.mean(
        [((ops.degrade(s[None], 8) - l[None]) ** 2).mean().item() for s, l in zip(sr, lr)]
    )
    assert m.compute().item() == pytest.approx(expected / 1e-5, rel=1e-9)
    worst = max(((ops.degrade(s[None], 8) - l[None]) ** 2).mean().item() for s, l in zip(sr, lr))
    assert m.compute_worst().item() == pytest.approx(worst / 1e-5, rel=1e-9)
    exact = Consistency(8)
    exact.update(hr, lr)
    assert exact.compute().item() < 1e-20


def test_sr_metrics_bundle_and_reset():
    sr, hr = _pairs(False)
    lr = ops.degrade(hr, 4)
    m = SRMetrics(4)
    m.update(sr, hr, lr)
    out = m.compute()
    assert set(out) == {"psnr", "ssim", "consistency"}
    assert 15 < out["psnr"] < 30 and 0 < out["ssim"] < 1 and out["consistency"] > 0
    m.reset()
    m.update(hr, hr, lr)
    assert m.compute()["ssim"] == pytest.approx(1.0, abs=1e-6)


def test_panel_tiles_are_enlarged_by_pixel_replication_under_column_titles():
    """A 16 x 16 tile becomes 128 x 128 by repeating each pixel 8 x 8 (numpy's kron, an
    independent nearest enlargement: smoothing would fail), below a 16-pixel strip with
    dark title text over each column and nowhere else."""
    from gpsr.panels import to_uint8_grid

    gen = torch.Generator().manual_seed(0)
    rows = {
        "LR": torch.rand(2, 3, 16, 16, generator=gen),
        "gpsr": torch.rand(2, 3, 16, 16, generator=gen),
    }
    grid = to_uint8_grid(rows)
    assert grid.shape == (16 + 2 * (128 + 2) + 2, 2 * (128 + 2) + 2, 3)
    for j, tile in enumerate(rows.values()):
        for i in range(2):
            want = (tile[i] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            want = np.kron(want, np.ones((8, 8, 1), dtype=np.uint8))
            top, left = 16 + 2 + i * 130, 2 + j * 130
            np.testing.assert_array_equal(grid[top : top + 128, left : left + 128], want)
    header = grid[:16].min(axis=2)
    for j in range(2):
        assert (header[:, 2 + j * 130 : 2 + j * 130 + 128] < 100).any()  # a title
    assert (header[:, 128:134] == 255).all()  # the gap between the two titles stays white
    plain = to_uint8_grid(rows, titles=False, min_side=16)
    assert plain.shape == (2 * 18 + 2, 2 * 18 + 2, 3)
