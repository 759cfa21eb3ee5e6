"""Exact consistency with the LR input (docs/method.md §8): project a sample onto the images
that degrade to it, `D_s(x') = y`, optionally inside the [0, 1] box.

Both projections use the linear-time separable operators of `gpsr.banded`, so their cost
grows with the number of pixels. Images are float tensors (N, C, H, W) with LR
(N, C, H/s, W/s) in the same units.
"""

from __future__ import annotations

import functools

import torch

from gpsr.banded import degradation_band, separable, separable_adjoint
from gpsr.ops import degrade, gram_inverse, pseudoinverse
from gpsr.utils.errors import ConfigError

__all__ = ["project_consistent", "project_consistent_box"]


def _check_shapes(x: torch.Tensor, y: torch.Tensor, scale: int, name: str) -> None:
    if (
        x.dim() != 4
        or y.shape[:2] != x.shape[:2]
        or y.shape[-2] * scale != x.shape[-2]
        or y.shape[-1] * scale != x.shape[-1]
    ):
        raise ConfigError(
            f"{name}: x {tuple(x.shape)} and y {tuple(y.shape)} do not match scale {scale}"
        )


def project_consistent(x: torch.Tensor, y: torch.Tensor, scale: int) -> torch.Tensor:
    """Null-space projection `x + D_s^+(y - D_s(x))`: the closest `x'` with `D_s(x') = y`.

    x: (N, C, H, W), y: (N, C, H/s, W/s), same units -> (N, C, H, W), consistent to float
    precision. Not clamped: see `project_consistent_box` for outputs that must stay in a range.
    """
    _check_shapes(x, y, scale, "project_consistent")
    return x + pseudoinverse(y - degrade(x, scale), scale)


# ---------------------------------------------------------------------- box projection
#
# The Euclidean projection onto {D x' = y} intersected with the box is `x' = clamp(z)`,
# z = x + D^T lam, for the lam that maximises the concave dual
#     q(lam) = ||x' - x||^2 / 2 + <lam, y - D x'> = sum_p g_p(z_p) + <lam, y>,
#     g_p(z) = (clamp(z) - x_p)^2 / 2 - (z - x_p) clamp(z),
# a sum over HR pixels plus a linear term. An LR pixel's multiplier only reaches the HR pixels
# under its bicubic support, so the dual splits into blocks of LR pixels that interact only
# through a few pixels at their borders. The dual is maximised block by block (block
# coordinate ascent, in four colours so that blocks solved together never share an HR pixel),
# each block by a semi-smooth Newton method with its own line search, and the sweeps repeat
# until the whole image is consistent. A hard region (a saturated background, where many
# pixels sit on a bound and the feasible set is thin) then costs iterations in its own
# blocks only, instead of shrinking every step of a global Newton method, and the work
# grows with the number of pixels.


def _block_edges(h: int, block: int, shift: int) -> list[int]:
    """Edges of LR blocks of side `block` along a side of h pixels, the grid moved by `shift`.
    A side no longer than one block stays one block, however the grid moves: moved, it would
    only be cut in two again."""
    if h <= block:
        return [0, h]
    inner = range(shift if shift else block, h, block)
    return [0, *[e for e in inner if 0 < e < h], h]


