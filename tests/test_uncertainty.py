"""Calibrated intervals: the Hoeffding-Bentkus bound against its formula, the interval
arithmetic against direct computation, the guarantee over 200 calibrations of a model whose
truth is known, and the calibration file's checks."""

import json
import math

import numpy as np
import pytest
import torch

from gpsr.uncertainty import (
    IntervalMetrics,
    calibrate_lambda,
    centre_spread,
    hb_upper_bound,
    images_needed,
    interval,
    losses_on_grid,
    needed_lambda,
    width_on_grid,
)
from tests.helpers import compose_cfg


def _hb_bound_by_scanning(risk_hat: float, n: int, delta: float) -> float:
    """The same bound from its definition, independently: exact binomial sums (math.comb),
    Hoeffding's exponent, and a scan over r in steps of 1e-5."""
    k = math.ceil(n * risk_hat - 1e-12)
    best = risk_hat
    for r in np.arange(risk_hat, 1.0, 1e-5):
        a = min(risk_hat, r)
        h1 = (a * math.log(a / r) if a > 0 else 0.0) + (
            (1 - a) * math.log((1 - a) / (1 - r)) if a < 1 else 0.0
        )
        cdf = sum(math.comb(n, i) * r**i * (1 - r) ** (n - i) for i in range(k + 1))
        if min(math.exp(-n * h1), math.e * cdf) >= delta:
            best = r
        else:
            break
    return best


@pytest.mark.parametrize(
    "risk_hat, n, delta", [(0.0, 8, 0.1), (0.05, 50, 0.1), (0.02, 200, 0.05), (0.3, 30, 0.2)]
)
def test_hb_bound_agrees_with_its_formula(risk_hat, n, delta):
    assert float(hb_upper_bound(risk_hat, n, delta)) == pytest.approx(
        _hb_bound_by_scanning(risk_hat, n, delta), abs=2e-5
    )


def test_images_needed_is_where_the_zero_loss_bound_meets_alpha():
    # At zero loss both p-values are (1 - r)^n up to Bentkus' factor e, so the bound is
    # 1 - delta^(1/n), below alpha from n > log(delta) / log(1 - alpha) on.
    for alpha, delta in ((0.1, 0.1), (0.05, 0.1), (0.2, 0.01), (0.3, 0.3)):
        n = math.floor(math.log(delta) / math.log(1 - alpha)) + 1
        assert images_needed(alpha, delta) == n
        assert float(hb_upper_bound(0.0, n, delta)) == pytest.approx(1 - delta ** (1 / n), abs=1e-8)


def test_losses_and_widths_on_a_grid_match_the_intervals_computed_directly():
    gen = torch.Generator().manual_seed(0)
    samples = torch.rand(3, 5, 3, 8, 8, generator=gen) * 0.6 + 0.2
    samples[0, :, 0] = 0.0  # every sample agrees: only the floor's width, clipped at 0
    hr = torch.rand(3, 3, 8, 8, generator=gen)
    centre, spread = centre_spread(samples)
    assert torch.allclose(centre, samples.mean(1)) and torch.allclose(
        spread, samples.std(1) + 0.5 / 255
    )
    grid = np.array([0.0, 0.3, 1.0, 2.5, 40.0])
    losses = losses_on_grid(needed_lambda(hr, centre, spread), grid)
    widths = width_on_grid(centre, spread, grid)
    for j, lam in enumerate(grid):
        lower, upper = interval(centre.double(), spread.double(), float(lam))
        outside = ((hr < lower) | (hr > upper)).double().flatten(1).mean(1)
        np.testing.assert_allclose(losses[:, j], outside.numpy(), atol=1e-12)
        np.testing.assert_allclose(widths[:, j], (upper - lower).flatten(1).mean(1), atol=1e-12)
    metric = IntervalMetrics(2.5)
    metric.update(samples, hr)
    out = metric.compute()
    assert out["miscoverage"] == pytest.approx(losses[:, 3].mean())
    assert out["interval_width_uncalibrated"] == pytest.approx(widths[:, 2].mean())


