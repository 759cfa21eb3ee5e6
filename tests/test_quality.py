"""Weight-free quality metrics against independent references: scikit-image's YCbCr and
PSNR, numpy's FFT with explicit radial bins, scipy's 1-D Wasserstein distance, piq's MS-SSIM;
and their place in gpsr.evaluate (keys, the mean of K samples, the SR conventions)."""

import numpy as np
import pytest
import torch

from gpsr import ops, quality
from gpsr.metrics import SRMetrics
from tests.helpers import compose_cfg


def _images(n=3, size=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hr = torch.rand(n, 3, size, size, generator=gen)
    sr = (hr + 0.08 * torch.randn(n, 3, size, size, generator=gen)).clamp(0, 1)
    return sr, hr


def test_y_channel_psnr_and_border_crop_match_scikit_image():
    from skimage.color import rgb2ycbcr
    from skimage.metrics import peak_signal_noise_ratio

    sr, hr = _images()
    y = quality.to_y(hr)
    ref = rgb2ycbcr(hr[0].permute(1, 2, 0).double().numpy())[..., 0] / 255
    np.testing.assert_allclose(y[0, 0].numpy(), ref, atol=1e-6)
    m = SRMetrics(4, y_channel=True, crop=4)
    m.update(sr, hr, ops.degrade(hr, 4))
    expected = np.mean(
        [
            peak_signal_noise_ratio(
                rgb2ycbcr(h.permute(1, 2, 0).double().numpy())[4:-4, 4:-4, 0] / 255,
                rgb2ycbcr(s.permute(1, 2, 0).double().numpy())[4:-4, 4:-4, 0] / 255,
                data_range=1.0,
            )
            for s, h in zip(sr, hr)
        ]
    )
    assert m.compute()["psnr"] == pytest.approx(expected, abs=2e-3)


def _radial_psd_by_loops(img: np.ndarray) -> np.ndarray:
    """The radial spectrum of one (C, H, W) image, frequency by frequency."""
    c, h, w = img.shape
    bins = min(h, w) // 2
    sums, counts = np.zeros(bins), np.zeros(bins)
    for ch in range(c):
        f = np.fft.fft2(img[ch] - img[ch].mean())
        for i in range(h):
            for j in range(w):
                fy = i / h if i < (h + 1) // 2 else (i - h) / h
                fx = j / w if j < (w + 1) // 2 else (j - w) / w
                k = int(np.round(np.hypot(fy, fx) * min(h, w)))
                if 1 <= k <= bins:
                    sums[k - 1] += abs(f[i, j]) ** 2 / (h * w) / c
                    counts[k - 1] += 1 / c
    return sums / counts


def test_radial_spectrum_and_its_error_match_numpy():
    sr, hr = _images(n=2, size=24)
    hr = hr[..., :20]  # not square
    sr = sr[..., :20]
    got = quality.radial_psd(hr).numpy()
    for i in range(2):
        np.testing.assert_allclose(got[i], _radial_psd_by_loops(hr[i].double().numpy()), rtol=1e-10)
    a = np.stack([_radial_psd_by_loops(x.double().numpy()) for x in sr])
    b = np.stack([_radial_psd_by_loops(x.double().numpy()) for x in hr])
    half = a.shape[1] // 2
    ref = np.abs(np.log10(a[:, half:] + 1e-12) - np.log10(b[:, half:] + 1e-12)).mean(1)
    np.testing.assert_allclose(quality.per_image_psd_error(sr, hr).numpy(), ref, rtol=1e-9)
    assert quality.per_image_psd_error(hr, hr).abs().max() == 0


def test_blur_shows_in_the_spectrum_error_more_the_stronger_it_is():
    import torchvision.transforms.v2.functional as TF

    _, hr = _images(n=2, size=64)
    light, heavy = (quality.per_image_psd_error(TF.gaussian_blur(hr, 5, s), hr) for s in (0.6, 1.5))
    assert (light > 0.1).all() and (heavy > light).all()


def test_sliced_wasserstein_is_the_mean_1d_wasserstein_of_the_projections():
    from scipy.stats import wasserstein_distance

    gen = torch.Generator().manual_seed(3)
    a = torch.randn(200, 12, generator=gen, dtype=torch.float64)
    b = torch.randn(200, 12, generator=gen, dtype=torch.float64) * 1.5 + 0.3
    dirs = torch.randn(12, 40, generator=gen, dtype=torch.float64)
    got = quality.sliced_wasserstein(a, b, dirs=dirs).item()
    na = ((a - a.mean(0)) / a.std(0)).numpy()
    nb = ((b - b.mean(0)) / b.std(0)).numpy()
    unit = (dirs / dirs.norm(dim=0)).numpy()
    ref = np.mean([wasserstein_distance(na @ unit[:, j], nb @ unit[:, j]) for j in range(40)])
    assert got == pytest.approx(ref, rel=1e-10)
    assert quality.sliced_wasserstein(a, a).item() == 0


def test_ms_ssim_agrees_with_piq_where_five_scales_fit_and_uses_fewer_on_tiles():
    import piq

    sr, hr = _images(n=2, size=192)
    ours = quality.per_image_ms_ssim(sr, hr)
    theirs = piq.multi_scale_ssim(sr.double(), hr.double(), data_range=1.0, reduction="none")
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=2e-3)
    assert quality.ms_ssim_scales(192, 192) == 5 and quality.ms_ssim_scales(32, 32) == 2
    small = quality.per_image_ms_ssim(*_images(n=2, size=32))
    assert ((small > 0) & (small < 1)).all()