@functools.lru_cache(maxsize=4)
def _dense_factor(n_hr: int, scale: int) -> torch.Tensor:
    """One side's factor A (n_hr / scale, n_hr) as a dense float64 matrix on the CPU."""
    return degradation_band(n_hr, scale).adjoint(torch.eye(n_hr // scale, dtype=torch.float64))


@functools.lru_cache(maxsize=64)
def _block_factors(n_hr: int, scale: int, block: int, shift: int, reach: bool = False):
    """One side's blocks: ranges [(i0, i1, p0, p1)] ([p0, p1): the HR pixels under LR rows
    i0..i1-1) and the local factors `A[i0:i1, p0:p1]` stacked and zero-padded to
    (blocks, max rows, max cols), float64 on the CPU. With `reach`, each block's rows are
    widened to every LR row that sees one of the block's HR pixels: the LR pixels whose
    residual changes when the block's multipliers do."""
    a = _dense_factor(n_hr, scale)
    support = a.abs() > 0  # (n_lr, n_hr)

    def span(v: torch.Tensor) -> tuple[int, int]:
        idx = v.nonzero().flatten()
        return int(idx[0]), int(idx[-1]) + 1

    edges = _block_edges(n_hr // scale, block, shift)
    ranges, factors = [], []
    for i0, i1 in zip(edges[:-1], edges[1:]):
        if reach:
            p0, p1 = span(support[i0:i1].any(0))
            i0, i1 = span(support[:, p0:p1].any(1))
        p0, p1 = span(support[i0:i1].any(0))
        ranges.append((i0, i1, p0, p1))
        factors.append(a[i0:i1, p0:p1])
    stack = torch.zeros(
        len(ranges), max(f.shape[0] for f in factors), max(f.shape[1] for f in factors),
        dtype=torch.float64,
    )  # fmt: skip
    for k, f in enumerate(factors):
        stack[k, : f.shape[0], : f.shape[1]] = f
    return ranges, stack


def _sum(v: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """Per-block sums of v (k, m, n): (k,), or (k, 1, 1) with keepdim."""
    return v.sum((1, 2), keepdim=keepdim)


def _outward(lam: torch.Tensor, r: torch.Tensor, bound: float) -> torch.Tensor:
    """Multipliers at the bound |lam| = `bound` whose gradient r points further out.

    The dual is maximised over |lam| <= bound, which is the exact-penalty form of the
    projection: min ||x' - x||^2 / 2 + bound * ||D x' - y||_1 over the box. When the LR image
    is reachable and `bound` exceeds the multipliers of its solution (the default leaves
    a wide margin over every image tried), that is the exact projection; where no image in
    the box can produce the LR pixels, the multipliers stop at the bound instead of growing
    without end, and only those pixels are left inconsistent (an L1-least residual). The
    projected gradient, r with these entries set to 0, is what must vanish at the optimum.
    """
    return ((lam >= bound) & (r > 0)) | ((lam <= -bound) & (r < 0))


def _take(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """t[idx], or t itself for idx None (all of it: no copy, no indexing)."""
    return t if idx is None else t[idx]


def _pcg(matvec, diag: torch.Tensor, b: torch.Tensor, rtol: torch.Tensor, iters: int):
    """Jacobi-preconditioned conjugate gradients for independent SPD systems (one per
    leading index); stops each system at relative residual `rtol` (n,). `matvec(v, idx)`
    applies the matrices of systems idx (m,) long (None: all n, in order) to v (m, ...). A
    system leaves the iteration once it has converged; while none has, nothing is indexed
    (small systems cost the number of operations, not their size)."""
    x = torch.zeros_like(b)
    idx, whole = torch.arange(b.shape[0]), True
    xa, r, d = torch.zeros_like(b), b.clone(), diag
    stop = rtol[:, None, None] ** 2 * _sum(b * b, keepdim=True)
    p = r / d
    rz = _sum(r * p, keepdim=True)  # > 0 while r != 0 (d > 0), and p A p > 0 (A is SPD)
    for k in range(iters + 1):
        going = (_sum(r * r, keepdim=True) > stop).flatten()
        if not bool(going.all()):
            x[idx[~going]] = xa[~going]
            idx, xa, r, p, d, stop, rz = (t[going] for t in (idx, xa, r, p, d, stop, rz))
            whole = False
            if idx.numel() == 0:
                return x
        if k == iters:
            break
        if k > 0:
            zt = r / d
            rz_new = _sum(r * zt, keepdim=True)
            p = zt.addcmul_(rz_new / rz, p)
            rz = rz_new
        ap = matvec(p, None if whole else idx)
        alpha = rz / _sum(p * ap, keepdim=True)
        xa = xa.addcmul_(alpha, p)
        r = r.addcmul_(alpha, ap, value=-1.0)
    if whole:
        return xa
    x[idx] = xa
    return x


def _direct(
    ah: torch.Tensor,
    aw: torch.Tensor,
    mask: torch.Tensor,
    held: torch.Tensor,
    ridge: float,
    b: torch.Tensor,
) -> torch.Tensor:
    """Solve the Newton systems of `_newton_blocks` exactly, by Cholesky factorisation.

    ah (k, b1, P), aw (k, b2, Q): the blocks' factors; mask (k, P, Q): each HR pixel's
    weight; held, b (k, b1, b2): multipliers held at the bound (their rows become the
    identity) and the right-hand side. The matrix `(A_h (x) A_w) diag(mask) (A_h (x) A_w)^T
    + ridge I` is formed through the separable structure in O(k (b1 b2)^2 P + k P Q b2^2)
    operations and factorised in O(k (b1 b2)^3): cheap for blocks of a few hundred LR
    pixels, where conjugate gradients would take tens of small steps. Returns delta
    (k, b1, b2).
    """
    k, b1, p = ah.shape
    b2 = aw.shape[1]
    n = b1 * b2
    # t[p, j, l] = sum_q aw[j, q] aw[l, q] mask[p, q]; then sum_p ah[i, p] ah[m, p] t[p, j, l].
    t = (aw[:, None] * mask[:, :, None, :]) @ aw.transpose(1, 2)[:, None]  # (k, P, b2, b2)
    pairs = (ah[:, :, None, :] * ah[:, None, :, :]).reshape(k, b1 * b1, p)
    m = (pairs @ t.reshape(k, p, b2 * b2)).reshape(k, b1, b1, b2, b2)
    m = m.permute(0, 1, 3, 2, 4).reshape(k, n, n)
    free = (1.0 - held).reshape(k, n)
    m = free[:, :, None] * m * free[:, None, :]
    m.diagonal(dim1=1, dim2=2).add_(free * ridge + held.reshape(k, n))
    factor, info = torch.linalg.cholesky_ex(m)
    if bool((info > 0).any()):  # not positive definite in floating point: least squares
        return torch.linalg.lstsq(m, b.reshape(k, n, 1)).solution.reshape(k, b1, b2)
    return torch.cholesky_solve(b.reshape(k, n, 1), factor).reshape(k, b1, b2)


def _newton_blocks(
    ah: torch.Tensor,
    aw: torch.Tensor,
    x: torch.Tensor,
    base: torch.Tensor,
    y: torch.Tensor,
    lam: torch.Tensor,
    low: float,
    high: float,
    tol: float,
    budget: torch.Tensor,
    bound: float,
    clamped_weight: float = 1e-3,
    direct_size: int = 256,
    direct_after: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximise each block's dual by semi-smooth Newton with Armijo backtracking.

    Block k: ah (k, b, P), aw (k, b, Q) the local factors; x, base (k, P, Q) the sample and
    `z - A_h^T lam A_w` on the block's HR pixels; y, lam (k, b, b); budget (k,) long, the
    most Newton steps it may take; `bound` the largest |lam| (`_outward`). A block stops once
    the mean square of its projected gradient (`_outward`) is at most `tol`. Each step
    solves `A M A^T delta = r` (M: the unclamped pixels) by Jacobi-preconditioned CG, to a
    relative accuracy that tightens as the residual falls;
    blocks of at most `direct_size` LR pixels that are still unsolved after `direct_after`
    steps (the hard ones, where CG needs many iterations) switch to exact Cholesky solves
    (`_direct`). All live blocks have taken the same number of steps, so they switch together.
    When every pixel under an LR pixel is clamped that system is singular and Newton
    stalls, so a block whose line search had to backtrack gives its clamped pixels the small
    weight `clamped_weight` (clamped pixels can come back), shrinking tenfold after every
    full step, which keeps Newton's fast local convergence on well-behaved blocks.
    Returns (lam, Newton steps taken (k,)).
    """
    n = lam.shape[0]
    ah2, aw2 = ah * ah, aw * aw
    ridge = 1e-10 * float((ah2.sum(-1).amax(1) * aw2.sum(-1).amax(1)).mean())

    def state(a, w, bs, xs, ys, lam_i):
        """z, residual r, dual objective q and consistency of the blocks with factors a, w,
        base bs, sample xs and LR ys at lam_i."""
        z = bs + a.transpose(1, 2) @ lam_i @ w
        xp = z.clamp(low, high)
        r = ys - a @ xp @ w.transpose(1, 2)
        q = _sum(0.5 * (xp - xs) ** 2 - (z - xs) * xp) + _sum(lam_i * ys)
        g = torch.where(_outward(lam_i, r, bound), 0.0, r)
        return z, r, q, (g * g).mean((1, 2))

    z, r, q, err = state(ah, aw, base, x, y, lam)
    err0 = err.clamp(min=1e-300)
    iters = torch.zeros(n, dtype=torch.long)
    weight = torch.zeros(n, dtype=torch.float64)
    while True:
        live = ((err > tol) & (iters < budget)).nonzero().flatten()
        if live.numel() == 0:
            break
        iters[live] += 1
        zl, rl, ql, lam_l = z[live], r[live], q[live], lam[live]
        al, wl, bl, xl, yl = ah[live], aw[live], base[live], x[live], y[live]
        free = ((zl >= low) & (zl <= high)).double()
        mask = free + (1.0 - free) * weight[live, None, None]
        # Projected Newton: multipliers held at the bound by the gradient stay there.
        held = _outward(lam_l, rl, bound).double()
        fh = 1.0 - held

        def normal(v, idx, a=al, w=wl, m=mask, f=fh, h=held):
            a, w, m, f, h = (_take(t, idx) for t in (a, w, m, f, h))
            u = a.transpose(1, 2) @ (f * v) @ w
            return f * (a @ (m * u) @ w.transpose(1, 2) + ridge * v) + h * v

        # Inexact Newton: the systems are solved more accurately as the residual falls.
        rtol = (err[live] / err0[live]).sqrt().clamp(min=1e-12, max=0.1)
        if lam.shape[1] * lam.shape[2] <= direct_size and int(iters[live[0]]) > direct_after:
            delta = _direct(al, wl, mask, held, ridge, fh * rl)
        else:
            diag = fh * (ah2[live] @ mask @ aw2[live].transpose(1, 2) + ridge) + held
            delta = _pcg(normal, diag, fh * rl, rtol, iters=200)
        # Armijo backtracking along the projection arc on the concave dual, whose gradient
        # is r: delta is an ascent direction, so a small enough step increases q.
        step = torch.ones(live.numel(), dtype=torch.float64)
        # Copies already (indexed by live); a block's entries are read only while its step is
        # still tried, so accepted steps are written over them in place.
        zn, rn, qn, en = zl, rl, ql, err[live]
        trying = None  # the blocks whose step is not yet accepted (None: all of them)
        for _ in range(40):
            lam_t = _take(lam_l, trying)
            cand = (lam_t + _take(step, trying)[:, None, None] * _take(delta, trying)).clamp(
                -bound, bound
            )
            tz, tr, tq, te = state(*(_take(t, trying) for t in (al, wl, bl, xl, yl)), cand)
            ok = tq >= _take(ql, trying) + 1e-4 * _sum(_take(rl, trying) * (cand - lam_t))
            if trying is None and bool(ok.all()):  # every block takes the full step
                lam_l, zn, rn, qn, en = cand, tz, tr, tq, te
                break
            every = torch.arange(live.numel()) if trying is None else trying
            acc = every[ok]
            for kept, trial in ((lam_l, cand), (zn, tz), (rn, tr), (qn, tq), (en, te)):
                kept[acc] = trial[ok]
            trying = every[~ok]
            if trying.numel() == 0:
                break
            step[trying] *= 0.5
        lam[live] = lam_l
        z[live], r[live], q[live], err[live] = zn, rn, qn, en
        full = step == 1.0
        weight[live] = torch.where(full, weight[live] * 0.1, torch.full_like(step, clamped_weight))
    return lam, iters


def project_consistent_box(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: int,
    low: float = 0.0,
    high: float = 1.0,
    tol: float = 1e-13,
    max_iter: int = 300,
    sweep_iter: int = 30,
    block: int = 16,
    max_sweeps: int = 30,
    chunk: int = 2**18,
    patience: int = 3,
    max_dual: float = 1000.0,
    whole: int = 4096,
    whole_iter: int = 6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closest image to x that is consistent (`D_s(x') = y`) and inside [low, high].

    `x' = clamp(x + D_s^T lam)` with lam maximising the concave dual, block by block (see the
    comment above `_block_edges`), each block by semi-smooth Newton (`_newton_blocks`, at
    most `sweep_iter` steps per visit). Each (image, channel) is its own problem. A sweep
    cuts the LR image into blocks and visits their four colours; blocks are solved together
    up to `chunk` HR pixels at a time, so memory is bounded by the chunk and work grows
    with the number of pixels (2**18 keeps a batch's tensors of a few MB in the cache:
    larger batches made a 2048 x 2048 image 10-20 % slower per pixel). From one sweep to the
    next the block grid moves by half a block (a border between two blocks lies inside one
    in the next sweep; a side no longer than a block stays one block), and every second
    sweep the blocks double in side (from `block` LR pixels up to 512 HR pixels), so a hard
    region that spans several blocks is finally solved as one. Sweeps repeat until every
    image's consistency `mean((D_s(x') - y)^2)` is at most `tol`, an image has taken
    `max_iter` Newton steps (the most any of its blocks took in a sweep, summed over the
    sweeps), after `max_sweeps`, or once `patience` sweeps in a row have not improved it.
    An LR image of at most `whole` pixels (but larger than one block) first gets one sweep
    in which each (image, channel) is a single block, of at most `whole_iter` Newton steps:
    at that size a sweep costs its number of tensor operations more than its arithmetic,
    and an image without hard regions is usually solved there; what is left goes on in
    blocks as above.

    An LR image that no image in the box can produce (an upscaled or sharpened photo with
    clipped, one-pixel-thin dark or bright lines can be one) has no exact projection. The
    multipliers are therefore bounded, |lam| <= max_dual * s^2 (pixel changes are about
    lam / s^2; `_outward` says why this is the exact projection wherever the LR image is
    reachable): the unreachable LR pixels are left with a small residual and every other
    one is made consistent. The measure of progress is then the projected gradient (the
    residual, less the entries of multipliers held at the bound), and each (image, channel)
    returns its best iterate by that measure. Computed in float64; every output pixel lies
    in the box.
    x: (N, C, H, W), y: (N, C, H/s, W/s), same units -> (x' (N, C, H, W) in [low, high],
    Newton steps per image (N,) long).
    """
    _check_shapes(x, y, scale, "project_consistent_box")
    if block < 3:  # one colour's blocks are one block apart; the bicubic reaches 1.5 LR pixels
        raise ConfigError(
            f"project_consistent_box: block={block} LR pixels; it must be at least 3, or blocks "
            f"solved together would share HR pixels"
        )
    n, c, H, W = x.shape
    h, w = H // scale, W // scale
    x64 = x.reshape(n * c, H, W).to(torch.float64)
    y64 = y.reshape(n * c, h, w).to(torch.float64)
    op_h, op_w = degradation_band(H, scale), degradation_band(W, scale)
    steps = torch.zeros(n * c, dtype=torch.long)
    bound = max_dual * scale**2
    # Warm start: the multipliers of the projection without the box, lam = (D D^T)^-1 r, for
    # which z = x + D^+ r is exactly consistent (linear time, `gpsr.banded`). Where no pixel
    # leaves the box that is already the answer; elsewhere only the blocks around clamped
    # pixels keep a residual, and only they are visited. A slice keeps lam = 0 (z = x) if
    # the clamped warm start is less consistent than x itself.
    r0 = y64 - separable(op_h, op_w, x64.clamp(low, high))
    lam = gram_inverse(r0, scale)
    lam = lam.clamp(-bound, bound)
    z = x64 + separable_adjoint(op_h, op_w, lam)
    r1 = y64 - separable(op_h, op_w, z.clamp(low, high))
    worse = (r1 * r1).flatten(1).mean(1) > (r0 * r0).flatten(1).mean(1)
    lam[worse], z[worse] = 0.0, x64[worse]

    # The residual y - D clamp(z) (r0 where z went back to x), from here on refreshed only on
    # the LR pixels that the solved blocks reach, so a sweep costs in proportion to the
    # blocks it visits.
    raw = torch.where(worse[:, None, None], r0, r1)

    def residual() -> torch.Tensor:
        """The projected gradient (n*c, h, w): the residual less the entries of multipliers
        held at the bound."""
        return torch.where(_outward(lam, raw, bound), 0.0, raw)

    best_z, best_err = z.clone(), torch.full((n * c,), float("inf"), dtype=torch.float64)
    stalled = torch.zeros(n * c, dtype=torch.long)
    first_whole = h * w <= whole and max(h, w) > block  # (else blocks are whole anyway)
    for sweep in range(max_sweeps + 1):
        r = residual()
        err = (r * r).flatten(1).mean(1)
        better = err < best_err
        best_z[better], best_err[better] = z[better], err[better]
        stalled = torch.where(better, torch.zeros_like(stalled), stalled + 1)
        busy = (err > tol) & (steps < max_iter) & (stalled < patience)
        if sweep == max_sweeps or not bool(busy.any()):
            break
        if first_whole and sweep == 0:  # one block per (image, channel)
            side, shift, per_sweep = max(h, w), 0, whole_iter
        else:
            # Regions that stay hard are solved together in larger blocks (up to 512 HR
            # pixels); from one sweep to the next the grid moves by half a block.
            grid_sweep = sweep - 1 if first_whole else sweep  # sweeps in blocks so far
            side = max(block, min(block * 2 ** (grid_sweep // 2), 512 // scale))
            shift, per_sweep = (side // 2 if grid_sweep % 2 else 0), sweep_iter
        rows, ah_all = _block_factors(H, scale, side, shift)
        cols, aw_all = _block_factors(W, scale, side, shift)
        ah_all, aw_all = ah_all.to(x.device), aw_all.to(x.device)
        reach = (
            _block_factors(H, scale, side, shift, True),
            _block_factors(W, scale, side, shift, True),
        )
        taken = torch.zeros(n * c, dtype=torch.long)
        for colour in ((0, 0), (0, 1), (1, 0), (1, 1)):
            if colour != (0, 0):
                r = residual()
            todo = [
                (si, bi, bj)
                for si in busy.nonzero().flatten().tolist()
                for bi in range(colour[0], len(rows), 2)
                for bj in range(colour[1], len(cols), 2)
                if float(r[si, rows[bi][0] : rows[bi][1], cols[bj][0] : cols[bj][1]].pow(2).mean())
                > tol / 4
            ]
            per_chunk = max(1, chunk // (ah_all.shape[2] * aw_all.shape[2]))
            for start in range(0, len(todo), per_chunk):
                part = todo[start : start + per_chunk]
                budget = (max_iter - steps[[p[0] for p in part]]).clamp(max=per_sweep)
                its = _solve_blocks(
                    part,
                    rows,
                    cols,
                    ah_all,
                    aw_all,
                    x64,
                    y64,
                    z,
                    lam,
                    (low, high, tol / 4, bound),
                    budget,
                )
                for (si, _, _), k in zip(part, its.tolist()):
                    taken[si] = max(int(taken[si]), k)
            for start in range(0, len(todo), per_chunk):
                _refresh_residual(todo[start : start + per_chunk], reach, y64, z, raw, low, high)
        steps += taken
    xp = best_z.clamp(low, high).to(x.dtype).reshape(x.shape)
    return xp, steps.reshape(n, c).amax(1)


def _solve_blocks(
    part, rows, cols, ah_all, aw_all, x64, y64, z, lam, settings, budget
) -> torch.Tensor:
    """Solve the blocks `part` [(slice, block row, block col)] within `budget` (k,) Newton
    steps each, settings = (low, high, tol, bound) as in `_newton_blocks`; write lam and z
    back; returns the steps taken (k,)."""
    low, high, tol, bound = settings
    bi = torch.tensor([p[1] for p in part])
    bj = torch.tensor([p[2] for p in part])
    ah, aw = ah_all[bi], aw_all[bj]
    k = len(part)
    P, Q, b1, b2 = ah.shape[2], aw.shape[2], ah.shape[1], aw.shape[1]
    xs = x64.new_zeros(k, P, Q)
    zs = x64.new_zeros(k, P, Q)
    ys = x64.new_zeros(k, b1, b2)
    ls = x64.new_zeros(k, b1, b2)
    for j, (si, r, c) in enumerate(part):
        i0, i1, p0, p1 = rows[r]
        j0, j1, q0, q1 = cols[c]
        xs[j, : p1 - p0, : q1 - q0] = x64[si, p0:p1, q0:q1]
        zs[j, : p1 - p0, : q1 - q0] = z[si, p0:p1, q0:q1]
        ys[j, : i1 - i0, : j1 - j0] = y64[si, i0:i1, j0:j1]
        ls[j, : i1 - i0, : j1 - j0] = lam[si, i0:i1, j0:j1]
    base = zs - ah.transpose(1, 2) @ ls @ aw
    ls, its = _newton_blocks(ah, aw, xs, base, ys, ls, low, high, tol, budget, bound)
    zs = base + ah.transpose(1, 2) @ ls @ aw
    for j, (si, r, c) in enumerate(part):
        i0, i1, p0, p1 = rows[r]
        j0, j1, q0, q1 = cols[c]
        z[si, p0:p1, q0:q1] = zs[j, : p1 - p0, : q1 - q0]
        lam[si, i0:i1, j0:j1] = ls[j, : i1 - i0, : j1 - j0]
    return its


def _refresh_residual(part, reach, y64, z, raw, low, high) -> None:
    """Recompute the residual `raw` = y - D clamp(z) on the LR pixels that blocks `part`
    [(slice, block row, block col)] can have changed (`_block_factors` with reach), in place."""
    (rows, ah_all), (cols, aw_all) = reach
    bi = torch.tensor([p[1] for p in part])
    bj = torch.tensor([p[2] for p in part])
    ah, aw = ah_all[bi].to(z.device), aw_all[bj].to(z.device)
    zs = z.new_zeros(len(part), ah.shape[2], aw.shape[2])
    for j, (si, r, c) in enumerate(part):
        _, _, p0, p1 = rows[r]
        _, _, q0, q1 = cols[c]
        zs[j, : p1 - p0, : q1 - q0] = z[si, p0:p1, q0:q1]
    fit = ah @ zs.clamp(low, high) @ aw.transpose(1, 2)
    for j, (si, r, c) in enumerate(part):
        i0, i1, _, _ = rows[r]
        j0, j1, _, _ = cols[c]
        raw[si, i0:i1, j0:j1] = y64[si, i0:i1, j0:j1] - fit[j, : i1 - i0, : j1 - j0]