def test_calibration_keeps_the_risk_below_alpha_in_all_but_a_delta_of_calibrations():
    """A sampler whose truth is known: the HR pixel and the K samples are independent draws
    of N(mu, sigma^2), so the mean +/- lambda std interval's risk at each lambda is known (by
    a large independent Monte Carlo). Over 200 independent calibrations on 60 images each,
    the risk at the chosen lambda exceeds alpha in at most a delta fraction of them (plus
    three binomial standard deviations of 200 trials); the empirical-risk rule (no bound)
    fails far more often."""
    alpha, delta, k, n, pixels = 0.1, 0.1, 4, 60, 48
    gen = torch.Generator().manual_seed(1)
    grid = np.round(np.arange(0, 1501) * 0.01, 2)

    def draw(images: int) -> np.ndarray:
        mu = torch.rand(images, 1, 1, 1, pixels, generator=gen) * 0.5 + 0.25
        sigma = torch.rand(images, 1, 1, 1, 1, generator=gen) * 0.08 + 0.02
        samples = mu + sigma * torch.randn(images, k, 1, 1, pixels, generator=gen)
        truth = mu[:, 0] + sigma[:, 0] * torch.randn(images, 1, 1, pixels, generator=gen)
        centre, spread = centre_spread(samples)
        return losses_on_grid(needed_lambda(truth, centre, spread), grid)

    true_risk = draw(20000).mean(0)  # (L,), standard error < 0.001
    bad_rcps = bad_naive = 0
    for _ in range(200):
        losses = draw(n)
        lam, _ = calibrate_lambda(losses, alpha, delta, grid)
        bad_rcps += true_risk[int(round(lam / 0.01))] > alpha
        naive = grid[np.nonzero(losses.mean(0) <= alpha)[0][0]]
        bad_naive += true_risk[int(round(naive / 0.01))] > alpha
    slack = 3 * math.sqrt(200 * delta * (1 - delta))
    assert bad_rcps <= 200 * delta + slack
    assert bad_naive > 200 * delta + slack  # the test can tell a rule without the bound


@pytest.fixture(scope="module")
def calibration(ddpm_ckpt, tmp_path_factory):
    """A calibration of the small DDPM on the demo's 8 validation tiles (alpha = delta = 0.3
    needs 4 images), K = 2 samples of 1+1 NFEs."""
    from gpsr.calibrate import calibrate

    out = tmp_path_factory.mktemp("calibrate")
    cfg = compose_cfg(
        [f"ckpt={ddpm_ckpt}", "risk.alpha=0.3", "risk.delta=0.3", "sampler.samples=2",
         "sampler.steps=1", "progress=false"],
        name="calibrate", output_dir=out,
    )  # fmt: skip
    record = calibrate(cfg)
    return out / "calibration.json", record


def test_calibrate_writes_a_sealed_record_tied_to_its_checkpoint(calibration, ddpm_ckpt):
    import hashlib

    path, record = calibration
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved["ckpt_sha256"] == hashlib.sha256(ddpm_ckpt.read_bytes()).hexdigest()
    assert saved["images"] == 8 and saved["pixels"] == 8 * 3 * 32 * 32 and saved["split"] == "val"
    assert saved["sampler"]["samples"] == 2 and saved["sampler"]["steps"] == 1
    assert saved["bound"] < 0.3 and saved["empirical_risk"] <= saved["bound"]
    assert saved["lambda"] > 0 and saved["interval_width"] > 0


def test_evaluate_reports_calibrated_and_uncalibrated_intervals(calibration, ddpm_ckpt, tmp_path):
    from gpsr.evaluate import evaluate

    path, record = calibration
    cfg = compose_cfg(
        [f"ckpt={ddpm_ckpt}", f"calibration={path}", "sampler.samples=2", "sampler.steps=1",
         "progress=false", "baselines=[bicubic]", "diagnostic_buckets=0"],
        name="evaluate", output_dir=tmp_path,
    )  # fmt: skip
    gpsr = evaluate(cfg)["methods"]["gpsr"]
    for key in ("miscoverage", "interval_width", "miscoverage_uncalibrated",
                "interval_width_uncalibrated"):  # fmt: skip
        assert 0 <= gpsr[key] <= 1, key
    assert gpsr["interval_width"] > gpsr["interval_width_uncalibrated"]  # lambda > 1 here
    assert "Outside interval" in (tmp_path / "metrics.md").read_text()


@pytest.mark.parametrize(
    "override, words",
    [
        ("sampler.steps=2", "sampler.steps=2 (calibrated: 1)"),
        ("sampler.samples=3", "sampler.samples=3 (calibrated: 2)"),
        ("ema=false", "ema=False (calibrated: True)"),
        ("sampler.precision=bf16", "sampler.precision=bf16 (calibrated: fp32)"),
    ],
)
def test_a_calibration_is_refused_with_other_settings(calibration, ddpm_ckpt, override, words):
    from gpsr.calibrate import load_calibration, sampler_record
    from gpsr.utils.errors import ConfigError

    base = {"sampler.samples=2", "sampler.steps=1"}
    key = override.split("=")[0]
    args = [a for a in base if not a.startswith(key)] + [override]
    cfg = compose_cfg([f"ckpt={ddpm_ckpt}", *args], name="evaluate")
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_calibration(calibration[0], ddpm_ckpt, sampler_record(cfg, cfg.sampler.steps))


