"""The sampler's precision (`sampler.precision`): fp32 is the paper's algorithm on the model's
own modules, bit for bit; bf16 runs bfloat16 copies of the UNet and of the flow's coupling
subnets (the couplings stay float32), close to fp32, and leaves the projection's consistency
untouched."""

import pytest
import torch

from gpsr import ops
from gpsr.diffusion import GaussianDiffusion, IndexNoise
from gpsr.metrics import per_image_consistency
from gpsr.models import bf16
from gpsr.models import gpsr as gpsr_module
from gpsr.models.bf16 import BF16Copy
from gpsr.models.conditioning import CoarseConditioned
from gpsr.models.gpsr import GPSR, resolve_precision
from gpsr.models.stats import LatentStats
from gpsr.models.unet import AttentionBlock, GroupNorm32, UNet
from gpsr.tiling import Tiling
from gpsr.utils.errors import ConfigError
from tests.helpers import SMALL_UNET, randomize_, tiny_flow


def _model() -> GPSR:
    torch.manual_seed(0)
    flow = tiny_flow(scale=4, std=0.05)
    unet = randomize_(UNet(in_channels=12, out_channels=9, **SMALL_UNET), std=0.05).eval()
    stats = LatentStats(9)
    with torch.no_grad():  # non-trivial statistics: a forgotten denormalisation would show
        stats.mean.fill_(0.1)
        stats.var.fill_(0.64)
        stats.zmin.fill_(-3.0)
        stats.zmax.fill_(3.0)
        stats.ready.fill_(True)
    return GPSR(flow, unet, GaussianDiffusion(1000, prediction="x0"), stats).eval()


def _lr(n=2, side=8, seed=0):
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def test_fp32_is_algorithm_3_on_the_models_own_modules_bit_for_bit():
    """precision=fp32 (the default) against the paper's sampler composed by hand from the
    model's parts (DDIM over the UNet conditioned on the coarse image, denormalisation, flow
    inverse): equal to the last bit. A bf16 copy, a cast or a reordering in the fp32 path
    would fail it."""
    model, lr = _model(), _lr()
    out = model.super_resolve(lr, steps=3, seed=0, indices=[0, 1], precision="fp32")
    assert model.sampling_unet("fp32") is model.unet
    y = ops.to_signed(lr)
    noise = IndexNoise([0, 1], 0, torch.device("cpu"))
    net = CoarseConditioned(model.unet, ops.upsample_nearest(y, model.flow.k))
    shape = (2, *model.flow.latent_shape(8, 8))
    zhat = model.diffusion.sample(
        net, shape, steps=3, eta=1.0, clip=model.stats.bounds(), noise_fn=noise
    )
    x = model.flow.pseudoinverse(y, model.stats.denormalise(zhat), None, 0)
    assert torch.equal(out, ops.to_unit(x).clamp(0, 1))


def test_bf16_sampling_is_close_to_fp32_and_really_bf16():
    """bf16 differs from fp32 (it did run in bf16) by at most 0.05 per pixel and 0.01 on
    average on [0, 1] images (bfloat16 keeps 8 bits of mantissa; over 3 steps of this random
    UNet the documented tolerance); its UNet copy holds bf16 weights except the norms' and
    the timestep embedding's linear layers'."""
    model, lr = _model(), _lr()
    a = model.super_resolve(lr, steps=3, seed=0, indices=[0, 1], precision="fp32")
    b = model.super_resolve(lr, steps=3, seed=0, indices=[0, 1], precision="bf16")
    diff = (a - b).abs()
    assert 0 < float(diff.max()) < 0.05 and float(diff.mean()) < 0.01
    fast = model.sampling_unet("bf16")
    assert isinstance(fast, BF16Copy) and model.sampling_unet("bf16") is fast  # made once
    for module in fast.modules():
        for p in module.parameters(recurse=False):
            fp32 = isinstance(module, (torch.nn.GroupNorm, torch.nn.Linear))
            want = torch.float32 if fp32 else torch.bfloat16
            assert p.dtype == want
    # The source model is untouched: still float32, and fp32 sampling gives the same again.
    assert all(p.dtype == torch.float32 for p in model.unet.parameters())
    again = model.super_resolve(lr, steps=3, seed=0, indices=[0, 1], precision="fp32")
    assert torch.equal(a, again)


