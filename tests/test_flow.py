"""The degradation flow: invertibility, log-det, learned degradation, bad settings."""

import math

import pytest
import torch

from gpsr import ops
from gpsr.models.flow import DegradationFlow, block_position
from tests.helpers import randomize_, tiny_flow


@pytest.mark.parametrize(
    "scale, position", [(2, False), (4, False), (8, False), (4, True), (8, True)]
)
def test_inverse_recovers_input_with_random_weights(scale, position):
    torch.manual_seed(0)
    flow = tiny_flow(scale, position=position)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    coarse, latent, logdet = flow(x)
    assert coarse.shape == (2, 3, 16, 16) and latent.shape == (2, 9, 16, 16)
    assert logdet.shape == (2,)
    # The random weights make the map far from the plain Haar transform.
    assert (latent - ops.haar2d(x)[1]).abs().max() > 0.1
    assert logdet.abs().min() > 1.0
    assert (flow.inverse(coarse, latent) - x).abs().max() < 1e-5


def test_identity_at_initialisation():
    flow = DegradationFlow(scale=4, num_blocks=2, num_convs=3, growth=8)
    x = torch.randn(1, 3, 16, 16)
    coarse, latent, logdet = flow(x)
    c0, d0 = ops.haar2d(x)
    assert torch.allclose(coarse, c0) and torch.allclose(latent, d0)
    assert torch.all(logdet == 0)


@pytest.mark.parametrize("position", [False, True])
def test_logdet_matches_brute_force_jacobian(position):
    torch.manual_seed(0)
    flow = tiny_flow(4, dtype=torch.float64, std=0.1, position=position)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)

    def full(inp):
        c, d, _ = flow(inp.reshape(1, 3, 4, 4))
        return torch.cat([c.flatten(), d.flatten()])

    def haar(inp):
        c, d = ops.haar2d(inp.reshape(1, 3, 4, 4))
        return torch.cat([c.flatten(), d.flatten()])

    jac = torch.autograd.functional.jacobian(full, x.flatten())
    jac_haar = torch.autograd.functional.jacobian(haar, x.flatten())
    expected = torch.linalg.slogdet(jac)[1] - torch.linalg.slogdet(jac_haar)[1]
    logdet = flow(x)[2]
    assert abs(logdet.item()) > 0.5
    assert logdet.item() == pytest.approx(expected.item(), abs=1e-8)


def test_pseudoinverse_and_learned_degradation_shapes():
    flow = tiny_flow(8)
    y = torch.randn(2, 3, 4, 4)
    z = torch.randn(2, *flow.latent_shape(4, 4))
    x = flow.pseudoinverse(y, z)
    assert x.shape == (2, 3, 32, 32)
    # Reflexive on the coarse side: forward of G(y, z) gives back U_k(y) and z.
    c, d, _ = flow(x)
    assert torch.allclose(c, ops.upsample_nearest(y, 4), atol=1e-5)
    assert torch.allclose(flow.degrade(x), y, atol=1e-5)
    assert torch.allclose(d, z, atol=1e-5)


def test_paper_config_parameter_count():
    assert sum(p.numel() for p in DegradationFlow().parameters()) == 30_761_280


@pytest.mark.parametrize("scale", [0, 1, 3, 5])
def test_bad_scale_is_refused(scale):
    with pytest.raises(ValueError, match="even integer"):
        DegradationFlow(scale=scale, num_blocks=1, num_convs=2, growth=4)


def test_image_not_divisible_by_scale_is_refused():
    flow = tiny_flow(8)
    with pytest.raises(ValueError, match="not divisible by the scale 8"):
        flow(torch.zeros(1, 3, 36, 36))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        flow(torch.zeros(1, 1, 32, 32))


def test_activation_checkpointing_gives_the_same_gradients():

    torch.manual_seed(0)
    flow = tiny_flow(4)
    x = torch.rand(2, 3, 16, 16) * 2 - 1

    def grads():
        flow.zero_grad()
        c, z, logdet = flow(x)
        ((c**2).sum() + (z**2).sum() / 2 - logdet.sum()).backward()
        return [p.grad.clone() for p in flow.parameters()]

    plain = grads()
    flow.speed_up(checkpointing=True, channels_last=True)
    assert flow.checkpointing
    recomputed = grads()
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(plain, recomputed))
    with torch.no_grad():  # inference never recomputes
        assert (flow.inverse(*flow(x)[:2]) - x).abs().max() < 1e-5