def test_the_weight_free_metrics_in_sr_metrics():
    sr, hr = _images(n=4)
    m = SRMetrics(4, extras=True)
    m.update(sr, hr, ops.degrade(hr, 4))
    out = m.compute()
    for key in ("ms_ssim", "haarpsi", "psd_error", "swd", "swd_spread"):
        assert np.isfinite(out[key]), key
    same = SRMetrics(4, extras=True)
    same.update(hr, hr, ops.degrade(hr, 4))
    same_out = same.compute()
    assert same_out["haarpsi"] == pytest.approx(1.0) and same_out["ms_ssim"] == pytest.approx(1.0)
    assert same_out["swd"] == 0 and same_out["psd_error"] == 0
    assert out["swd"] > 0 and out["haarpsi"] < 1
    halves = quality.SlicedWasserstein()
    halves.update(sr[:2], hr[:2])
    halves.update(sr[2:], hr[2:])
    assert halves.compute() == pytest.approx((out["swd"], out["swd_spread"]))  # any batching


def test_evaluate_reports_the_mean_of_k_samples_and_the_new_metrics(ddpm_ckpt, tmp_path):
    from gpsr.evaluate import evaluate

    cfg = compose_cfg(
        [f"ckpt={ddpm_ckpt}", "sampler.samples=2", "sampler.steps=1", "sampler.project=true",
         "progress=false", "baselines=[bicubic]", "diagnostic_buckets=0", "limit_batches=1"],
        name="evaluate", output_dir=tmp_path,
    )  # fmt: skip
    methods = evaluate(cfg)["methods"]
    assert {"gpsr", "gpsr_projected", "gpsr_mean", "gpsr_mean_projected"} <= set(methods)
    assert methods["gpsr_mean"]["nfe"] == "1+1 x2"
    for key in ("ms_ssim", "haarpsi", "psd_error", "swd", "swd_spread"):
        assert key in methods["bicubic"] and key in methods["gpsr_mean"], key
    assert methods["gpsr_mean_projected"]["consistency"] < 1e-3
    assert "MS-SSIM" in (tmp_path / "metrics.md").read_text()
    assert (tmp_path / "perception_distortion.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "override, words",
    [
        ("metrics.crop_border=-1", "metrics.crop_border must be an integer >= 0"),
        ("metrics.y_channel=maybe", "metrics.y_channel must be true or false"),
        ("metrics.crop_border=12", "metrics.crop_border=12 leaves too little"),
    ],
)
def test_bad_metric_settings_are_one_line(override, words, ddpm_ckpt, tmp_path):
    from gpsr.evaluate import evaluate
    from gpsr.utils.errors import ConfigError

    cfg = compose_cfg(
        [f"ckpt={ddpm_ckpt}", override, "sampler.steps=1", "progress=false", "limit_batches=1",
         "baselines=[bicubic]", "diagnostic_buckets=0"],
        name="evaluate", output_dir=tmp_path,
    )  # fmt: skip
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        evaluate(cfg)


def _random_alexnet_in_hub_cache(tmp_path, monkeypatch) -> None:
    """Random AlexNet weights, saved as torchvision's file in a fresh TORCH_HOME."""
    import torchvision

    from gpsr.learned import weight_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = weight_file("lpips_alex")
    assert path.parent == tmp_path / "torch" / "hub" / "checkpoints"
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)


