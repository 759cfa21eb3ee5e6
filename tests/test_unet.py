"""The improved-diffusion UNet: parameter count, shapes, zero-initialised output."""

import math

import pytest
import torch

from gpsr.models.unet import UNet, timestep_embedding


def test_paper_config_parameter_count():
    assert sum(p.numel() for p in UNet().parameters()) == 79_367_049


def test_shapes_and_zero_output_at_init():
    net = UNet(
        in_channels=12,
        out_channels=9,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        image_size=16,
        num_heads=2,
    )
    out = net(torch.randn(3, 12, 16, 16), torch.tensor([0.0, 10.0, 999.0]))
    assert out.shape == (3, 9, 16, 16)
    assert torch.all(out == 0)


def _reference_resblock(block, x, emb):
    """improved-diffusion's ResBlock forward, written out from the paper's formulas with
    torch.nn.functional: h = conv(silu(gn(x))); e = linear(silu(emb)); with scale-shift
    norm h = gn(h) * (1 + scale) + shift, else h = gn(h + e); out = skip(x) + conv(silu(h))."""
    import torch.nn.functional as F

    gn_in, conv_in = block.in_layers[0], block.in_layers[2]
    h = F.conv2d(
        F.silu(F.group_norm(x, 32, gn_in.weight, gn_in.bias, gn_in.eps)),
        conv_in.weight, conv_in.bias, padding=1,
    )  # fmt: skip
    lin = block.emb_layers[1]
    e = F.linear(F.silu(emb), lin.weight, lin.bias)[..., None, None]
    gn_out, conv_out = block.out_layers[0], block.out_layers[3]
    if block.scale_shift_norm:
        scale, shift = e[:, : h.shape[1]], e[:, h.shape[1] :]
        h = F.group_norm(h, 32, gn_out.weight, gn_out.bias, gn_out.eps) * (1 + scale) + shift
    else:
        h = F.group_norm(h + e, 32, gn_out.weight, gn_out.bias, gn_out.eps)
    h = F.conv2d(F.silu(h), conv_out.weight, conv_out.bias, padding=1)
    skip = block.skip_connection
    return (x if isinstance(skip, torch.nn.Identity) else skip(x)) + h


@pytest.mark.parametrize("scale_shift", [False, True])
def test_resblock_matches_the_reference_formulas(scale_shift):
    """Both ResBlock variants against an independent functional version; the scale-shift
    variant must use the first half of the embedding as the scale (a swapped scale and
    shift, or a missing `1 +`, fails), and the time embedding must change the output."""
    from gpsr.models.unet import ResBlock

    block = ResBlock(32, 16, 64, dropout=0.0, scale_shift_norm=scale_shift).double().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)
    x = torch.randn(2, 32, 8, 8, generator=gen, dtype=torch.float64)
    emb = torch.randn(2, 16, generator=gen, dtype=torch.float64)
    out = block(x, emb)
    assert torch.allclose(out, _reference_resblock(block, x, emb), atol=1e-12)
    assert not torch.allclose(out, block(x, emb.flip(0)))


def test_timestep_embedding_against_the_transformer_formula():
    """emb[i] = cos(t * 10000^(-i/half)), emb[half + i] = sin(...) (Vaswani et al.; the
    cos-first order of improved-diffusion), zero-padded to an odd dim."""
    import numpy as np

    t = torch.tensor([0.0, 1.0, 37.5, 999.0])
    emb = timestep_embedding(t, 33).double().numpy()
    half = 16
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / half)
    args = t.double().numpy()[:, None] * freqs[None]
    ref = np.concatenate([np.cos(args), np.sin(args), np.zeros((4, 1))], axis=1)
    assert emb.shape == (4, 33)
    assert np.allclose(emb, ref, atol=1e-4)  # float32 arguments up to t * 1 = 999


