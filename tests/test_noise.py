"""Noisy LR images (docs/method.md §10): the measurement, seeded data noise, the noise model,
the noise-ball projection against scipy, the discrepancy ratio against a dense computation,
and noise-aware sampling (sigma_y = 0 is the paper's sampler bit for bit)."""

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from gpsr import ops
from gpsr.data import GPSRDataModule
from gpsr.diffusion import GaussianDiffusion, measurement_noise
from gpsr.metrics import DiscrepancyRatio, SRMetrics
from gpsr.models.gpsr import GPSR
from gpsr.models.noise import LRNoiseModel, NoiseLevelEstimator
from gpsr.models.stats import LatentStats
from gpsr.models.unet import UNet
from gpsr.projection import project_consistent_box, project_noise_ball
from gpsr.stages.noise import noise_model_losses
from gpsr.utils.errors import ConfigError
from tests.helpers import SMALL_UNET, randomize_, tiny_flow


# ---------------------------------------------------------------------- the measurement
def test_noisy_measurement_adds_per_image_noise_then_clamps_and_rounds():
    gen = torch.Generator().manual_seed(0)
    y = torch.rand(3, 3, 5, 7, generator=gen) * 1.1 - 0.05  # overshoots [0, 1] a little
    noise = torch.randn(y.shape, generator=gen)
    sigma = torch.tensor([0.0, 0.02, 0.3])
    out = ops.noisy_measurement(y, sigma, noise)
    for i in range(3):  # image i gets its own sigma
        assert torch.equal(out[i], (y[i] + sigma[i] * noise[i]).clamp(0, 1))
    q = ops.noisy_measurement(y, sigma, noise, quantize=True)
    assert torch.equal(q * 255, (q * 255).round()) and (q - out).abs().max() <= 0.5 / 255 + 1e-7
    # No noise and no rounding: the paper's float LR, untouched (not even clamped).
    assert ops.noisy_measurement(y, 0.0) is y
    with pytest.raises(ConfigError):
        ops.noisy_measurement(y, 0.1)  # noise needed


def test_data_noise_is_seeded_by_index_not_by_batch_and_has_its_amplitude():
    """Every tile's noisy LR is the same whatever the batch size; lr_clean is the noise-free
    D_s(hr); the noise has std sigma (a factor-2 slip between [0, 1] and [-1, 1] units, or
    noise drawn per batch position, fails here)."""
    sigma = 0.05
    data = GPSRDataModule(size=32, scale=4, lr_noise=sigma, seed=3, eval_batch_size=5)
    batches = list(data.eval_dataloader("test"))
    ds = data.dataset("test", flip=False)
    whole = torch.cat([b["lr"] for b in batches])
    one_by_one = torch.stack([ds[i]["lr"] for i in range(len(ds))])
    assert torch.equal(whole, one_by_one)
    clean = torch.cat([b["lr_clean"] for b in batches])
    hr = torch.cat([b["hr"] for b in batches])
    assert torch.equal(clean, ops.degrade(hr, 4))
    expect = ops.noisy_measurement(
        ops.to_unit(clean), sigma, measurement_noise(clean.shape[1:], list(range(len(ds))), 3)
    )
    assert torch.allclose(ops.to_unit(whole), expect, atol=1e-6)
    inside = (ops.to_unit(clean) > 0.2) & (ops.to_unit(clean) < 0.8)  # away from the clamp
    diff = (ops.to_unit(whole) - ops.to_unit(clean))[inside]
    assert abs(diff.std().item() / sigma - 1) < 0.06 and abs(diff.mean().item()) < 0.005
    assert whole.min() >= -1 and whole.max() <= 1
    # Another seed, other noise; without noise the batch is the paper's.
    other = GPSRDataModule(size=32, scale=4, lr_noise=sigma, seed=4).dataset("test", flip=False)
    assert not torch.equal(other[0]["lr"], ds[0]["lr"])
    plain = GPSRDataModule(size=32, scale=4).dataset("test", flip=False)[0]
    assert "lr_clean" not in plain and torch.equal(plain["lr"], ds[0]["lr_clean"])


