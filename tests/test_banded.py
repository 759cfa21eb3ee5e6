"""The linear-time operators of gpsr.banded against dense references built independently."""

import pytest
import torch
import torch.nn.functional as F

from gpsr import ops
from gpsr.banded import degradation_band, gram_inverse_band, separable, separable_adjoint


def _interpolate_matrix(n: int, scale: int) -> torch.Tensor:
    """Dense (n/s, n) factor from torch's own bicubic, one basis vector at a time."""
    basis = torch.eye(n, dtype=torch.float64).reshape(n, 1, 1, n)
    out = F.interpolate(
        basis, size=(1, n // scale), mode="bicubic", antialias=True, align_corners=False
    )
    return out.reshape(n, n // scale).T


# Sides below and above the size where the band is read off a reference (192 LR rows),
# including sides that are not multiples of the block or of anything else.
@pytest.mark.parametrize("scale", [2, 4, 8, 16])
@pytest.mark.parametrize("rows", [3, 40, 193, 257, 601])
def test_band_is_the_degradation_matrix(scale, rows):
    n = rows * scale
    band = degradation_band(n, scale)
    ref = _interpolate_matrix(n, scale)
    assert torch.allclose(band.dense(), ref, atol=1e-15, rtol=0)
    y = torch.randn(2, rows, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(band.adjoint(y), y @ ref, atol=1e-14, rtol=0)
    squared = degradation_band(n, scale, power=2)
    assert torch.allclose(squared.dense(), ref**2, atol=1e-15, rtol=0)


@pytest.mark.parametrize("scale", [2, 4, 16])
@pytest.mark.parametrize("rows", [5, 150, 400])
def test_gram_inverse_band_inverts_a_a_transpose(scale, rows):
    a = _interpolate_matrix(rows * scale, scale)
    k = gram_inverse_band(rows * scale, scale).dense()
    eye = torch.eye(rows, dtype=torch.float64)
    assert torch.allclose(k @ (a @ a.T), eye, atol=1e-13, rtol=0)


def test_separable_forms_match_degrade_and_its_adjoint():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 1040, 816, dtype=torch.float64, generator=gen)  # 260 x 204 LR
    ah, aw = degradation_band(1040, 4), degradation_band(816, 4)
    assert torch.allclose(separable(ah, aw, x), ops.degrade(x, 4), atol=1e-13, rtol=0)
    y = torch.randn(2, 3, 260, 204, dtype=torch.float64, generator=gen)
    # <D x, y> == <x, D^T y>
    lhs = (ops.degrade(x, 4) * y).sum()
    rhs = (x * separable_adjoint(ah, aw, y)).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-12)


def test_pseudoinverse_at_a_size_where_dense_matrices_would_be_slow():
    """D^+ y is consistent (D D^+ y = y) and minimum-norm (it lies in the row space of D:
    D^+ D D^+ y = D^+ y) on a 2048 x 1536 image."""
    gen = torch.Generator().manual_seed(2)
    y = torch.rand(1, 3, 512, 384, dtype=torch.float64, generator=gen)
    x = ops.pseudoinverse(y, 4)
    assert x.shape == (1, 3, 2048, 1536)
    assert torch.allclose(ops.degrade(x, 4), y, atol=1e-12, rtol=0)
    again = ops.pseudoinverse(ops.degrade(x, 4), 4)
    assert torch.allclose(again, x, atol=1e-12, rtol=0)