def test_bpd_is_the_exact_relaxed_likelihood_of_x():
    """With identity couplings (the zero initialisation), -log p(x) follows from the Haar
    Jacobian (brute force here) and the two Gaussians; bpd must match it exactly."""
    import math

    from gpsr import ops
    from gpsr.models.flow import DegradationFlow, flow_loss_terms

    flow = DegradationFlow(scale=4, num_blocks=2, num_convs=2, growth=4).double()
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x * 2 - 1
    sigma = 1 / 127.5
    terms = flow_loss_terms(flow, x, sigma)

    def haar_flat(v):
        c, d = ops.haar2d(v.reshape(1, 3, 8, 8))
        return torch.cat([c.flatten(), d.flatten()])

    jac = torch.autograd.functional.jacobian(haar_flat, x.flatten())
    logdet_haar = torch.linalg.slogdet(jac).logabsdet.item()
    assert logdet_haar == pytest.approx(-192 * math.log(2), rel=1e-10)  # -1 bit per pixel
    c, d = ops.haar2d(x)
    target = ops.upsample_nearest(ops.degrade(x, 4), 2)
    log_p = (
        -((c - target) ** 2).sum() / (2 * sigma**2)
        - 0.5 * c.numel() * math.log(2 * math.pi * sigma**2)
        - 0.5 * (d**2).sum()
        - 0.5 * d.numel() * math.log(2 * math.pi)
        + logdet_haar
    ).item()
    # Density in [-1, 1] units -> probability mass of one 8-bit bin of width 1/127.5.
    bits = (-log_p / 192 + math.log(127.5)) / math.log(2)
    assert terms["bpd"].item() == pytest.approx(bits, rel=1e-9)


def test_flow_loss_is_the_brute_force_negative_log_likelihood():
    """With random couplings: the loss equals -log p(c, z) minus log|det| of the whole map
    x -> (c, z), the determinant computed by brute force (Haar log-det added back)."""
    import math

    from gpsr import ops
    from gpsr.models.flow import flow_loss_terms

    flow = tiny_flow(scale=4, dtype=torch.float64, std=0.1)
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = x * 2 - 1
    sigma = 1 / 127.5
    terms = flow_loss_terms(flow, x, sigma)

    def full_map(v):
        c, z, _ = flow(v.reshape(1, 3, 8, 8))
        return torch.cat([c.flatten(), z.flatten()])

    logdet = torch.linalg.slogdet(torch.autograd.functional.jacobian(full_map, x.flatten()))
    logdet = logdet.logabsdet.item() - ops.haar_logdet(x)  # the couplings' part only
    c, z, _ = flow(x)
    target = ops.upsample_nearest(ops.degrade(x, 4), 2)
    expect = ((c - target) ** 2).sum() / (2 * sigma**2) + (z**2).sum() / 2 - logdet
    assert abs(logdet) > 1.0  # the couplings are far from volume preserving here
    assert terms["loss"].item() == pytest.approx(expect.item(), rel=1e-9)
    assert terms["logdet"].item() == pytest.approx(logdet, rel=1e-9)
    assert math.isfinite(terms["bpd"].item())


def test_block_position_marks_each_coarse_pixel_inside_its_lr_block():
    """k = 2: -1 on even, +1 on odd rows (channel 0) and columns (channel 1); an offset moves
    the pattern with the tile; k = 4: four evenly spaced values."""
    pos = block_position(3, 4, 2)
    assert pos.shape == (1, 2, 3, 4)
    assert pos[0, 0, :, 0].tolist() == [-1, 1, -1] and pos[0, 0, 1].tolist() == [1] * 4
    assert pos[0, 1, 0].tolist() == [-1, 1, -1, 1] and pos[0, 1, :, 2].tolist() == [-1] * 3
    moved = block_position(3, 4, 2, offset=(1, 2))
    assert moved[0, 0, :, 0].tolist() == [1, -1, 1] and torch.equal(moved[0, 1], pos[0, 1])
    assert block_position(1, 6, 4, offset=(0, 1))[0, 1, 0].tolist() == pytest.approx(
        [-1 / 3, 1 / 3, 1, -1, -1 / 3, 1 / 3]
    )
    with pytest.raises(ValueError, match="k >= 2"):  # k = 1 would divide by zero: NaNs
        block_position(3, 4, 1)