def test_data_quantize_rounds_the_lr_to_8_bits():
    item = GPSRDataModule(size=32, scale=4, lr_quantize=True).dataset("test", flip=False)[0]
    lr255 = ops.to_unit(item["lr"]) * 255
    assert (lr255 - lr255.round()).abs().max() < 1e-4
    assert not torch.equal(item["lr"], item["lr_clean"])


@pytest.mark.parametrize("value", [-0.1, 1.5, "loud", True])
def test_bad_lr_noise_is_one_line_naming_it(value):
    with pytest.raises(ConfigError, match="data.lr_noise"):
        GPSRDataModule(size=32, scale=4, lr_noise=value)


# ---------------------------------------------------------------------- the noise model
def test_untrained_estimator_is_the_highpass_rms_and_reads_white_noise():
    """Its learned parts start at zero: the estimate is the RMS of the unit-norm Laplacian
    (computed here with numpy, replicate borders), which for white noise is sigma."""
    est = NoiseLevelEstimator(channels=3, width=8, depth=3, sigma_max=0.1)
    gen = torch.Generator().manual_seed(0)
    y = torch.rand(2, 3, 9, 11, generator=gen)
    a = np.pad(y.double().numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    lap = 4 * a[..., 1:-1, 1:-1] - a[..., :-2, 1:-1] - a[..., 2:, 1:-1]
    lap = (lap - a[..., 1:-1, :-2] - a[..., 1:-1, 2:]) / np.sqrt(20)
    ref = np.sqrt((lap**2).reshape(2, -1).mean(1))
    assert np.allclose(est(y).detach().double().numpy(), ref, rtol=1e-5)
    flat = 0.5 + 0.03 * torch.randn(1, 3, 256, 256, generator=gen)
    assert abs(est(flat).item() / 0.03 - 1) < 0.02


def test_denoiser_is_the_identity_without_noise_and_any_size_works():
    model = randomize_(LRNoiseModel(width=8, depth=3, estimator_width=8, estimator_depth=3))
    for shape in [(2, 3, 1, 1), (1, 3, 3, 5), (1, 3, 16, 9)]:
        y = torch.rand(shape)
        assert torch.equal(model.denoise(y, torch.zeros(shape[0])), y)
        assert model.denoise(y, torch.full((shape[0],), 0.05)).shape == y.shape
        assert model.estimate(y).shape == (shape[0],)


def test_noise_model_losses_target_the_total_noise_level(monkeypatch):
    """The estimator's target combines the Gaussian level with 8-bit rounding's
    1/(255 sqrt(12)); the denoiser's loss leaves noise-free images out. Checked with an
    estimator that returns its targets (loss 0) and a denoiser that returns the true noise."""
    model = LRNoiseModel(width=8, depth=3, estimator_width=8, estimator_depth=3)
    gen = torch.Generator().manual_seed(1)
    clean = torch.rand(4, 3, 6, 6, generator=gen) * 0.6 + 0.2
    sigma = torch.tensor([0.0, 0.0, 0.03, 0.06])
    quantized = torch.tensor([False, True, True, False])
    noise = torch.randn(clean.shape, generator=gen)
    total = (sigma**2 + quantized.float() / (12 * 255**2)).sqrt()
    noisy = ops.noisy_measurement(clean, sigma, noise)
    noisy = torch.where(quantized[:, None, None, None], ops.quantize_8bit(noisy), noisy)
    monkeypatch.setattr(model.estimator, "forward", lambda y: total)
    level = total.clamp(min=ops.QUANT_NOISE_STD)
    truth = (noisy - clean) / level[:, None, None, None]
    monkeypatch.setattr(model.denoiser, "noise", lambda y, s: truth)
    terms = noise_model_losses(model, clean, sigma, quantized, noise)
    assert terms["estimate"].item() < 1e-10 and terms["denoise"].item() < 1e-10
    # Off by 5 on image 0 (no noise at all: left out) and by 1 on the others: loss 1.
    off = torch.tensor([5.0, 1.0, 1.0, 1.0])[:, None, None, None]
    monkeypatch.setattr(model.denoiser, "noise", lambda y, s: truth + off)
    assert (
        abs(noise_model_losses(model, clean, sigma, quantized, noise)["denoise"].item() - 1) < 1e-6
    )


# ---------------------------------------------------------------------- noise-ball projection
def _slsqp_ball(x, y, scale, sigma):
    """The projection onto {x in [0, 1]: ||D x - y||^2 <= m sigma^2} (m = the image's LR
    values), by scipy's SLSQP on the dense Kronecker operator."""
    _, c, H, W = x.shape
    A_h, A_w = ops.degradation_matrix(H, scale).numpy(), ops.degradation_matrix(W, scale).numpy()
    K = np.kron(A_h, A_w)
    x0 = x[0].double().numpy().reshape(c, -1)
    yy = y[0].double().numpy().reshape(c, -1)
    r2 = yy.size * sigma**2

    def resid(v):
        return (K @ v.reshape(c, -1).T).T - yy

    res = minimize(
        lambda v: (0.5 * ((v - x0.ravel()) ** 2).sum(), v - x0.ravel()),
        np.clip(x0.ravel(), 0, 1),
        jac=True,
        method="SLSQP",
        bounds=[(0, 1)] * x0.size,
        constraints=[
            {
                "type": "ineq",
                "fun": lambda v: r2 - (resid(v) ** 2).sum(),
                "jac": lambda v: (-2 * (K.T @ resid(v).T).T).ravel(),
            }
        ],
        options={"maxiter": 1000, "ftol": 1e-15},
    )
    return torch.from_numpy(res.x.reshape(x.shape[1:]))


@pytest.mark.parametrize("scale,side", [(2, 8), (4, 16)])
def test_noise_ball_projection_matches_a_generic_solver(scale, side):
    """Per image (the ball spans all channels, not one channel at a time), against SLSQP:
    an image far from y (the ball active, partly out of the box) and one already inside."""
    gen = torch.Generator().manual_seed(scale)
    clean = torch.rand(2, 2, side, side, generator=gen, dtype=torch.float64)
    y = ops.degrade(clean, scale) + 0.05 * torch.randn(
        2, 2, side // scale, side // scale, generator=gen, dtype=torch.float64
    )
    x = clean * 1.3 - 0.15 + 0.3 * torch.randn(clean.shape, generator=gen, dtype=torch.float64)
    sigma = torch.tensor([0.03, 0.3], dtype=torch.float64)
    xp, steps = project_noise_ball(x, y, scale, sigma, rtol=1e-7)
    assert xp.min() >= 0 and xp.max() <= 1
    ratio = ((ops.degrade(xp, scale) - y) ** 2).flatten(1).mean(1) / sigma**2
    assert ratio[0] <= 1 and ratio[0] > 1 - 1e-7 and steps[0] > 0
    assert torch.equal(xp[1], x[1].clamp(0, 1)) and ratio[1] < 1  # inside: clamp(x) itself
    ref = _slsqp_ball(x[:1], y[:1], scale, 0.03)
    assert (xp[0] - ref).abs().max() < 2e-5
    # A wrong radius (one channel's values, not the image's) lands elsewhere.
    wrong, _ = project_noise_ball(x[:1], y[:1], scale, 0.03 / 2**0.5, rtol=1e-7)
    assert (wrong[0] - ref).abs().max() > 1e-3


def test_noise_ball_projection_with_zero_sigma_is_the_exact_projection():
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(2, 3, 32, 32, generator=gen)
    y = ops.degrade(torch.rand(2, 3, 32, 32, generator=gen), 4)
    exact, steps = project_consistent_box(x, y, 4)
    mixed, msteps = project_noise_ball(x, y, 4, torch.tensor([0.0, 0.0]))
    assert torch.equal(mixed, exact) and torch.equal(msteps, steps)
    with pytest.raises(ConfigError, match="sigma"):
        project_noise_ball(x, y, 4, -0.1)


# ---------------------------------------------------------------------- the discrepancy ratio
def test_discrepancy_ratio_of_pure_noise_at_its_own_sigma_is_about_one():
    """The clean HR against an LR with noise of std sigma: ||D x - y||^2 / (m sigma^2) is the
    noise's mean square over sigma^2; checked against a dense-operator computation (numpy)
    and against 1 (a ratio divided by sigma, not sigma^2, or by HR pixels, fails)."""
    gen = torch.Generator().manual_seed(0)
    hr = torch.rand(4, 3, 64, 64, generator=gen)
    sigma = torch.tensor([0.01, 0.02, 0.05, 0.1])
    y = ops.degrade(hr, 4) + sigma[:, None, None, None] * torch.randn(4, 3, 16, 16, generator=gen)
    metric = DiscrepancyRatio(4)
    metric.update(hr, y, sigma)
    A = ops.degradation_matrix(64, 4).numpy()
    dense = [
        np.mean(
            [
                ((A @ hr[i, c].double().numpy() @ A.T - y[i, c].double().numpy()) ** 2).sum()
                for c in range(3)
            ]
        )
        / (16 * 16 * sigma[i].item() ** 2)
        for i in range(4)
    ]
    assert abs(metric.compute().item() - np.mean(dense)) < 1e-6
    assert abs(metric.compute_worst().item() - max(dense)) < 1e-6
    assert all(abs(d - 1) < 0.15 for d in dense) and abs(np.mean(dense) - 1) < 0.08
    skip = DiscrepancyRatio(4)
    skip.update(hr, y, torch.tensor([0.0, 0.02, 0.0, 0.0]))  # sigma 0: no ratio
    assert abs(skip.compute().item() - dense[1]) < 1e-6


def test_sr_metrics_report_clean_consistency_and_ratio():
    gen = torch.Generator().manual_seed(2)
    hr, sr = torch.rand(2, 3, 32, 32, generator=gen), torch.rand(2, 3, 32, 32, generator=gen)
    clean = ops.degrade(hr, 4)
    noisy = clean + 0.05 * torch.randn(clean.shape, generator=gen)
    m = SRMetrics(4, clean=True, discrepancy=True)
    m.update(sr, hr, noisy, clean, torch.full((2,), 0.05))
    out = m.compute(worst=True)
    mse = lambda a, b: ((ops.degrade(sr.double(), 4) - b.double()) ** 2).flatten(1).mean(1)  # noqa: E731
    assert abs(out["consistency"] - mse(sr, noisy).mean().item() / 1e-5) < 1e-3
    assert abs(out["consistency_clean"] - mse(sr, clean).mean().item() / 1e-5) < 1e-3
    assert abs(out["discrepancy_ratio"] - (mse(sr, noisy) / 0.05**2).mean().item()) < 1e-6
    assert set(out) == {
        "psnr", "ssim", "consistency", "consistency_max", "consistency_clean",
        "consistency_clean_max", "discrepancy_ratio", "discrepancy_ratio_max",
    }  # fmt: skip
    plain = SRMetrics(4)
    plain.update(sr, hr, clean)
    assert set(plain.compute()) == {"psnr", "ssim", "consistency"}


# ---------------------------------------------------------------------- noise-aware sampling
def _model(noise: bool = True) -> GPSR:
    flow = tiny_flow(scale=4, std=0.05)
    unet = randomize_(UNet(in_channels=12, out_channels=9, **SMALL_UNET), std=0.02).eval()
    stats = LatentStats(9)
    model = LRNoiseModel(width=8, depth=3, estimator_width=8, estimator_depth=3)
    return GPSR(flow, unet, GaussianDiffusion(1000, prediction="x0"), stats,
                randomize_(model, std=0.05).eval() if noise else None)  # fmt: skip


def test_sigma_y_zero_is_the_paper_sampler_bit_for_bit():
    with_noise, plain = _model(noise=True), _model(noise=False)
    lr = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = plain.super_resolve(lr, steps=3, seed=0, samples=2, project=True)
    for model in (with_noise, plain):
        for zero in (0, 0.0, torch.zeros(2)):
            out = model.super_resolve(lr, steps=3, seed=0, samples=2, project=True, sigma_y=zero)
            assert torch.equal(out, ref)


def test_noise_aware_sampling_conditions_on_the_denoised_lr_and_projects_into_the_ball():
    """With sigma_y > 0 the sample is the paper's sampler run on the noise model's estimate
    of the clean LR; projected, it lies within the noise of the given LR and in [0, 1]."""
    model = _model()
    gen = torch.Generator().manual_seed(1)
    lr = (
        torch.rand(2, 3, 8, 8, generator=gen) * 0.8
        + 0.1
        + 0.05 * torch.randn(2, 3, 8, 8, generator=gen)
    ).clamp(0, 1)
    sigma = torch.tensor([0.05, 0.02])
    out = model.super_resolve(lr, steps=3, seed=0, sigma_y=sigma)
    denoised = model.noise.denoise(lr, sigma)
    assert not torch.equal(denoised, lr)
    assert torch.equal(out, model.super_resolve(denoised, steps=3, seed=0))
    proj = model.super_resolve(lr, steps=3, seed=0, sigma_y=sigma, project=True)
    ratio = ((ops.degrade(proj.double(), 4) - lr.double()) ** 2).flatten(1).mean(
        1
    ) / sigma.double() ** 2
    assert (ratio <= 1 + 1e-6).all() and proj.min() >= 0 and proj.max() <= 1
    auto = model.noise_level(lr, "auto")
    assert torch.equal(auto, model.noise.estimate(lr))
    assert torch.equal(
        model.super_resolve(lr, steps=3, seed=0, sigma_y="auto"),
        model.super_resolve(lr, steps=3, seed=0, sigma_y=auto),
    )


@pytest.mark.parametrize(
    "noise,value,message",
    [
        (False, 0.05, "noise_ckpt="),
        (False, "auto", "sampler.sigma_y=auto needs the LR noise model"),
        (True, -0.01, "sampler.sigma_y must be a noise std >= 0"),
        (True, 0.5, "above the noise levels the noise model was trained on"),
        (True, "loud", "sampler.sigma_y must be a noise std >= 0 in [0, 1] pixel units or 'auto'"),
        (True, float("nan"), "sampler.sigma_y must be a noise std"),
    ],
)
def test_bad_sigma_y_is_one_line_naming_it(noise, value, message):
    model = _model(noise=noise)
    with pytest.raises(ConfigError, match="sampler.sigma_y|noise_ckpt") as err:
        model.super_resolve(torch.rand(1, 3, 8, 8), steps=1, sigma_y=value)
    assert message in str(err.value)


# ---------------------------------------------------------------------- end to end (slow)
@pytest.mark.slow
def test_noisy_evaluation_and_sweep_report_the_noise_metrics(tmp_path, ddpm_ckpt, noise_ckpt):
    """gpsr.evaluate on noisy LR with the estimated sigma: every method gets consistency
    with the clean LR and the discrepancy ratio, the projection keeps every image within the
    noise; a noisy NFE sweep reports them too."""
    import json

    from tests.helpers import run_cli

    out = tmp_path / "eval"
    run_cli(
        "evaluate",
        f"ckpt={ddpm_ckpt}",
        f"noise_ckpt={noise_ckpt}",
        "data.lr_noise=0.05",
        "sampler.sigma_y=auto",
        "sampler.steps=2",
        "sampler.project=true",
        "data.demo_test=6",
        "progress=false",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
    )
    result = json.loads((out / "metrics.json").read_text())
    for name, m in result["methods"].items():
        assert {
            "consistency",
            "consistency_clean",
            "discrepancy_ratio",
            "discrepancy_ratio_max",
        } <= set(m), name
    assert result["methods"]["gpsr_projected"]["discrepancy_ratio_max"] <= 1 + 1e-6
    assert result["noise"]["lr_noise"] == 0.05 and result["noise"]["sigma_y"] == "auto"
    assert 0 < result["noise"]["sigma_used"]["min"] <= result["noise"]["sigma_used"]["max"]
    text = (out / "metrics.md").read_text()
    assert "Consistency clean (x1e-5)" in text and "Discrepancy ratio mean / max" in text
    sweep = tmp_path / "sweep"
    run_cli(
        "evaluate",
        "-m",
        f"ckpt={ddpm_ckpt}",
        f"noise_ckpt={noise_ckpt}",
        "sampler.steps=1,2",
        "data.lr_noise=0.05",
        "sampler.sigma_y=0.05",
        "data.demo_test=4",
        "diagnostic_buckets=0",
        "progress=false",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    report = (sweep / "report.md").read_text()
    assert "| gpsr | 2+1 |" in report and "Discrepancy ratio mean / max" in report


@pytest.mark.slow
def test_noise_settings_errors_are_one_line(tmp_path, ddpm_ckpt, noise_ckpt):
    from tests.helpers import run_cli

    def fails(module, *args):
        proc = run_cli(
            module, *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False
        )
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        return proc.stderr

    err = fails("evaluate", f"ckpt={ddpm_ckpt}", "sampler.sigma_y=0.05")
    assert "gpsr: error: sampler.sigma_y=0.05 needs the LR noise model: set noise_ckpt=" in err
    # The wrong checkpoint in either place: the same one-line errors, checked in-process.
    from gpsr.utils.checkpoint import CheckpointError

    with pytest.raises(ConfigError, match="is the LR noise model .* give it as noise_ckpt="):
        GPSR.load(noise_ckpt)
    with pytest.raises(CheckpointError, match="is a 'ddpm' checkpoint, but a 'noise' checkpoint"):
        GPSR.load(ddpm_ckpt, noise_ckpt=ddpm_ckpt)
    err = fails("sample", f"ckpt={ddpm_ckpt}", "input=x.png", "data.lr_noise=0.05")
    assert "gpsr.sample super-resolves LR images as given" in err and "sampler.sigma_y" in err


@pytest.mark.slow
def test_sample_cli_estimates_and_reports_the_noise(tmp_path, ddpm_ckpt, noise_ckpt):
    import skimage.data
    from PIL import Image

    from tests.helpers import run_cli

    src = tmp_path / "lr"
    src.mkdir()
    photo = torch.from_numpy(skimage.data.coffee()[:128:4, :128:4].copy()).permute(2, 0, 1)[None]
    noisy = ops.noisy_measurement(photo / 255.0, 0.05, torch.randn(photo.shape), quantize=True)
    Image.fromarray((noisy[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(src / "cup.png")
    proc = run_cli(
        "sample",
        f"ckpt={ddpm_ckpt}",
        f"noise_ckpt={noise_ckpt}",
        f"input={src}",
        f"output={tmp_path / 'sr'}",
        "sampler.sigma_y=auto",
        "sampler.steps=2",
        "sampler.project=true",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert "cup.png: estimated noise sigma" in proc.stdout
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("cup.png: 32x32"))
    assert "discrepancy ratio (1 = within the noise): sample" in line
    assert float(line.split("projected ")[2].split(",")[0]) <= 1 + 1e-6  # [1]: its time
    assert (tmp_path / "sr" / "cup_sr.png").is_file()