def test_bf16_copy_follows_new_weights():
    model = _model()
    before, flow_before = model.sampling_unet("bf16"), model.sampling_flow("bf16")
    with torch.no_grad():
        next(model.unet.parameters()).add_(0.5)
    assert model.sampling_unet("bf16") is not before
    assert model.sampling_flow("bf16") is flow_before  # the flow did not change
    with torch.no_grad():
        model.flow.blocks[-1].update.out.bias.add_(0.5)
    assert model.sampling_flow("bf16") is not flow_before


def test_bf16_decodes_through_bf16_subnets_with_float32_couplings():
    """bf16 sampling decodes through the flow's bf16 copy: every coupling subnet runs once
    per block and sample in bfloat16 (NHWC) and hands float32 back to the coupling; fp32
    sampling never calls it; the model's own flow stays float32. Flow-only sampling (steps
    0) in bf16 is within the same tolerance of fp32."""
    model, lr = _model(), _lr()
    fast = model.sampling_flow("bf16")
    assert model.sampling_flow("fp32") is model.flow and model.sampling_flow("bf16") is fast
    subnets = [net for block in fast.blocks for net in (block.predict, block.update)]
    assert all(isinstance(net, BF16Copy) and net.channels_last for net in subnets)
    assert all(p.dtype == torch.bfloat16 for net in subnets for p in net.parameters())
    assert all(p.dtype == torch.float32 for p in model.flow.parameters())
    seen = []
    hooks = [
        net.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype, i[0].shape[0])))
        for net in subnets
    ]
    model.super_resolve(lr, steps=2, seed=0, indices=[0, 1], precision="fp32")
    assert seen == []
    model.super_resolve(lr, steps=2, seed=0, indices=[0, 1], precision="bf16")
    # Every subnet sees the 2 images once: as one batch, or one image per CPU worker thread.
    assert {(a, b) for a, b, _ in seen} == {(torch.float32, torch.float32)}
    assert sum(n for *_, n in seen) == 2 * len(subnets)
    for h in hooks:
        h.remove()
    out = subnets[0](torch.randn(1, subnets[0].net.hidden[0].in_channels, 5, 5))
    assert out.dtype == torch.float32 and out.is_contiguous()  # NCHW float32 for the coupling
    a = model.super_resolve(lr, steps=0, seed=0, indices=[0, 1], precision="fp32")
    b = model.super_resolve(lr, steps=0, seed=0, indices=[0, 1], precision="bf16")
    diff = (a - b).abs()
    assert 0 < float(diff.max()) < 0.05 and float(diff.mean()) < 0.01


def test_projected_bf16_samples_stay_consistent():
    """The projection (float64) does not depend on the networks' precision: projected bf16
    samples agree with their (reachable) LR images as fp32 ones do, MSE < 1e-9."""
    model = _model()
    lr = ops.degrade(_lr(side=32), 4).clamp(0, 1)
    for precision in ("fp32", "bf16"):
        x = model.super_resolve(
            lr, steps=2, seed=0, indices=[0, 1], project=True, precision=precision
        )
        c = per_image_consistency(x.double(), lr.double(), model.scale)
        assert c.shape == (2,) and float(c.max()) < 1e-9


def test_bf16_on_tiles_matches_bf16_whole_closely():
    """A latent larger than one tile: the bf16 UNet runs through the tiled denoiser too."""
    model, lr = _model(), _lr(n=1, side=12)  # latent 24 > tile 16
    a = model.super_resolve(lr, steps=2, seed=0, indices=[0], precision="fp32")
    b = model.super_resolve(lr, steps=2, seed=0, indices=[0], precision="bf16", tiling=Tiling())
    assert float((a - b).abs().max()) < 0.05