@torch.no_grad()
def test_position_flow_decodes_a_crop_like_the_whole_image_given_its_offset():
    """Away from the borders a crop decodes like the whole image only when told where it
    lies: with the right offset the flow is the same function of position everywhere (an
    odd offset is where a dropped or misread offset shows), with the wrong one it is not.
    Without `position` the flow cannot tell the offsets apart at all."""
    for position in (True, False):
        torch.manual_seed(0)
        flow = tiny_flow(4, dtype=torch.float64, std=0.1, position=position)
        gen = torch.Generator().manual_seed(3)
        coarse = torch.randn(1, 3, 60, 60, dtype=torch.float64, generator=gen)
        latent = torch.randn(1, 9, 60, 60, dtype=torch.float64, generator=gen)
        whole = flow.inverse(coarse, latent)
        r = flow.receptive_radius
        crop = (slice(None), slice(None), slice(1, 59), slice(2, 60))
        inner = (..., slice(2 * r, -2 * r), slice(2 * r, -2 * r))
        want = whole[..., 2:118, 4:120][inner]
        right = flow.inverse(coarse[crop], latent[crop], offset=(1, 2))[inner]
        wrong = flow.inverse(coarse[crop], latent[crop])[inner]
        assert torch.allclose(right, want, atol=1e-12, rtol=0)
        assert torch.allclose(wrong, want, atol=1e-12, rtol=0) is not position


def test_position_adds_nothing_at_scale_2_and_two_channels_per_conv_above():
    """At scale 2 an LR pixel is one coarse pixel (nothing to mark): the same flow as without
    `position`. At 4 and 8 every conv of both subnets gets 2 more input channels."""

    def count(scale, position):
        flow = DegradationFlow(scale, num_blocks=2, num_convs=3, growth=4, position=position)
        return flow.position, sum(p.numel() for p in flow.parameters())

    assert count(2, True) == (False, count(2, False)[1])
    for scale in (4, 8):
        # per block: P has 2 hidden convs (growth 4) and an output conv (18 channels), U the
        # same with 6 output channels; 3 x 3 kernels.
        extra = 2 * 9 * ((2 * 4 + 18) + (2 * 4 + 6))
        assert count(scale, True) == (True, count(scale, False)[1] + 2 * extra)


def test_soft_clamp_is_alpha_times_two_over_pi_arctan_of_s_over_alpha():
    """Checked at points where the formula is known in closed form: s = alpha gives alpha/2
    (atan 1 = pi/4), s -> infinity gives alpha, s = -alpha gives -alpha/2, and the slope at 0
    is 2/pi whatever alpha. A wrong alpha inside or outside the arctan fails."""
    from gpsr.models.flow import soft_clamp

    for alpha in (0.5, 2.0, 3.0):
        s = torch.tensor([alpha, -alpha, 1e12, 0.0], dtype=torch.float64)
        out = soft_clamp(s, alpha)
        assert out[0].item() == pytest.approx(alpha / 2, rel=1e-12)
        assert out[1].item() == pytest.approx(-alpha / 2, rel=1e-12)
        assert out[2].item() == pytest.approx(alpha, rel=1e-9)
        assert out[3].item() == 0.0
        h = 1e-6
        slope = (soft_clamp(torch.tensor(h, dtype=torch.float64), alpha) / h).item()
        assert slope == pytest.approx(2 / math.pi, rel=1e-9)


def test_coupling_log_scales_obey_the_configured_clamp():
    """A coupling block built with clamp=0.5 never scales by more than exp(+/-0.5), however
    large its raw log-scales (and gets close to it): it uses its own alpha, not the
    default 2."""
    from gpsr.models.flow import CouplingBlock

    block = CouplingBlock(3, num_convs=2, growth=4, clamp=0.5).double()
    randomize_(block, std=3.0)  # raw log-scales far beyond the clamp
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=gen)
    d = torch.randn(2, 9, 8, 8, dtype=torch.float64, generator=gen)
    for net, x in ((block.predict, c), (block.update, d)):
        log_scale, _ = block._scale_shift(net, x)
        assert log_scale.abs().max().item() < 0.5
        assert log_scale.abs().max().item() > 0.45  # the clamp is reached, not avoided
