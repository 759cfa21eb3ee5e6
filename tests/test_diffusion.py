"""Diffusion math against closed forms, and the sampler with an oracle network."""

import math

import pytest
import torch

from gpsr.diffusion import GaussianDiffusion, cosine_betas, linear_betas, sampling_timesteps
from gpsr.models.conditioning import CoarseConditioned


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

    f64 = lambda s: torch.randn(s, dtype=torch.float64)  # noqa: E731
    out = d.sample(oracle, target.shape, steps=steps, eta=eta, noise_fn=f64)
    assert len(calls) == steps
    assert torch.allclose(out, target, atol=1e-8)


def test_eta_zero_is_deterministic_and_eta_one_is_not():
    d = GaussianDiffusion(1000)
    w = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))

    def net(inp, t):  # a fixed, non-oracle network
        out = torch.tanh(torch.einsum("ij,njhw->nihw", w, inp[:, :3]))
        return out * (t[:, None, None, None] / 1000)

    shape = (2, 3, 4, 4)
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
    a = d.sample(net, shape, steps=5, eta=0.0, noise_fn=fa)
    b = d.sample(net, shape, steps=5, eta=0.0, noise_fn=fb)
    assert len(ca) == 1 and torch.equal(a, b)  # eta = 0 draws nothing after the start
    (fc, cc), (fd, _) = noise_fn(10), noise_fn(20)
    c = d.sample(net, shape, steps=5, eta=1.0, noise_fn=fc)
    e = d.sample(net, shape, steps=5, eta=1.0, noise_fn=fd)
    assert len(cc) == 5 and not torch.allclose(c, e)


def test_sampler_clamps_predicted_latent_per_channel():
    """A network predicting x0 = +-10 (x0 parameterization): with per-channel bounds of shape
    (1, C, 1, 1), as `LatentStats.bounds` gives, every output pixel must sit exactly on its
    own channel's bound (not another channel's, not a global one); without bounds the
    prediction comes back unchanged."""
    d = GaussianDiffusion(1000, prediction="x0")
    sign = torch.tensor([1.0, -1.0, 1.0])[None, :, None, None] * torch.ones(2, 3, 4, 4)

    def wild(inp, t):
        return 10 * sign

    lo = torch.tensor([-1.0, -2.0, -3.0])[None, :, None, None]
    hi = torch.tensor([0.5, 1.5, 2.5])[None, :, None, None]
    out = d.sample(wild, (2, 3, 4, 4), steps=3, clip=(lo, hi))
    expect = torch.where(sign > 0, hi.expand_as(sign), lo.expand_as(sign))
    assert torch.equal(out, expect)
    assert torch.equal(d.sample(wild, (2, 3, 4, 4), steps=3), 10 * sign)


def test_sampler_calls_the_final_model_at_the_last_step_only():
    """`final_model` (the same UNet tiled more densely) makes the last prediction, which is
    the sample; every earlier step uses `model` (x0 parameterization: the output is the last
    network's prediction itself)."""
    d = GaussianDiffusion(1000, prediction="x0")
    calls = []

    def net(value):
        def f(inp, t):
            calls.append((value, float(t[0])))
            return torch.full_like(inp, value)

        return f

    out = d.sample(net(1.0), (1, 2, 4, 4), steps=4, final_model=net(-1.0))
    assert torch.equal(out, torch.full((1, 2, 4, 4), -1.0))
    assert [v for v, _ in calls] == [1.0, 1.0, 1.0, -1.0]
    assert calls[-1][1] == min(t for _, t in calls)  # the least noisy step


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sampler_with_the_optimal_network_recovers_gaussian_data(eta):
    """For x0 ~ N(0, s^2) the optimal epsilon is linear in x_t; 1000 steps must give std s."""
    d = GaussianDiffusion(1000)
    s = 0.47

    def optimal(inp, t_scaled):
        a = d.alphas_cumprod[t_scaled.round().long()].float()[:, None, None, None]
        return (1 - a).sqrt() * inp[:, :3] / (a * s * s + 1 - a)

    torch.manual_seed(0)
    out = d.sample(optimal, (512, 3, 8, 8), steps=1000, eta=eta, clip=(-5.0, 5.0))
    assert out.std().item() == pytest.approx(s, rel=0.03)
    assert abs(out.mean().item()) < 0.01


# ---------------------------------------------------------------------------------------------
# Parameterizations and the DDIM update against an independent float64 implementation.