def test_bad_input_size():
    net = UNet(
        in_channels=3,
        out_channels=3,
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(),
        image_size=16,
    )
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(1, 3, 10, 10), torch.zeros(1))


def test_format1_checkpoint_upgrades_to_the_same_function():
    """gpsr 0.1 grouped qkv rows as (3, heads, d) and named ResBlock layers differently."""
    import torch.nn.functional as F

    from gpsr.loading import upgrade_checkpoint
    from gpsr.models.unet import AttentionBlock
    from gpsr.utils.checkpoint import CheckpointError

    C, heads, d = 64, 4, 16
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(3 * C, C, 1, generator=g) * 0.2, torch.randn(3 * C, generator=g) * 0.2
    x = torch.randn(2, C, 4, 4, generator=g)
    blk = AttentionBlock(C, heads)
    torch.nn.init.normal_(blk.proj_out.weight, std=0.2, generator=g)
    # Format 1's function, written out: q = rows 0..C, k = C..2C, v = 2C..3C, heads inside each.
    xs = x.reshape(2, C, 16)
    qkv = F.conv1d(blk.norm(xs), w, b)
    q, k, v = (part.reshape(2, heads, d, 16) for part in qkv.chunk(3, 1))
    att = torch.softmax(torch.einsum("nhdl,nhdm->nhlm", q, k) / math.sqrt(d), -1)
    out = torch.einsum("nhlm,nhdm->nhdl", att, v).reshape(2, C, 16)
    want = (xs + blk.proj_out(out)).reshape(x.shape)

    moment = torch.randn(3 * C, C, 1, generator=g)
    ckpt = {
        "gpsr": {"stage": "ddpm", "scale": 4, "version": 1},
        "hyper_parameters": {"unet": {"num_heads": heads}},
        "state_dict": {
            "unet.input_blocks.1.0.out_norm.weight": torch.ones(3),
            "unet.input_blocks.1.0.out_layers.2.weight": torch.zeros(3),
            "unet.input_blocks.1.0.skip.weight": torch.zeros(3),
            "unet.input_blocks.1.1.qkv.weight": w,
            "unet.input_blocks.1.1.qkv.bias": b,
            "ema.module.input_blocks.1.1.qkv.weight": w.clone(),
            "stats.mean": torch.zeros(9),
        },
        "optimizer_states": [{"state": {3: {"step": torch.tensor(5.0), "exp_avg": moment}}}],
    }
    upgrade_checkpoint(ckpt, "old.ckpt")
    state = ckpt["state_dict"]
    assert ckpt["gpsr"]["version"] == 2
    assert {
        "unet.input_blocks.1.0.out_layers.0.weight",
        "unet.input_blocks.1.0.out_layers.3.weight",
        "unet.input_blocks.1.0.skip_connection.weight",
        "stats.mean",
    } <= set(state)
    with torch.no_grad():
        blk.qkv.weight.copy_(state["unet.input_blocks.1.1.qkv.weight"])
        blk.qkv.bias.copy_(state["unet.input_blocks.1.1.qkv.bias"])
        assert torch.allclose(blk(x), want, atol=1e-5)
    assert torch.equal(state["ema.module.input_blocks.1.1.qkv.weight"], blk.qkv.weight)
    # Adam's moment of that qkv weight (parameter index 3) is regrouped the same way.
    new_moment = ckpt["optimizer_states"][0]["state"][3]["exp_avg"]
    new_w = state["unet.input_blocks.1.1.qkv.weight"]
    rows = [int((w == new_w[i]).all(dim=(1, 2)).nonzero()) for i in range(3 * C)]
    assert sorted(rows) == list(range(3 * C)) and rows != list(range(3 * C))
    assert torch.equal(new_moment, moment[rows])  # each moment row moved with its weight row
    with pytest.raises(CheckpointError, match="format 3, newer than this gpsr"):
        upgrade_checkpoint({"gpsr": {"stage": "ddpm", "version": 3}}, "new.ckpt")