def test_bf16_copy_in_place_silus_change_nothing():
    """The copy's SiLUs that follow a GroupNorm work in place; its output equals that of the
    same copy with every SiLU out of place, bit for bit (an in-place SiLU on a tensor that is
    read again, e.g. the timestep embedding each ResBlock shares, would not); the source
    UNet's SiLUs are untouched (training needs their inputs)."""
    torch.manual_seed(0)
    unet = randomize_(UNet(in_channels=12, out_channels=9, **SMALL_UNET), std=0.05).eval()
    fast = BF16Copy(unet)
    silus = [m for m in fast.modules() if isinstance(m, torch.nn.SiLU)]
    # Every GroupNorm but the attention blocks' (followed by the qkv projection) has a SiLU.
    norms = sum(isinstance(m, GroupNorm32) for m in unet.modules())
    attention = sum(isinstance(m, AttentionBlock) for m in unet.modules())
    assert attention > 0 and sum(m.inplace for m in silus) == norms - attention
    assert not any(m.inplace for m in unet.modules() if isinstance(m, torch.nn.SiLU))
    x, t = torch.randn(3, 12, 16, 16), torch.tensor([10, 500, 990])
    with torch.no_grad():
        got = fast(x, t)
        for m in silus:
            m.inplace = False
        assert torch.equal(got, fast(x, t))


@pytest.mark.parametrize("side,channels_last", [(5, False), (5, True), (32, True)])
def test_groupnorm_mixed_dtype_matches_float32_statistics(side, channels_last):
    """The bf16 path's GroupNorm (bf16 input, float32 weights) against float32 GroupNorm of
    the same bf16 values: equal up to the output's bf16 rounding, per image (two different
    images in one batch: statistics over the wrong dimension would fail), in both layouts
    (small channels-last maps are normalised from a channels-first copy)."""
    gn = GroupNorm32(4, 16)
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    x = torch.randn(2, 16, side, side) * torch.tensor([1.0, 3.0])[:, None, None, None] + 2
    xb = x.bfloat16()
    if channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    out = gn(xb)
    assert out.dtype == torch.bfloat16
    ref = torch.nn.functional.group_norm(xb.float(), 4, gn.weight, gn.bias, gn.eps)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=2e-2)


def test_resolve_precision(monkeypatch):
    monkeypatch.setattr(gpsr_module, "cpu_has_bf16_matrix_units", lambda: True)
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert resolve_precision("auto", torch.device("cuda")) == "fp32"
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(gpsr_module, "cpu_has_bf16_matrix_units", lambda: False)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ConfigError, match="sampler.precision"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="sampler.precision"):
        _model().super_resolve(_lr(n=1), steps=0, precision="half")


@pytest.mark.parametrize("amx", [True, False])
def test_entry_points_say_the_precision_they_sample_in(ddpm_ckpt, monkeypatch, caplog, amx):
    """`load_from_config` (gpsr.sample, evaluate, calibrate) says once what `auto` resolved
    to on this machine, and what an explicit setting is."""
    import logging

    from gpsr.inference import load_from_config
    from tests.helpers import compose_cfg

    monkeypatch.setattr(gpsr_module, "cpu_has_bf16_matrix_units", lambda: amx)
    for name, want in (("sample", "bf16" if amx else "fp32"), ("evaluate", "fp32")):
        cfg = compose_cfg([f"ckpt={ddpm_ckpt}"] + ["input=x"] * (name == "sample"), name=name)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="gpsr"):
            load_from_config(cfg)
        said = [r.getMessage() for r in caplog.records if "Sampling precision" in r.getMessage()]
        requested = "auto" if name == "sample" else "fp32"
        assert len(said) == 1 and said[0].startswith(
            f"Sampling precision: {want} (sampler.precision={requested}"
        ), said


def _convs():
    torch.manual_seed(0)
    return torch.nn.ModuleList(
        [
            torch.nn.Conv2d(8, 24, 3, padding=1),
            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),  # a UNet Downsample
            torch.nn.Conv2d(8, 9, 1),
            torch.nn.Conv1d(8, 24, 1),  # an attention projection
        ]
    ).to(torch.bfloat16)


def _inputs(channels_last: bool):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 6, 10, generator=gen).bfloat16()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return [x, x, x, x.flatten(2)]


@pytest.mark.skipif(not bf16._can_pack(), reason="torch without oneDNN convolution operators")
@pytest.mark.parametrize("channels_last", [False, True])
def test_packed_convolutions_equal_torchs(channels_last):
    """Packed 3 x 3 (padded, strided), 1 x 1 and 1-d convolutions against torch's own on the
    same bf16 inputs: the same oneDNN kernel given the weight it would reorder itself, so
    equal to the last bit (a wrong padding, stride or weight view would not be), and within
    bf16 rounding of a float64 convolution."""
    convs, packed = _convs(), _convs()
    assert bf16.pack_convolutions(packed) == 4
    assert [type(m) for m in packed] == [bf16.PackedConv2d] * 3 + [bf16.PackedConv1d]
    with torch.no_grad():
        for conv, fast, x in zip(convs, packed, _inputs(channels_last)):
            got = fast(x)
            assert len(fast._packed) == 1  # it did take the packed path
            assert torch.equal(got, conv(x))
            ref = conv.double()(x.double())
            torch.testing.assert_close(got.double(), ref, rtol=0.02, atol=0.05)