def _random_vgg16_in_hub_cache(tmp_path, monkeypatch) -> None:
    """Random VGG-16 weights saved as torchvision's file in a fresh TORCH_HOME. LPIPS and
    DISTS use the convolutional features only; the classifier's 120 M entries (which
    torchvision's loader still expects) are stored as one broadcast zero each, so the file is
    59 MB instead of 528 MB."""
    import torchvision

    from gpsr.learned import weight_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = weight_file("lpips_vgg")
    assert path == weight_file("dists") and path.name == "vgg16-397923af.pth"
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    state = torchvision.models.vgg16(weights=None).state_dict()
    for key, value in state.items():
        if key.startswith("classifier"):
            state[key] = torch.zeros(1).expand(value.shape)
    torch.save(state, path)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_loads_weights_from_the_hub_cache_and_agrees_with_the_lpips_package(
    tmp_path, monkeypatch, net
):
    """The same random backbone, loaded offline by torchmetrics (gpsr) and by the authors'
    `lpips` package (their linear layers ship with each): the same per-image values, for
    AlexNet and for VGG-16 (each with its own layer taps and linear-weight file: a test of
    one would miss a wrong tap or a swapped file of the other)."""
    import lpips

    from gpsr.learned import build_learned

    if net == "alex":
        _random_alexnet_in_hub_cache(tmp_path, monkeypatch)
    else:
        _random_vgg16_in_hub_cache(tmp_path, monkeypatch)
    fn = build_learned([f"lpips_{net}"], torch.device("cpu"))[f"lpips_{net}"]
    sr, hr = _images(n=3, size=64)
    with torch.no_grad():
        reference = lpips.LPIPS(net=net, verbose=False)(sr * 2 - 1, hr * 2 - 1).flatten()
    np.testing.assert_allclose(fn(sr, hr).numpy(), reference.double().numpy(), rtol=1e-5)
    assert fn(hr, hr).abs().max() < 1e-6


def test_dists_agrees_with_the_authors_package_on_the_same_random_backbone(tmp_path, monkeypatch):
    """DISTS (torchmetrics' network, used by gpsr) against the authors' DISTS_pytorch built
    on the same random VGG-16 file and the same alpha / beta: the same per-image values, on a
    batch of different images (a mean over the wrong dimension would fail)."""
    from DISTS_pytorch import DISTS
    from torchmetrics.functional.image.dists import _PATH_WEIGHT_DISTS

    from gpsr.learned import build_learned

    _random_vgg16_in_hub_cache(tmp_path, monkeypatch)
    fn = build_learned(["dists"], torch.device("cpu"))["dists"]
    reference = DISTS(load_weights=False).eval()
    weights = torch.load(_PATH_WEIGHT_DISTS, weights_only=True)
    reference.alpha.data, reference.beta.data = weights["alpha"], weights["beta"]
    sr, hr = _images(n=3, size=64)
    with torch.no_grad():
        expected = reference(sr, hr).double().numpy()
    assert len(set(np.round(expected, 6))) == 3
    np.testing.assert_allclose(fn(sr, hr).numpy(), expected, rtol=1e-5)
    assert fn(hr, hr).abs().max() < 1e-5


@pytest.mark.parametrize(
    "name, file", [("lpips_alex", "alexnet-owt-7be5be79.pth"),
                   ("dists", "vgg16-397923af.pth"),
                   ("fid", "weights-inception-2015-12-05-6726825d.pth")]
)  # fmt: skip
def test_missing_learned_weights_are_refused_before_sampling(
    tmp_path, monkeypatch, ddpm_ckpt, name, file
):
    import urllib.error

    from gpsr import evaluate as module
    from gpsr.utils.errors import ConfigError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(module.GPSR, "super_resolve", lambda *a, **k: pytest.fail("sampled"))
    cfg = compose_cfg(
        [f"ckpt={ddpm_ckpt}", f"metrics.learned=[{name}]", "sampler.steps=1",
         "progress=false", "diagnostic_buckets=0"],
        name="evaluate", output_dir=tmp_path / "out",
    )  # fmt: skip
    with pytest.raises(ConfigError) as err:
        module.evaluate(cfg)
    msg = str(err.value)
    assert file in msg and str(tmp_path / "empty") in msg
    assert "no network" in msg and "\n" not in msg