def test_a_calibration_of_another_checkpoint_or_edited_by_hand_is_refused(
    calibration, ddpm_ckpt, flow_ckpt, tmp_path
):
    from gpsr.calibrate import _seal, load_calibration, sampler_record
    from gpsr.utils.errors import ConfigError

    cfg = compose_cfg(
        [f"ckpt={ddpm_ckpt}", "sampler.samples=2", "sampler.steps=1"], name="evaluate"
    )
    record = sampler_record(cfg, 1)
    assert load_calibration(calibration[0], ddpm_ckpt, record)["lambda"] > 0
    with pytest.raises(ConfigError, match="another checkpoint"):
        load_calibration(calibration[0], flow_ckpt, record)
    edited = json.loads(calibration[0].read_text())
    legacy = json.loads(calibration[0].read_text())  # written before sampler.precision
    del legacy["sampler"]["precision"]
    legacy["seal"] = _seal(legacy)
    (tmp_path / "legacy.json").write_text(json.dumps(legacy))
    assert load_calibration(tmp_path / "legacy.json", ddpm_ckpt, record)["lambda"] > 0
    edited["lambda"] = 0.5  # a narrower interval, by hand
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    with pytest.raises(ConfigError, match="changed after gpsr.calibrate wrote it"):
        load_calibration(tmp_path / "edited.json", ddpm_ckpt, record)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a gpsr calibration file"):
        load_calibration(tmp_path / "junk.json", ddpm_ckpt, record)


@pytest.mark.parametrize("made", [None, "older", "current"])
def test_a_bf16_calibration_holds_only_for_its_bf16_arithmetic(
    calibration, ddpm_ckpt, tmp_path, made
):
    """bf16 samples change when the bf16 arithmetic does (fp32's never do), so a bf16
    calibration records `BF16_REVISION`: one of an earlier revision, or from before the
    revision was recorded, is refused in one line; one of the current revision is used."""
    from gpsr.calibrate import _seal, load_calibration, sampler_record
    from gpsr.models.bf16 import BF16_REVISION
    from gpsr.utils.errors import ConfigError

    cfg = compose_cfg(
        [f"ckpt={ddpm_ckpt}", "sampler.samples=2", "sampler.steps=1", "sampler.precision=bf16"],
        name="evaluate",
    )
    record = sampler_record(cfg, 1)
    assert record["precision"] == "bf16" and record["bf16_revision"] == BF16_REVISION
    cal = json.loads(calibration[0].read_text())
    assert "bf16_revision" not in cal["sampler"]  # an fp32 calibration records none
    cal["sampler"]["precision"] = "bf16"
    if made is not None:
        cal["sampler"]["bf16_revision"] = BF16_REVISION - (made == "older")
    cal["seal"] = _seal(cal)
    path = tmp_path / "bf16.json"
    path.write_text(json.dumps(cal))
    if made == "current":
        assert load_calibration(path, ddpm_ckpt, record)["lambda"] > 0
        return
    was = "an earlier one" if made is None else BF16_REVISION - 1
    with pytest.raises(ConfigError) as err:
        load_calibration(path, ddpm_ckpt, record)
    assert str(err.value) == (
        f"calibration={path} was made with other sampler settings: bf16 arithmetic revision "
        f"{BF16_REVISION} (calibrated: {was}); use those or calibrate again"
    )


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["risk.alpha=1.5"], "risk.alpha must be a number in (0, 1)"),
        (["risk.delta=0"], "risk.delta must be a number in (0, 1)"),
        (["sampler.samples=1"], "sampler.samples must be at least 2"),
        (["split=test"], "never uses the test split"),
        ([], "has 8 images; with risk.alpha=0.1 and risk.delta=0.1 the bound cannot fall below "
             "alpha with fewer than 22"),
    ],
)  # fmt: skip
def test_bad_calibration_settings_are_one_line_before_any_sampling(
    overrides, words, tmp_path, monkeypatch, ddpm_ckpt
):
    from gpsr import calibrate as module
    from gpsr.inference import GPSR
    from gpsr.utils.errors import ConfigError

    monkeypatch.setattr(GPSR, "super_resolve", lambda *a, **k: pytest.fail("sampled"))
    cfg = compose_cfg([f"ckpt={ddpm_ckpt}", *overrides], name="calibrate", output_dir=tmp_path)
    with pytest.raises(ConfigError) as err:
        module.calibrate(cfg)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_sample_writes_interval_maps_with_a_calibration(calibration, ddpm_ckpt, tmp_path):
    from PIL import Image

    from gpsr.sample import sample_images

    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.full((4, 4, 3), 120, np.uint8)).save(src / "flat.png")
    cfg = compose_cfg(
        [f"ckpt={ddpm_ckpt}", f"input={src}", f"output={tmp_path / 'out'}",
         f"calibration={calibration[0]}", "sampler.samples=2", "sampler.steps=1",
         "save_float=true"],
        name="sample", output_dir=tmp_path,
    )  # fmt: skip
    assert sample_images(cfg) == 0
    out = tmp_path / "out"
    lower, upper = np.load(out / "flat_lower.npy"), np.load(out / "flat_upper.npy")
    width = np.load(out / "flat_width.npy")
    s0, s1 = np.load(out / "flat_sr0.npy"), np.load(out / "flat_sr1.npy")
    lam = calibration[1]["lambda"]
    centre, spread = (s0 + s1) / 2, np.abs(s0 - s1) / math.sqrt(2) + 0.5 / 255
    np.testing.assert_allclose(lower, np.clip(centre - lam * spread, 0, 1), atol=1e-6)
    np.testing.assert_allclose(upper, np.clip(centre + lam * spread, 0, 1), atol=1e-6)
    np.testing.assert_allclose(width, upper - lower, atol=1e-6)
    png = np.asarray(Image.open(out / "flat_width.png"))
    assert png.shape[0] > 32 and png.shape[2] == 3  # the map above its colour bar


