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