class RandomConvNet(torch.nn.Module):
    """A fixed, seeded, non-oracle network (float64) whose output depends on x and t."""

    def __init__(self, c_in: int, c_out: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(8, c_in, 3, 3, generator=g, dtype=torch.float64) * 0.3
        self.w2 = torch.randn(c_out, 8, 3, 3, generator=g, dtype=torch.float64) * 0.15
        self.tw = torch.randn(8, generator=g, dtype=torch.float64)

    def forward(self, x, t_scaled):
        h = torch.nn.functional.conv2d(x.double(), self.w1, padding=1)
        h = torch.tanh(h + torch.sin(t_scaled.double()[:, None] / 300 * self.tw)[..., None, None])
        return torch.nn.functional.conv2d(h, self.w2, padding=1)


def reference_ddim(net, cond, noises, prediction, eta, steps, clip):
    """Song et al. (2021), Eq. 12, written out in float64 from the paper's formulas."""
    import numpy as np

    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    ts = [int(v) for v in np.linspace(999, 0, steps)]
    x = noises[0].double()
    for i, t in enumerate(ts):
        a = float(abar[t])
        out = net(torch.cat([x, cond], 1), torch.full((x.shape[0],), float(t))).double()
        if prediction == "eps":
            x0 = (x - math.sqrt(1 - a) * out) / math.sqrt(a)
        elif prediction == "v":
            x0 = math.sqrt(a) * x - math.sqrt(1 - a) * out
        else:
            x0 = out
        x0 = x0.clamp(*clip)
        if i == len(ts) - 1:
            return x0
        e = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
        ap = float(abar[ts[i + 1]])
        sigma = eta * math.sqrt((1 - ap) / (1 - a)) * math.sqrt(1 - a / ap)
        x = math.sqrt(ap) * x0 + math.sqrt(1 - ap - sigma**2) * e + sigma * noises[i + 1]
    raise AssertionError("unreachable")


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_seven_step_sampler_matches_independent_ddim(prediction, eta):
    d = GaussianDiffusion(1000, prediction=prediction)
    shape = (2, 3, 6, 6)
    net = RandomConvNet(4, 3)
    cond = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    noises = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(7)]
    it = iter(noises)
    clip = (-1.2, 1.3)
    model = CoarseConditioned(net, cond)  # the network sees [x_t, cond], as the reference
    ours = d.sample(model, shape, steps=7, eta=eta, clip=clip, noise_fn=lambda s: next(it))
    ref = reference_ddim(net, cond, noises, prediction, eta, 7, clip)
    assert torch.allclose(ours, ref, atol=1e-10, rtol=0)
    # The trajectory must actually move: the clamp must not decide the result alone.
    assert (ref.abs() < 1.2).float().mean() > 0.15


def test_parameterization_identities_round_trip():
    d = GaussianDiffusion(1000)
    x0 = torch.randn(5, 2, 3, 3, dtype=torch.float64)
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 10, 400, 800, 999])
    xt = d.q_sample(x0, t, eps)
    a = d.alphas_cumprod[t][:, None, None, None]
    # q_sample against the closed form, written independently.
    assert torch.allclose(xt, a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-12)
    assert torch.allclose(d.x0_from_eps(xt, t, eps), x0, atol=1e-9)
    assert torch.allclose(d.eps_from_x0(xt, t, x0), eps, atol=1e-9)
    v = d.velocity(x0, t, eps)
    assert torch.allclose(v, a.sqrt() * eps - (1 - a).sqrt() * x0, atol=1e-12)
    assert torch.allclose(d.x0_from_v(xt, t, v), x0, atol=1e-9)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("weighting", ["none", "min_snr"])
def test_training_loss_against_hand_computed_targets(prediction, weighting):
    import numpy as np

    d = GaussianDiffusion(1000, prediction=prediction, loss_weighting=weighting, min_snr_gamma=5)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    cond = torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([3, 250, 600, 990])
    seen = {}

    def net(inp, ts):
        seen["inp"], seen["t"] = inp, ts
        return 0.3 * inp[:, :3] + 0.1 * inp[:, 3:]

    loss = d.training_loss(CoarseConditioned(net, cond), x0, t=t, noise=noise)
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))[t.numpy()]
    a = torch.from_numpy(abar)[:, None, None, None]
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    assert torch.allclose(seen["inp"][:, :3], xt, atol=1e-12)  # the network sees x_t, not x0
    assert torch.equal(seen["inp"][:, 3:], cond) and torch.allclose(seen["t"], t.float())
    target = {"eps": noise, "v": a.sqrt() * noise - (1 - a).sqrt() * x0, "x0": x0}[prediction]
    per = ((0.3 * xt + 0.1 * cond - target) ** 2).mean((1, 2, 3))
    snr = torch.from_numpy(abar / (1 - abar))
    if weighting == "min_snr":
        unit = {"eps": snr, "v": snr + 1, "x0": torch.ones_like(snr)}[prediction]
        per = per * snr.clamp(max=5) / unit
    assert loss.item() == pytest.approx(per.mean().item(), rel=1e-9)