@pytest.mark.skipif(not bf16._can_pack(), reason="torch without oneDNN convolution operators")
def test_packed_weights_are_kept_per_shape_and_never_copied():
    """One packing per input shape, the most recent `PACKED_SHAPES` kept (least recently
    used dropped); copies and pickles start with none; with gradients enabled the module is
    torch's convolution (gradients flow, nothing packed)."""
    import copy
    import pickle

    conv = _convs()[0]
    bf16.pack_convolutions(torch.nn.ModuleList([conv]))
    a, b, c = (torch.randn(n, 8, 5, 7).bfloat16() for n in (1, 2, 3))
    with torch.no_grad():
        for x in (a, b, a, c):
            conv(x)
        assert list(conv._packed) == [tuple(a.shape), tuple(c.shape)]
        for x in (a, b, c):  # each shape gets its own packing, not the cached one
            assert torch.equal(
                conv(x), torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)
            )
    for twin in (copy.deepcopy(conv), pickle.loads(pickle.dumps(conv))):
        assert isinstance(twin, bf16.PackedConv2d) and len(twin._packed) == 0
        with torch.no_grad():
            assert torch.equal(twin(a), conv(a))
    fresh = _convs()[0]
    bf16.pack_convolutions(torch.nn.ModuleList([fresh]))
    out = fresh(a)
    assert out.requires_grad and len(fresh._packed) == 0
    out.float().sum().backward()
    assert fresh.weight.grad is not None


@pytest.mark.skipif(not bf16._can_pack(), reason="torch without oneDNN convolution operators")
@pytest.mark.parametrize("width", [32, 64])
def test_bf16_unet_copy_with_packed_weights_equals_unpacked(width):
    """A whole bf16 UNet copy (channels-first at width 32, channels-last at 64, as the
    sampler makes them) against the same copy with its convolutions turned back into
    torch's: equal (channels-last: the same kernels) or within bf16 rounding (channels-first:
    packed convolutions compute channels-last)."""
    torch.manual_seed(0)
    config = dict(SMALL_UNET, model_channels=width)
    unet = randomize_(UNet(in_channels=12, out_channels=9, **config), std=0.05).eval()
    fast = BF16Copy(unet, channels_last=width >= 64)
    packed = [m for m in fast.modules() if isinstance(m, (bf16.PackedConv2d, bf16.PackedConv1d))]
    assert len(packed) == sum(
        isinstance(m, torch.nn.Conv2d | torch.nn.Conv1d) for m in unet.modules()
    )
    x, t = torch.randn(3, 12, 16, 16), torch.tensor([10, 500, 990])
    with torch.no_grad():
        got = fast(x, t)
        for m in packed:
            m.__class__ = torch.nn.Conv2d if isinstance(m, bf16.PackedConv2d) else torch.nn.Conv1d
        plain = fast(x, t)
    if width >= 64:
        assert torch.equal(got, plain)
    else:
        torch.testing.assert_close(got, plain, rtol=0, atol=2e-2 * float(plain.abs().max()))


def test_packed_convolution_falls_back_to_torchs_once_the_kernel_fails(monkeypatch):
    """A oneDNN build without the packed kernel for a case: the call gives torch's own
    convolution's values, and the module stops trying (one failure, not one per call)."""
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("no packed kernel here")

    monkeypatch.setattr(bf16, "_packed_convolution", broken)
    monkeypatch.setattr(bf16, "_can_pack", lambda: True)
    convs, packed = _convs(), _convs()
    bf16.pack_convolutions(packed)
    with torch.no_grad():
        for conv, fast, x in zip(convs, packed, _inputs(True)):
            for _ in range(2):
                assert torch.equal(fast(x), conv(x))
            assert fast._packed is None
    assert len(calls) == len(convs)
