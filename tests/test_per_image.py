"""Per-image quantities on a batch of different images equal the same quantity computed image
by image: a sum or mean over the wrong dimension (over the batch instead of per image, or
the reverse) fails here. Each batch holds images of clearly different content and scale."""

import pytest
import torch

from gpsr import ops, quality
from gpsr.diffusion import GaussianDiffusion
from gpsr.metrics import SSIM, per_image_consistency
from gpsr.models.noise import LRNoiseModel
from tests.helpers import randomize_, tiny_flow


def _batch(n=3, size=32, seed=0, dtype=torch.float64):
    """n images in [0, 1] of different brightness and contrast, and noisy versions of them."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, size, size, generator=gen, dtype=dtype)
    scale = torch.linspace(0.3, 1.0, n, dtype=dtype)[:, None, None, None]
    hr = (base * scale + (1 - scale) / 2).clamp(0, 1)
    sr = (hr + 0.05 * torch.arange(1, n + 1, dtype=dtype)[:, None, None, None]
          * torch.randn(hr.shape, generator=gen, dtype=dtype)).clamp(0, 1)  # fmt: skip
    return sr, hr


def _one_by_one(fn, *batches):
    return torch.cat(
        [fn(*(b[i : i + 1] for b in batches)).reshape(1) for i in range(len(batches[0]))]
    )


@pytest.mark.parametrize(
    "fn",
    [
        quality.per_image_ms_ssim,
        quality.per_image_haarpsi,
        quality.per_image_psd_error,
        lambda sr, hr: per_image_consistency(sr, ops.degrade(hr, 4), 4),
    ],
    ids=["ms_ssim", "haarpsi", "psd_error", "consistency"],
)
def test_per_image_metrics(fn):
    sr, hr = _batch()
    batch = fn(sr, hr)
    assert batch.shape == (3,) and len(set(batch.tolist())) == 3
    torch.testing.assert_close(
        batch.double(), _one_by_one(fn, sr, hr).double(), rtol=1e-6, atol=1e-9
    )


def test_ssim_mean_over_a_batch_is_the_mean_of_per_image_values():
    sr, hr = _batch()
    together = SSIM()
    together.update(sr, hr)
    singles = []
    for i in range(3):
        m = SSIM()
        m.update(sr[i : i + 1], hr[i : i + 1])
        singles.append(float(m.compute()))
    assert len(set(round(s, 6) for s in singles)) == 3
    assert float(together.compute()) == pytest.approx(sum(singles) / 3, rel=1e-9)


@torch.no_grad()
def test_flow_logdet_and_latent_per_image():
    """The couplings' log-det (N,) of a batch is each image's own (the flow's per-image
    log-likelihood and bits/dim are built from it)."""
    flow = tiny_flow(scale=4, dtype=torch.float64, std=0.1)
    x = _batch(size=16)[1] * 2 - 1
    coarse, latent, logdet = flow(x)
    assert logdet.shape == (3,) and len(set(logdet.tolist())) == 3
    for i in range(3):
        c, z, ld = flow(x[i : i + 1])
        torch.testing.assert_close(ld, logdet[i : i + 1], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(z, latent[i : i + 1], rtol=1e-10, atol=1e-10)


@torch.no_grad()
def test_diffusion_training_losses_per_sample():
    diffusion = GaussianDiffusion(1000, prediction="eps")
    gen = torch.Generator().manual_seed(0)
    x0 = (
        torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64)
        * torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)[:, None, None, None]
    )
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([10, 500, 990])
    conv = randomize_(torch.nn.Conv2d(4, 4, 3, padding=1).double(), std=0.2)

    def model(x, tt):
        return conv(x) * (1 + tt.double()[:, None, None, None] / 1000)

    batch = diffusion.training_losses(model, x0, t, noise)
    assert batch.shape == (3,) and len(set(batch.tolist())) == 3
    singles = torch.cat(
        [diffusion.training_losses(model, x0[i : i + 1], t[i : i + 1], noise[i : i + 1])
         for i in range(3)]
    )  # fmt: skip
    torch.testing.assert_close(batch, singles, rtol=1e-12, atol=1e-12)


@torch.no_grad()
def test_noise_model_estimates_and_denoises_per_image():
    torch.manual_seed(0)
    model = randomize_(LRNoiseModel(3, sigma_max=0.1), std=0.05).double().eval()
    y = _batch(size=16)[0]
    sigma = model.estimate(y)
    assert sigma.shape == (3,)
    torch.testing.assert_close(sigma, _one_by_one(model.estimate, y), rtol=1e-9, atol=1e-12)
    levels = torch.tensor([0.0, 0.03, 0.08], dtype=torch.float64)
    clean = model.denoise(y, levels)
    for i in range(3):
        torch.testing.assert_close(
            clean[i : i + 1], model.denoise(y[i : i + 1], levels[i : i + 1]), rtol=1e-9, atol=1e-12
        )