def test_min_snr_weight_equals_clipped_snr_times_x0_error():
    """Weighted loss of each parameterization = min(SNR, gamma) x the x0 error it implies."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([5, 300, 900])
    wrong = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    for prediction in ("eps", "v", "x0"):
        d = GaussianDiffusion(1000, prediction=prediction, loss_weighting="min_snr")
        xt = d.q_sample(x0, t, noise)
        per = d.training_losses(lambda inp, ts: wrong, x0, t, noise)
        x0_err = (d.x0_from_output(wrong, xt, t) - x0).pow(2).mean((1, 2, 3))
        expect = d.snr(t).clamp(max=5.0) * x0_err
        assert torch.allclose(d.loss_weight(t) * per, expect, rtol=1e-9)


def test_unknown_prediction_or_weighting_is_refused():
    with pytest.raises(ValueError, match="model.diffusion.prediction"):
        GaussianDiffusion(prediction="score")
    with pytest.raises(ValueError, match="model.diffusion.loss_weighting"):
        GaussianDiffusion(loss_weighting="p2")


def test_loss_by_timestep_separates_oracle_from_mean_predictor():
    from gpsr.diffusion import diagnostic_timesteps

    assert diagnostic_timesteps(1000, 10) == [50, 150, 250, 350, 450, 550, 650, 750, 850, 950]
    d = GaussianDiffusion(1000, prediction="x0")
    x0 = torch.randn(6, 3, 4, 4, dtype=torch.float64) * 0.5
    ts = [50, 500, 950]
    oracle = d.loss_by_timestep(lambda inp, t: x0, x0, ts)
    assert torch.all(oracle["loss"] == 0) and torch.all(oracle["x0_mse"] == 0)
    mean = d.loss_by_timestep(lambda inp, t: torch.zeros_like(x0), x0, ts)
    per_image = x0.pow(2).mean((1, 2, 3)).sum()
    assert torch.allclose(mean["x0_mse"], per_image.expand(3))
    # In eps units the same mean predictor's loss grows with SNR: it is x0_mse * SNR.
    de = GaussianDiffusion(1000, prediction="eps")
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)

    def mean_eps(inp, t):  # the eps implied by x0_hat = 0
        return de.eps_from_x0(inp[:, :3], (t / 1).round().long(), torch.zeros_like(x0))

    out = de.loss_by_timestep(mean_eps, x0, ts, noise_fn=lambda s: noise)
    snr = de.snr(torch.tensor(ts))
    assert torch.allclose(out["x0_mse"], per_image.expand(3), rtol=1e-8)
    assert torch.allclose(out["loss"], per_image * snr, rtol=1e-8)


def test_gpsr_sampler_decodes_through_the_latent_statistics():
    """An oracle x0-network that returns the true normalised latent must give back exactly
    the flow inverse of that latent: the sampler has to denormalise before decoding."""
    from gpsr import ops
    from gpsr.models.gpsr import GPSR
    from gpsr.models.stats import LatentStats
    from tests.helpers import tiny_flow

    flow = tiny_flow(scale=4, dtype=torch.float64, std=0.05)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x * 2 - 1
    y = ops.degrade(x, 4)
    coarse = ops.upsample_nearest(y, 2)
    z_true = torch.randn(
        2, 9, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    stats = LatentStats(9).double()
    stats.mean.copy_(torch.linspace(-0.3, 0.3, 9))
    stats.var.copy_(torch.linspace(0.2, 2.0, 9))
    stats.zmin.fill_(-50.0)
    stats.zmax.fill_(50.0)
    zhat = stats.normalise(z_true)
    assert not torch.allclose(zhat, z_true)
    d = GaussianDiffusion(1000, prediction="x0")
    f64 = lambda s: torch.randn(s, dtype=torch.float64)  # noqa: E731
    out = GPSR(flow, lambda inp, t: zhat, d, stats).sample_signed(y, 3, eta=1.0, noise_fn=f64)
    assert torch.allclose(out, flow.inverse(coarse, z_true), atol=1e-10)
