"""Diffusion math against closed forms, and the sampler with an oracle network."""

import math

import pytest
import torch

from gpsr.diffusion import GaussianDiffusion, cosine_betas, linear_betas, sampling_timesteps


def test_linear_schedule_closed_form():
    betas = linear_betas(1000)
    assert betas.dtype == torch.float64
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    t = torch.arange(1000, dtype=torch.float64)
    assert torch.allclose(betas, 1e-4 + (0.02 - 1e-4) * t / 999, atol=1e-15)
    d = GaussianDiffusion(1000)
    abar = math.prod(1 - b for b in betas[:500].tolist())
    assert d.alphas_cumprod[499].item() == pytest.approx(abar, rel=1e-12)


def test_cosine_schedule_matches_its_closed_form():
    betas = cosine_betas(1000)
    abar = torch.cumprod(1 - betas, 0)

    def f(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    assert abar[499].item() == pytest.approx(f(0.5) / f(0), rel=1e-9)
    assert betas.max() <= 0.999


def test_paper_timesteps():
    assert sampling_timesteps(1000, 7) == [999, 832, 666, 499, 333, 166, 0]
    assert sampling_timesteps(1000, 1) == [999]
    assert len(sampling_timesteps(1000, 100)) == 100
    with pytest.raises(ValueError, match="sampler.steps"):
        sampling_timesteps(1000, 0)


def test_q_sample_moments():
    d = GaussianDiffusion(1000)
    x0 = torch.full((20000, 1, 1, 1), 0.7, dtype=torch.float64)
    t = torch.full((20000,), 300)
    xt = d.q_sample(x0, t, torch.randn_like(x0))
    abar = d.alphas_cumprod[300].item()
    assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - abar, rel=0.05)


@pytest.mark.parametrize("steps,eta", [(1, 1.0), (7, 1.0), (20, 0.0), (100, 0.5)])
def test_oracle_network_recovers_the_clean_latent(steps, eta):
    d = GaussianDiffusion(1000)
    target = torch.randn(4, 3, 8, 8, dtype=torch.float64) * 0.5
    calls = []

    def oracle(inp, t_scaled):
        calls.append(t_scaled[0].item())
        xt = inp[:, :3]
        t = int(round(t_scaled[0].item()))
        abar = d.alphas_cumprod[t]
        return (xt - abar.sqrt() * target) / (1 - abar).sqrt()

    cond = torch.zeros(4, 1, 8, 8, dtype=torch.float64)
    out = d.sample(oracle, cond, target.shape, steps=steps, eta=eta)
    assert len(calls) == steps
    assert torch.allclose(out, target, atol=1e-8)


def test_eta_zero_is_deterministic_and_eta_one_is_not():
    d = GaussianDiffusion(1000)
    w = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))

    def net(inp, t):  # a fixed, non-oracle network
        out = torch.tanh(torch.einsum("ij,njhw->nihw", w, inp[:, :3]))
        return out * (t[:, None, None, None] / 1000)

    cond, shape = torch.zeros(2, 1, 4, 4), (2, 3, 4, 4)
    start = torch.randn(shape, generator=torch.Generator().manual_seed(1))

    def noise_fn(later_seed):
        """The same start noise, then a stream that depends on `later_seed`."""
        g = torch.Generator().manual_seed(later_seed)
        calls = []

        def draw(s):
            calls.append(s)
            return start.clone() if len(calls) == 1 else torch.randn(s, generator=g)

        return draw, calls

    (fa, ca), (fb, _) = noise_fn(10), noise_fn(20)
    a = d.sample(net, cond, shape, steps=5, eta=0.0, noise_fn=fa)
    b = d.sample(net, cond, shape, steps=5, eta=0.0, noise_fn=fb)
    assert len(ca) == 1 and torch.equal(a, b)  # eta = 0 draws nothing after the start
    (fc, cc), (fd, _) = noise_fn(10), noise_fn(20)
    c = d.sample(net, cond, shape, steps=5, eta=1.0, noise_fn=fc)
    e = d.sample(net, cond, shape, steps=5, eta=1.0, noise_fn=fd)
    assert len(cc) == 5 and not torch.allclose(c, e)


def test_sampler_clamps_predicted_latent():
    d = GaussianDiffusion(1000)

    def wild(inp, t):
        return -10 * torch.ones_like(inp[:, :2])

    out = d.sample(wild, torch.zeros(1, 1, 2, 2), (1, 2, 2, 2), steps=3, clip=(-1.5, 1.5))
    assert out.abs().max() <= 1.5


def test_training_loss_is_scalar_and_zero_for_oracle():
    d = GaussianDiffusion(100)
    x0 = torch.randn(3, 2, 4, 4)
    noise = torch.randn_like(x0)
    loss = d.training_loss(lambda inp, t: noise, x0, torch.zeros(3, 1, 4, 4), noise=noise)
    assert loss.item() == 0.0


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sampler_with_the_optimal_network_recovers_gaussian_data(eta):
    """For x0 ~ N(0, s^2) the optimal epsilon is linear in x_t; 1000 steps must give std s."""
    d = GaussianDiffusion(1000)
    s = 0.47

    def optimal(inp, t_scaled):
        a = d.alphas_cumprod[t_scaled.round().long()].float()[:, None, None, None]
        return (1 - a).sqrt() * inp[:, :3] / (a * s * s + 1 - a)

    torch.manual_seed(0)
    out = d.sample(
        optimal, torch.zeros(512, 1, 8, 8), (512, 3, 8, 8), steps=1000, eta=eta, clip=(-5.0, 5.0)
    )
    assert out.std().item() == pytest.approx(s, rel=0.03)
    assert abs(out.mean().item()) < 0.01