def test_the_results_table_shows_interval_columns_when_a_row_has_them():
    from gpsr.report import results_table

    base = {"nfe": "7+1", "psnr": 27.0, "ssim": 0.7, "consistency": 1.0, "seconds_per_image": 0.1}
    rows = [
        ("bicubic", dict(base, nfe="0")),
        ("gpsr", dict(base, miscoverage=0.03, interval_width=0.18,
                      miscoverage_uncalibrated=0.46, interval_width_uncalibrated=0.032)),
        ("gpsr@1", dict(base, miscoverage_uncalibrated=0.5, interval_width_uncalibrated=0.02)),
    ]  # fmt: skip
    lines = results_table(rows).splitlines()
    assert "Outside interval calibrated / lambda=1" in lines[0]
    assert lines[1].count("|---") == lines[0].count("|") - 1
    assert lines[2].endswith("| | | 0.1000 |")  # no interval: empty cells
    assert "| 0.0300 / 0.4600 | 0.1800 / 0.0320 |" in lines[3]
    assert "| - / 0.5000 | - / 0.0200 |" in lines[4]


@pytest.mark.slow
def test_calibrate_command_line(ddpm_ckpt, tmp_path):
    """`python -m gpsr.calibrate` as a user runs it: a bad setting is one line, exit 1 (the
    run itself is the in-process `calibration` fixture, on the same config)."""
    from tests.helpers import run_cli

    bad = run_cli("calibrate", f"ckpt={ddpm_ckpt}", "risk.alpha=1.5", cwd=tmp_path, check=False)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == "gpsr: error: risk.alpha must be a number in (0, 1), got 1.5"


def test_precision_auto_follows_the_calibration(calibration, ddpm_ckpt, monkeypatch):
    """A calibration holds for the precision it was made with: `sampler.precision=auto`
    takes it (fp32 here) even on a CPU where auto would pick bf16, instead of being refused;
    an explicit other precision is still refused."""
    from gpsr.calibrate import calibration_for
    from gpsr.models import gpsr as gpsr_module
    from gpsr.utils.errors import ConfigError

    monkeypatch.setattr(gpsr_module, "cpu_has_bf16_matrix_units", lambda: True)
    args = [f"ckpt={ddpm_ckpt}", f"calibration={calibration[0]}", "sampler.samples=2",
            "sampler.steps=1", "device=cpu"]  # fmt: skip
    cfg = compose_cfg([*args, "sampler.precision=auto"], name="sample")
    assert calibration_for(cfg, 1)["lambda"] > 0 and cfg.sampler.precision == "fp32"
    cfg = compose_cfg([*args, "sampler.precision=bf16"], name="sample")
    with pytest.raises(ConfigError, match=r"sampler.precision=bf16 \(calibrated: fp32\)"):
        calibration_for(cfg, 1)
