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


def test_scale_shift_variant_and_time_dependence():
    torch.manual_seed(0)
    net = UNet(
        in_channels=4,
        out_channels=4,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        image_size=16,
        num_heads=4,
        scale_shift_norm=True,
        dropout=0.0,
    )
    for p in net.parameters():  # leave zero-init behind so the output depends on t
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(1, 4, 16, 16)
    a, b = net(x, torch.tensor([1.0])), net(x, torch.tensor([900.0]))
    assert not torch.allclose(a, b)


def test_timestep_embedding_range_and_shape():
    emb = timestep_embedding(torch.tensor([0.0, 500.0]), 33)
    assert emb.shape == (2, 33) and emb.abs().max() <= 1


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

    from gpsr.models.unet import AttentionBlock
    from gpsr.utils.checkpoint import CheckpointError, upgrade_checkpoint

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
