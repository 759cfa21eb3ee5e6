"""The fixed operators against independent references (torch's interpolate, dense pinv)."""

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from gpsr import ops
from gpsr.projection import project_consistent, project_consistent_box
from gpsr.utils.errors import ConfigError


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_haar_round_trip(dtype, tol):
    x = torch.randn(2, 3, 16, 24, dtype=dtype)
    coarse, details = ops.haar2d(x)
    assert coarse.shape == (2, 3, 8, 12) and details.shape == (2, 9, 8, 12)
    assert torch.allclose(ops.ihaar2d(coarse, details), x, atol=tol, rtol=0)


def test_haar_coefficients_by_hand():
    # One 2x2 block per channel: TL=1, TR=2, BL=3, BR=5.
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0]]).reshape(1, 1, 2, 2)
    coarse, details = ops.haar2d(x)
    assert coarse.item() == pytest.approx((1 + 2 + 3 + 5) / 4)
    assert details.flatten().tolist() == pytest.approx(
        [(1 + 2 - 3 - 5) / 4, (1 + 3 - 2 - 5) / 4, (1 + 5 - 2 - 3) / 4]
    )
    # The coarse band is 2x2 average pooling.
    y = torch.randn(2, 3, 8, 8)
    assert torch.allclose(ops.haar2d(y)[0], F.avg_pool2d(y, 2), atol=1e-6)


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_degrade_matches_torch_and_torchvision(scale):
    x = torch.rand(2, 3, 64, 48) * 2 - 1
    ref = F.interpolate(
        x, size=(64 // scale, 48 // scale), mode="bicubic", antialias=True, align_corners=False
    )
    out = ops.degrade(x, scale)
    assert out.shape == (2, 3, 64 // scale, 48 // scale)
    assert torch.equal(out, ref)
    tv = TF.resize(
        x, [64 // scale, 48 // scale], interpolation=TF.InterpolationMode.BICUBIC, antialias=True
    )
    assert torch.allclose(out, tv, atol=1e-5)


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_degrade_equals_its_separable_matrices(scale):
    x = torch.randn(2, 3, 32, 40, dtype=torch.float64)
    ah = ops.degradation_matrix(32, scale)
    aw = ops.degradation_matrix(40, scale)
    assert ah.shape == (32 // scale, 32)
    assert torch.allclose(ops.degrade(x, scale), ah @ x @ aw.T, atol=1e-12, rtol=0)
    # Each row of the bicubic operator sums to one (constants are preserved).
    assert torch.allclose(ah.sum(1), torch.ones(32 // scale, dtype=torch.float64))


def test_pseudoinverse_against_dense_pinv():
    scale, h, w = 4, 16, 12
    y = torch.randn(1, 1, h // scale, w // scale, dtype=torch.float64)
    # Dense operator from the degradation itself, one basis image at a time.
    basis = torch.eye(h * w, dtype=torch.float64).reshape(h * w, 1, h, w)
    dense = ops.degrade(basis, scale).reshape(h * w, -1).T  # (hw/s^2, hw)
    ref = (torch.linalg.pinv(dense) @ y.flatten()).reshape(1, 1, h, w)
    assert torch.allclose(ops.pseudoinverse(y, scale), ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-6)])
@pytest.mark.parametrize("scale", [2, 8])
def test_projection_is_consistent(dtype, tol, scale):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 64, 64, generator=gen, dtype=dtype)
    y = ops.degrade(torch.rand(3, 3, 64, 64, generator=gen, dtype=dtype), scale)
    xp = project_consistent(x, y, scale)
    rel = (ops.degrade(xp, scale) - y).norm() / y.norm()
    assert rel < tol
    # Projection is idempotent and moves x only in the range of D^+ (minimal change).
    assert torch.allclose(project_consistent(xp, y, scale), xp, atol=tol * 10)
    before = (ops.degrade(x, scale) - y).norm()
    assert before > 1e3 * rel * y.norm()  # the test input was far from consistent


@pytest.mark.parametrize("whole", [0, 4096], ids=["blocks", "whole-first"])
def test_box_projection_ends_inside_box_and_consistent(whole):
    gen = torch.Generator().manual_seed(1)
    hr = torch.rand(2, 3, 32, 32, generator=gen, dtype=torch.float64)
    y = ops.degrade(hr, 8)
    x = (hr + 0.3 * torch.randn(hr.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    xp, iters = project_consistent_box(x, y, 8, whole=whole)
    assert xp.min() >= 0 and xp.max() <= 1
    assert (((ops.degrade(xp, 8) - y) ** 2).flatten(1).mean(1) <= 1e-12).all()
    assert iters.shape == (2,) and (iters >= 1).all() and (iters < 300).all()
    # Plain projection followed by clamping would not be consistent here.
    naive = project_consistent(x, y, 8).clamp(0, 1)
    assert ((ops.degrade(naive, 8) - y) ** 2).mean() > 1e-9


def test_nearest_embedding_and_left_inverse():
    y = torch.randn(2, 3, 4, 5)
    up = ops.upsample_nearest(y, 4)
    assert up.shape == (2, 3, 16, 20)
    assert torch.equal(up, F.interpolate(y, scale_factor=4, mode="nearest"))
    assert torch.allclose(ops.downsample_average(up, 4), y)
    assert ops.upsample_nearest(y, 1) is y


def test_modcrop_and_divisibility_errors():
    x = torch.zeros(1, 3, 37, 50)
    assert ops.modcrop(x, 8).shape == (1, 3, 32, 48)
    with pytest.raises(ValueError, match="not divisible by the scale 8"):
        ops.degrade(x, 8)


def test_dequantize_adds_uniform_noise_of_one_8bit_level():
    """x + U[0, 2/255): one 8-bit level in [-1, 1] units, uniform (Kolmogorov-Smirnov against
    scipy's uniform on [0, 1) after dividing by the level), on every level alike. Half a
    level, a level in [0, 1] units (1/255), or a centred noise all fail it."""
    from scipy.stats import kstest

    levels = torch.tensor([-1.0, 0.0, 1.0 - 2 / 255]).repeat_interleave(20000)
    x = levels.reshape(3, 1, 100, 200)
    d = ops.dequantize(x, torch.Generator().manual_seed(0))
    u = ((d - x) / (2 / 255)).double()
    assert (u >= 0).all() and (u < 1).all()
    for row in u.reshape(3, -1):
        assert kstest(row.numpy(), "uniform").pvalue > 1e-3


@pytest.mark.parametrize("whole", [0, 4096], ids=["blocks", "whole-first"])
def test_box_projection_is_the_closest_feasible_point(whole):
    """Against scipy's SLSQP on a small problem: the same minimiser of ||x' - x||^2."""
    from scipy.optimize import minimize

    gen = torch.Generator().manual_seed(2)
    hr = torch.rand(1, 1, 16, 16, generator=gen, dtype=torch.float64)
    y = ops.degrade(hr, 2)  # LR 8 x 8: 2 x 2 blocks of 4 LR pixels, or first one block
    x = (hr + 0.4 * torch.randn(hr.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    xp, _ = project_consistent_box(x, y, 2, whole=whole, block=4)
    ah = ops.degradation_matrix(16, 2)
    dense = torch.kron(ah, ah).numpy()  # row-major vec(A X A^T) = (A kron A) vec(X)
    x0, yv = x.flatten().numpy(), y.flatten().numpy()
    res = minimize(
        lambda v: ((v - x0) ** 2).sum(),
        x0,
        jac=lambda v: 2 * (v - x0),
        method="SLSQP",
        bounds=[(0, 1)] * x0.size,
        constraints=[{"type": "eq", "fun": lambda v: dense @ v - yv}],
        options={"ftol": 1e-14, "maxiter": 500},
    )
    assert res.success
    assert abs(((xp.flatten().numpy() - x0) ** 2).sum() - res.fun) < 1e-6
    assert torch.allclose(xp.flatten(), torch.from_numpy(res.x), atol=1e-4)


def test_box_projection_on_saturated_photos():
    """Photos with many pixels exactly at 0 or 1 leave a thin feasible set. The projection
    must stay in the box and gain orders of magnitude in consistency (a descent on ||r||^2
    instead of the dual stalled at ~1e-6 MSE here); exact precision can take hundreds of
    Newton steps on such images, so this test bounds the result, not the iteration count."""
    import skimage.data

    wheel = torch.from_numpy(skimage.data.colorwheel()[100:260:4, 100:260:4].copy())
    hr = wheel.permute(2, 0, 1)[None].double() / 255
    assert ((hr == 0) | (hr == 1)).double().mean() > 0.2
    y = ops.degrade(hr, 4)
    gen = torch.Generator().manual_seed(0)
    x = (hr + 0.1 * torch.randn(hr.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    before = ((ops.degrade(x, 4) - y) ** 2).mean()
    xp, iters = project_consistent_box(x, y, 4, max_iter=60)
    after = ((ops.degrade(xp, 4) - y) ** 2).mean()
    assert 0 <= xp.min() and xp.max() <= 1
    assert after < 1e-8 and after < 1e-4 * before


def test_projection_of_nearly_consistent_samples_barely_changes_psnr():
    """Samples about as consistent as the diffusion SR methods of Table 1 (0.1 to 3, x1e-5):
    projecting them reaches < 1e-4 (x1e-5) on every image while PSNR moves by < 0.5 dB."""
    import skimage.data

    photos = [
        skimage.data.astronaut()[:256:2, 128:384:2],
        skimage.data.coffee()[:256:2, :256:2],
        skimage.data.chelsea()[:256:2, :256:2],
    ]
    hr = torch.stack([torch.from_numpy(p.copy()).permute(2, 0, 1) for p in photos]).double() / 255
    y = ops.degrade(hr, 8)
    gen = torch.Generator().manual_seed(0)
    # A "sample": HR plus texture noise (PSNR ~ 24 dB) whose low-pass part is mostly removed,
    # leaving a consistency error of the order Table 1 reports for SR3 / IDM.
    noise = 0.06 * torch.randn(hr.shape, generator=gen, dtype=torch.float64)
    noise = noise - 0.98 * ops.pseudoinverse(ops.degrade(noise, 8), 8)
    x = (hr + noise).clamp(0, 1)
    cons_before = ((ops.degrade(x, 8) - y) ** 2).flatten(1).mean(1)
    assert (cons_before > 1e-7).all() and (cons_before < 5e-5).all()
    xp, _ = project_consistent_box(x, y, 8)
    cons_after = ((ops.degrade(xp, 8) - y) ** 2).flatten(1).mean(1) / 1e-5
    assert (cons_after < 1e-4).all()

    def psnr(a):
        return -10 * torch.log10(((a - hr) ** 2).flatten(1).mean(1))

    assert ((psnr(xp) - psnr(x)).abs() < 0.5).all()


def _spy_block_solves(monkeypatch) -> list:
    """Record every `_solve_blocks` call of the box projection as (blocks, row ranges, column
    ranges, Newton-step budget); the calls still solve."""
    import gpsr.projection as projection

    calls = []
    solve = projection._solve_blocks

    def spy(part, rows, cols, ah_all, aw_all, x64, y64, z, lam, settings, budget, tau=None):
        calls.append((list(part), rows, cols, budget.clone()))
        return solve(part, rows, cols, ah_all, aw_all, x64, y64, z, lam, settings, budget, tau)

    monkeypatch.setattr(projection, "_solve_blocks", spy)
    return calls


@pytest.mark.parametrize("whole", [0, 24 * 16], ids=["blocks", "whole-first"])
def test_box_projection_small_images_start_with_one_block(monkeypatch, whole):
    """An LR image of at most `whole` pixels is first solved as one block per (image,
    channel), with at most `whole_iter` Newton steps, and then in blocks as before; larger
    images start in blocks. Checked on the blocks each `_solve_blocks` call receives."""
    calls = _spy_block_solves(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    hr = torch.rand(1, 2, 64, 96, generator=gen, dtype=torch.float64)  # LR 16 x 24 at 4x
    y = ops.degrade(hr, 4)
    x = (hr + 0.3 * torch.randn(hr.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    xp, _ = project_consistent_box(x, y, 4, whole=whole, whole_iter=1, block=4)
    assert ((ops.degrade(xp, 4) - y) ** 2).mean() <= 1e-12
    part, rows, cols, budget = calls[0]
    if whole:
        assert [(r[0], r[1]) for r in rows] == [(0, 16)] and [(c[0], c[1]) for c in cols] == [
            (0, 24)
        ]
        assert sorted(part) == [(0, 0, 0), (1, 0, 0)] and (budget == 1).all()
        assert len(calls) > 1 and len(calls[1][1]) > 1  # then blocks of 4 LR pixels
    else:
        assert len(rows) == 4 and len(cols) == 6 and (budget == 30).all()


def test_box_projection_keeps_a_side_of_one_block_whole(monkeypatch):
    """Every second sweep moves the block grid by half a block, but a side no longer than one
    block stays one block: moved, it would be cut into two halves again (and undo what the
    solve of the whole side reached). Blocks of 4, 8, 16, 32 LR pixels on a 16 x 32 LR image:
    once the rows (columns) are one block, they stay one block in every later visit - also
    while the longer side is still cut (a rule on the whole image, side >= max(h, w),
    would cut the rows in two at blocks of 16)."""
    calls = _spy_block_solves(monkeypatch)
    gen = torch.Generator().manual_seed(5)
    hr = torch.rand(1, 1, 64, 128, generator=gen, dtype=torch.float64)
    y = ops.degrade(hr, 4)
    x = (hr + 0.3 * torch.randn(hr.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    # tol=0: every sweep runs (up to max_sweeps), whatever the residual.
    project_consistent_box(x, y, 4, block=4, whole=0, tol=0.0, max_sweeps=10, patience=99)
    for counts in ([len(c[1]) for c in calls], [len(c[2]) for c in calls]):
        first = counts.index(1)
        assert counts[0] > 1 and len(counts) - first >= 3
        assert counts[first:] == [1] * (len(counts) - first)
    rows_whole = [len(c[1]) for c in calls].index(1)
    assert len(calls[rows_whole][2]) > 1  # rows one block while the columns are still cut


def test_box_projection_refuses_blocks_that_would_share_pixels():
    """Blocks of one colour are one block apart; narrower than 3 LR pixels, the bicubic
    support of two of them overlaps and their updates of the shared HR pixels would
    overwrite each other (the image then stops being x + D^T lam)."""
    x = torch.rand(1, 1, 64, 64, dtype=torch.float64)
    with pytest.raises(ConfigError, match="block=2 .* at least 3"):
        project_consistent_box(x, ops.degrade(x, 4), 4, block=2)


def test_downsample_average_is_the_block_mean():
    x = torch.randn(2, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    blocks = x.reshape(2, 3, 2, 4, 3, 4).mean(dim=(3, 5))
    assert torch.allclose(ops.downsample_average(x, 4), blocks, atol=1e-6)


def test_box_projection_of_an_unreachable_lr_image_is_exact_elsewhere():
    """An LR checkerboard (the Nyquist frequency, which the antialiasing kernel removes) cannot
    come from any image in [0, 1]: an unbounded dual diverges there and, solved block by
    block, spoils the rest of the image. With bounded multipliers the projection must stop
    before its whole step budget, stay in the box, end more consistent than its input, and
    make every LR pixel away from the checkerboard consistent to float precision."""
    import skimage.data

    hr = torch.from_numpy(skimage.data.coffee()[:256:2, :256:2].copy()).permute(2, 0, 1)
    hr = hr[None].double() / 255
    y = ops.degrade(hr, 4)
    y[..., 12:20, 12:20] = (torch.arange(8)[:, None] + torch.arange(8)[None]) % 2
    gen = torch.Generator().manual_seed(0)
    x = (hr + 0.05 * torch.randn(hr.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    xp, steps = project_consistent_box(x, y, 4, max_iter=300)
    r2 = (ops.degrade(xp, 4) - y) ** 2
    r2_in = ((ops.degrade(x, 4) - y) ** 2).flatten(1).mean(1)
    assert 0 <= xp.min() and xp.max() <= 1
    assert (r2.flatten(1).mean(1) <= r2_in).all()
    assert (steps < 300).all()
    far = torch.ones_like(r2, dtype=torch.bool)
    far[..., 6:26, 6:26] = False  # the checkerboard and a margin of 6 LR pixels around it
    assert r2[far].max() < 1e-10


def test_box_projection_refreshes_the_residual_wherever_a_block_reaches():
    """The projection keeps y - D clamp(z) up to date only around the blocks it changed: the
    refreshed window must cover every LR pixel whose bicubic support meets the block's HR
    pixels (a window of the block's own LR pixels would leave its neighbours stale)."""
    from gpsr.banded import degradation_band, separable
    from gpsr.projection import _block_factors, _refresh_residual

    gen = torch.Generator().manual_seed(0)
    op = degradation_band(64, 4)
    y = torch.rand(2, 16, 16, generator=gen, dtype=torch.float64)
    z = 1.4 * torch.rand(2, 64, 64, generator=gen, dtype=torch.float64) - 0.2
    raw = y - separable(op, op, z.clamp(0, 1))
    rows, _ = _block_factors(64, 4, 4, 2)
    _, _, p0, p1 = rows[2]
    z[1, p0:p1, p0:p1] += torch.randn(p1 - p0, p1 - p0, generator=gen, dtype=torch.float64)
    truth = y - separable(op, op, z.clamp(0, 1))
    own = raw.clone()
    own_factors = _block_factors(64, 4, 4, 2)
    _refresh_residual([(1, 2, 2)], (own_factors, own_factors), y, z, own, 0.0, 1.0)
    assert not torch.allclose(own, truth, atol=1e-9)  # the block's own pixels are not enough
    reach = _block_factors(64, 4, 4, 2, True)
    _refresh_residual([(1, 2, 2)], (reach, reach), y, z, raw, 0.0, 1.0)
    assert torch.allclose(raw, truth, atol=1e-12)


def test_box_projection_exact_newton_solve_matches_the_dense_system():
    """`_direct` forms A diag(mask) A^T (A = A_h kron A_w) through the separable structure:
    against the dense Kronecker product, with held multipliers as identity rows, for
    rectangular blocks (a swapped index or transposed factor would not match)."""
    from gpsr.projection import _direct

    gen = torch.Generator().manual_seed(0)
    k, b1, b2, p, q = 2, 3, 4, 9, 11
    ah = torch.randn(k, b1, p, generator=gen, dtype=torch.float64)
    aw = torch.randn(k, b2, q, generator=gen, dtype=torch.float64)
    mask = (torch.rand(k, p, q, generator=gen, dtype=torch.float64) > 0.3).double()
    held = torch.zeros(k, b1, b2, dtype=torch.float64)
    held[1, 0, 2] = 1.0
    b = torch.randn(k, b1, b2, generator=gen, dtype=torch.float64) * (1 - held)
    got = _direct(ah, aw, mask, held, 1e-6, b)
    for i in range(k):
        a = torch.kron(ah[i], aw[i])  # rows (i, j) row-major, columns (p, q) row-major
        m = a @ torch.diag(mask[i].flatten()) @ a.T + 1e-6 * torch.eye(b1 * b2, dtype=a.dtype)
        f = 1 - held[i].flatten()
        m = f[:, None] * m * f[None, :] + torch.diag(held[i].flatten())
        want = torch.linalg.solve(m, b[i].flatten()).reshape(b1, b2)
        assert torch.allclose(got[i], want, atol=1e-9, rtol=1e-7)


def test_box_projection_cg_iterates_each_system_to_its_own_tolerance():
    """`_pcg` drops converged systems from the batch: systems of very different conditioning
    (converging after different numbers of steps) must each reach their own tolerance, and
    the matrix applied must be the one of the system's own index (`matvec(v, idx)`)."""
    from gpsr.projection import _pcg

    gen = torch.Generator().manual_seed(0)
    k, n = 4, 6
    q, _ = torch.linalg.qr(torch.randn(k, n * n, n * n, generator=gen, dtype=torch.float64))
    spread = torch.tensor([1.0, 10.0, 1e3, 1e5], dtype=torch.float64)
    eig = spread[:, None] ** torch.linspace(0, 1, n * n, dtype=torch.float64)[None]
    mats = q @ torch.diag_embed(eig) @ q.transpose(1, 2)
    b = torch.randn(k, n, n, generator=gen, dtype=torch.float64)
    rtol = torch.tensor([1e-10, 1e-10, 1e-3, 1e-10], dtype=torch.float64)
    seen = []

    def matvec(v, idx):  # idx None: every system, in order
        sel = torch.arange(k) if idx is None else idx
        seen.append(sel.numel())
        return (mats[sel] @ v.reshape(len(sel), -1, 1)).reshape(v.shape)

    diag = mats.diagonal(dim1=1, dim2=2).reshape(k, n, n)
    x = _pcg(matvec, diag, b, rtol, iters=500)
    res = (mats @ x.reshape(k, -1, 1)).reshape(k, n, n) - b
    rel = res.flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)
    assert bool((rel <= rtol * 1.0001).all()), rel
    want = torch.linalg.solve(mats, b.reshape(k, -1, 1)).reshape(k, n, n)
    for i in (0, 1, 3):
        assert torch.allclose(x[i], want[i], rtol=1e-6, atol=1e-8)
    assert seen[0] == k and seen[-1] < k  # the easy systems left the batch


def test_box_projection_moves_its_block_grid_to_solve_a_region_on_a_border():
    """A saturated square across a block border (LR blocks of 4, the square on LR rows and
    columns 2-5): four sweeps of blocks, of which the second and fourth are shifted by half a
    block, reach 1e-12; a grid that never moves leaves ~3e-10 there (measured), because the
    border splits the region that only a joint solve settles."""
    gen = torch.Generator().manual_seed(0)
    hr = torch.rand(1, 1, 32, 32, generator=gen, dtype=torch.float64) * 0.2
    hr[..., 4:12, 4:12] = 1.0
    y = ops.degrade(hr, 2)
    x = torch.full_like(hr, 0.5)
    out = project_consistent_box(x, y, 2, block=4, whole=0, max_sweeps=4)[0]
    assert ((ops.degrade(out, 2) - y) ** 2).mean().item() < 1e-12
    assert out.min() >= 0 and out.max() <= 1