def _random_inception_in_hub_cache(tmp_path, monkeypatch) -> None:
    """Random Inception-v3 weights in torch-fidelity's file format and name, in a fresh
    TORCH_HOME (the network built with its default initialisation, its state saved)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    from gpsr.learned import weight_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with monkeypatch.context() as m:
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["64"])
    path = weight_file("fid")
    path.parent.mkdir(parents=True)
    torch.save(net.state_dict(), path)


@pytest.mark.slow
def test_fid_and_kid_on_random_inception_weights_match_their_formulas(tmp_path, monkeypatch):
    """FID against the Frechet distance of the same features in float64 with scipy's sqrtm;
    KID against the unbiased MMD^2 with the cubic polynomial kernel, on one subset holding
    every image."""
    from scipy.linalg import sqrtm

    from gpsr.learned import _inception, build_set_metrics

    _random_inception_in_hub_cache(tmp_path, monkeypatch)
    sets = build_set_metrics(["fid", "kid"], feature=64)
    gen = torch.Generator().manual_seed(0)
    hr = torch.rand(40, 3, 32, 32, generator=gen)
    sr = (hr * 0.7 + 0.15 * torch.rand(40, 3, 32, 32, generator=gen)).clamp(0, 1)
    m = SRMetrics(4, sets=sets)
    m.update(sr, hr, ops.degrade(hr, 4))
    m.sets["kid"].subset_size = 40
    out = m.compute()
    net = _inception(64)
    with torch.no_grad():
        fr = net((hr * 255).round().byte()).double().numpy()
        ff = net((sr * 255).round().byte()).double().numpy()
    mu1, mu2 = fr.mean(0), ff.mean(0)
    s1, s2 = np.cov(fr, rowvar=False), np.cov(ff, rowvar=False)
    covmean = sqrtm(s1 @ s2).real
    fid = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    assert out["fid"] == pytest.approx(fid, rel=1e-3)
    d = fr.shape[1]
    kxx, kyy = (fr @ fr.T / d + 1) ** 3, (ff @ ff.T / d + 1) ** 3
    kxy = (fr @ ff.T / d + 1) ** 3
    n = fr.shape[0]
    mmd = (
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
        + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        - 2 * kxy.mean()
    )
    assert out["kid"] == pytest.approx(mmd, rel=1e-3)  # torchmetrics sums in float32


def test_an_inception_file_that_is_not_plain_weights_is_refused(tmp_path, monkeypatch):
    """torch-fidelity loads its weights without weights_only; gpsr checks the file first."""
    from gpsr.learned import build_set_metrics, weight_file
    from gpsr.utils.errors import ConfigError

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = weight_file("fid")
    path.parent.mkdir(parents=True)
    torch.save({"x": Evil()}, path)
    with pytest.raises(ConfigError, match="not a plain weights file"):
        build_set_metrics(["fid"])


def test_validation_logs_the_weight_free_metrics_when_asked(tmp_path):
    from gpsr.train import train

    overrides = [
        "stage=flow", "logger=csv", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", "trainer.max_steps=2",
        "trainer.val_check_interval=2", "data.batch_size=8", "data.demo_count=16",
        "callbacks.model_checkpoint.every_n_train_steps=2", "test_after_fit=false",
        "callbacks.metrics.extras=true",
    ]  # fmt: skip
    metrics = train(compose_cfg(overrides, output_dir=tmp_path))
    method = next(k.split("/")[1] for k in metrics if k.endswith("/psnr"))
    for key in ("ms_ssim", "haarpsi", "psd_error", "swd"):
        assert f"val/{method}/{key}" in metrics, key


def test_training_refuses_missing_learned_weights_before_its_first_step(tmp_path, monkeypatch):
    import urllib.error

    from gpsr.stages.flow import FlowModule
    from gpsr.train import train
    from gpsr.utils.errors import ConfigError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)

    def no_step(self, *args, **kwargs):
        pytest.fail("a training step ran before the weights were checked")

    monkeypatch.setattr(FlowModule, "training_step", no_step)
    overrides = [
        "stage=flow", "logger=csv", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", "trainer.max_steps=2",
        "data.batch_size=8", "data.demo_count=16", "test_after_fit=false",
        "callbacks.metrics.learned=[lpips_alex]",
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="alexnet-owt-7be5be79.pth"):
        train(compose_cfg(overrides, output_dir=tmp_path / "run"))
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))


class _TinyFeatures(torch.nn.Module):
    """A fixed random 8-bit-image -> 16-feature map standing in for Inception (DDP test)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 8 * 8, 16)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))
        torch.nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        x = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 8)
        return torch.tanh(self.proj(x.flatten(1)))


def _set_metrics_on_shard(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    feat = _TinyFeatures()
    sets = {
        "fid": lambda: FrechetInceptionDistance(feature=feat),
        "kid": lambda: KernelInceptionDistance(feature=feat, subset_size=1000, subsets=3),
    }
    m = SRMetrics(4, sets=sets)
    gen = torch.Generator().manual_seed(5)
    hr = torch.rand(24, 3, 16, 16, generator=gen)
    sr = (hr * 0.6 + 0.3 * torch.rand(24, 3, 16, 16, generator=gen)).clamp(0, 1)
    part = slice(rank * 24 // world, (rank + 1) * 24 // world)  # uneven shards are fine
    m.update(sr[part], hr[part], ops.degrade(hr[part], 4))
    values = m.compute()
    if rank == 0:
        torch.save({k: values[k] for k in ("fid", "kid", "kid_spread")}, out)
    if world > 1:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fid_and_kid_reduce_across_ddp_processes_to_the_one_process_value(tmp_path):
    import torch.multiprocessing as mp

    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    _set_metrics_on_shard(0, 1, "", one)
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_set_metrics_on_shard, args=(2, init, two), nprocs=2, join=True)
    a, b = torch.load(one), torch.load(two)
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-9)
    assert a["kid"] == pytest.approx(b["kid"], rel=1e-9)
    assert a["kid_spread"] == pytest.approx(b["kid_spread"], rel=1e-6)
