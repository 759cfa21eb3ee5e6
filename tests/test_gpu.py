"""GPU-only checks; skipped cleanly where CUDA is not available (as in CI)."""

import pytest
import torch

from gpsr import ops
from gpsr.projection import project_consistent_box
from tests.helpers import tiny_flow

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_bf16_flow_inverse_keeps_float32_couplings():
    flow = tiny_flow(8).cuda()
    x = torch.rand(4, 3, 64, 64, device="cuda") * 2 - 1
    with torch.autocast("cuda", dtype=torch.bfloat16):
        coarse, latent, logdet = flow(x)
        back = flow.inverse(coarse, latent)
    assert logdet.dtype == torch.float32 and back.dtype == torch.float32
    assert (back - x).abs().max() < 1e-2


def test_projection_on_gpu_matches_cpu():
    gen = torch.Generator().manual_seed(0)
    hr = torch.rand(2, 3, 64, 64, generator=gen, dtype=torch.float64)
    y = ops.degrade(hr, 8)
    x = (hr + 0.2 * torch.randn(hr.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    cpu, _ = project_consistent_box(x, y, 8)
    gpu, _ = project_consistent_box(x.cuda(), y.cuda(), 8)
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-6)


def test_tiled_blend_on_gpu_equals_the_tile_by_tile_loop():
    """On a GPU the blend adds one tile at a time (an index_add_ with repeated indices adds
    in any order there): equal to the tile-by-tile loop to the last bit, run after run."""
    from torch import nn

    from gpsr.tiling import TiledDenoiser
    from tests.helpers import randomize_
    from tests.test_tiling import _blend_by_loop

    model = randomize_(nn.Conv2d(5, 3, 3, padding=1), std=0.5).cuda()
    x = torch.randn(2, 5, 38, 50, generator=torch.Generator().manual_seed(1)).cuda()
    t = torch.tensor([3.0, 7.0], device="cuda")

    def net(crops, steps):
        return model(crops) * steps[:, None, None, None]

    with torch.no_grad(), torch.backends.cudnn.flags(deterministic=True, benchmark=False):
        got = [TiledDenoiser(net, 16, 6, batch=7, align=2)(x, t) for _ in range(2)]
        want = _blend_by_loop(net, x, t, 16, 6, 7, 2)
    assert torch.equal(got[0], want) and torch.equal(got[1], want)
