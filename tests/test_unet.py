"""The improved-diffusion UNet: parameter count, shapes, zero-initialised output."""

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
