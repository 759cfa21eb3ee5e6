"""Exact consistency with the LR input (docs/method.md §8): project a sample onto the images
that degrade to it, `D_s(x') = y`, optionally inside the [0, 1] box.

Both projections use the linear-time separable operators of `gpsr.banded`, so their cost
grows with the number of pixels. Images are float tensors (N, C, H, W) with LR
(N, C, H/s, W/s) in the same units.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from gpsr.banded import degradation_band, separable, separable_adjoint
from gpsr.ops import degrade, gram_inverse, pseudoinverse
from gpsr.utils.errors import ConfigError

__all__ = ["project_consistent", "project_consistent_box", "project_noise_ball"]


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
    tau: torch.Tensor | None = None,
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
    With `tau` (k,) the dual has the Tikhonov term `-tau ||lam||^2 / 2` of the noise-ball
    projection (`project_noise_ball`): its gradient is `r - tau lam` and `tau I` joins the
    Newton matrix. Returns (lam, Newton steps taken (k,)).
    """
    n = lam.shape[0]
    ah2, aw2 = ah * ah, aw * aw
    ridge = 1e-10 * float((ah2.sum(-1).amax(1) * aw2.sum(-1).amax(1)).mean())
    tau = None if tau is None else tau[:, None, None]

    def state(a, w, bs, xs, ys, lam_i, t=None):
        """z, dual gradient r (the residual, less t lam), dual objective q and consistency
        of the blocks with factors a, w, base bs, sample xs, LR ys and Tikhonov weight t at
        lam_i."""
        z = bs + a.transpose(1, 2) @ lam_i @ w
        xp = z.clamp(low, high)
        r = ys - a @ xp @ w.transpose(1, 2)
        q = _sum(0.5 * (xp - xs) ** 2 - (z - xs) * xp) + _sum(lam_i * ys)
        if t is not None:
            r = r - t * lam_i
            q = q - 0.5 * _sum(t * lam_i * lam_i)
        g = torch.where(_outward(lam_i, r, bound), 0.0, r)
        return z, r, q, (g * g).mean((1, 2))

    z, r, q, err = state(ah, aw, base, x, y, lam, tau)
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
        tl = None if tau is None else tau[live]
        free = ((zl >= low) & (zl <= high)).double()
        mask = free + (1.0 - free) * weight[live, None, None]
        # Projected Newton: multipliers held at the bound by the gradient stay there.
        held = _outward(lam_l, rl, bound).double()
        fh = 1.0 - held

        def normal(v, idx, a=al, w=wl, m=mask, f=fh, h=held, tk=tl):
            a, w, m, f, h = (_take(t, idx) for t in (a, w, m, f, h))
            u = a.transpose(1, 2) @ (f * v) @ w
            shift = ridge if tk is None else ridge + _take(tk, idx)
            return f * (a @ (m * u) @ w.transpose(1, 2) + shift * v) + h * v

        # Inexact Newton: the systems are solved more accurately as the residual falls.
        rtol = (err[live] / err0[live]).sqrt().clamp(min=1e-12, max=0.1)
        if lam.shape[1] * lam.shape[2] <= direct_size and int(iters[live[0]]) > direct_after:
            shift = ridge if tl is None else ridge + tl.reshape(-1, 1)
            delta = _direct(al, wl, mask, held, shift, fh * rl)
        else:
            shift = ridge if tl is None else ridge + tl
            diag = fh * (ah2[live] @ mask @ aw2[live].transpose(1, 2) + shift) + held
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
            parts = (_take(t, trying) for t in (al, wl, bl, xl, yl))
            tz, tr, tq, te = state(*parts, cand, None if tl is None else _take(tl, trying))
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
    **solver,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closest image to x that is consistent (`D_s(x') = y`) and inside [low, high].

    `solver`: the settings of the block dual ascent, named below (`tol`, `max_iter`,
    `sweep_iter`, `block`, `max_sweeps`, `chunk`, `patience`, `max_dual`, `whole`,
    `whole_iter`), with the defaults of `_Solver`.

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
    opt = _settings(x, y, scale, "project_consistent_box", low, high, solver)
    n, c, H, W = x.shape
    x64, y64, op_h, op_w = _as_slices(x, y, scale)
    # Warm start: the multipliers of the projection without the box, lam = (D D^T)^-1 r, for
    # which z = x + D^+ r is exactly consistent (linear time, `gpsr.banded`). Where no pixel
    # leaves the box that is already the answer; elsewhere only the blocks around clamped
    # pixels keep a residual, and only they are visited. A slice keeps lam = 0 (z = x) if
    # the clamped warm start is less consistent than x itself.
    r0 = y64 - separable(op_h, op_w, x64.clamp(low, high))
    lam = gram_inverse(r0, scale)
    lam = lam.clamp(-opt.max_dual * scale**2, opt.max_dual * scale**2)
    z = x64 + separable_adjoint(op_h, op_w, lam)
    r1 = y64 - separable(op_h, op_w, z.clamp(low, high))
    worse = (r1 * r1).flatten(1).mean(1) > (r0 * r0).flatten(1).mean(1)
    lam[worse], z[worse] = 0.0, x64[worse]
    raw = torch.where(worse[:, None, None], r0, r1)
    best_z, _, steps = _maximise_dual(x64, y64, scale, lam, z, raw, opt)
    xp = best_z.clamp(low, high).to(x.dtype).reshape(x.shape)
    return xp, steps.reshape(n, c).amax(1)


def project_noise_ball(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: int,
    sigma: float | torch.Tensor,
    low: float = 0.0,
    high: float = 1.0,
    rtol: float = 1e-4,
    max_outer: int = 40,
    **solver,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closest image to x inside [low, high] that is consistent with a noisy y within its
    noise: `||D_s(x') - y||^2 <= m sigma^2`, m = C h w the image's LR values (docs/method.md
    §10, the discrepancy principle).

    For a weight `1 / tau` on the residual, `min_{x' in box} ||x' - x||^2 / 2 +
    ||D_s x' - y||^2 / (2 tau)` has the dual of the exact projection with the added term
    `-tau ||lam||^2 / 2`, still separable over LR pixels, so the same block Newton ascent
    maximises it (`_maximise_dual`). Its residual grows with tau, from the exact
    projection's (tau = 0) to that of clamp(x) (tau -> inf): a safeguarded secant search on
    log tau finds, per image, the tau whose residual is the ball's radius, to relative
    `rtol` from inside (every returned image's `||D_s(x') - y||^2 / (m sigma^2)` is <= 1,
    and >= 1 - rtol when the ball was active). That x' is the Euclidean projection onto
    the intersection (the KKT conditions of the ball with multiplier 1 / tau). An image
    whose clamp(x) already lies in the ball is returned as clamp(x) (the projection);
    images with sigma = 0 get the exact projection (`project_consistent_box`); one whose
    ball no image in the box reaches (unreachable LR pixels) gets its least residual found.
    `solver`: the block solver's settings of `project_consistent_box`. Computed in float64.

    x: (N, C, H, W), y: (N, C, H/s, W/s), same units; sigma: a number or (N,) >= 0 in those
    units -> (x' (N, C, H, W) in [low, high], Newton steps per image (N,) long).
    """
    n, c, H, W = x.shape
    sig = torch.as_tensor(sigma, dtype=torch.float64).flatten().cpu()
    sig = sig.expand(n).clone() if sig.numel() == 1 else sig
    if sig.shape != (n,) or not bool(torch.isfinite(sig).all()) or bool((sig < 0).any()):
        raise ConfigError(
            f"project_noise_ball: sigma must be one number or one per image (N={n}), finite "
            f"and >= 0; got {sigma!r}"
        )
    # The residual must be known to a fraction of rtol: the blocks are solved until their
    # gradient's mean square is below (rtol sigma / 4)^2 (or `tol`, if smaller).
    finest = float(sig[sig > 0].min()) if bool((sig > 0).any()) else 1.0
    tol = min(solver.get("tol", _Solver.tol), (rtol * finest / 4) ** 2)
    opt = _settings(x, y, scale, "project_noise_ball", low, high, {**solver, "tol": tol})
    out = x.clamp(low, high)
    steps = torch.zeros(n, dtype=torch.long)
    exact = sig == 0
    if bool(exact.any()):
        idx = exact.nonzero().flatten().to(x.device)
        out[idx], steps[exact] = project_consistent_box(x[idx], y[idx], scale, low, high, **solver)
    x64, y64, op_h, op_w = _as_slices(x, y, scale)
    rho2 = sig.square() * (y[0].numel())  # the ball's squared radius per image
    xb = x64.clamp(low, high)
    raw = y64 - separable(op_h, op_w, xb)

    def ratio_of(r: torch.Tensor) -> torch.Tensor:
        return r.square().reshape(n, -1).sum(1).cpu() / rho2.clamp(min=1e-300)

    active = ~exact & (ratio_of(raw) > 1)
    if not bool(active.any()):
        return out, steps
    # Start where the residual is linear in tau (no clamping, tau small against the
    # eigenvalues of D D^T): r(tau) = tau (D D^T)^-1 r0, so tau0 = radius / ||(D D^T)^-1 r0||.
    lam = torch.zeros_like(y64)
    z = x64.clone()
    kr = gram_inverse(raw, scale).square().reshape(n, -1).sum(1).sqrt().cpu()
    log_tau = torch.log(rho2.sqrt() / kr.clamp(min=1e-300))
    log_lo = torch.full((n,), -float("inf"), dtype=torch.float64)  # largest tau inside
    log_hi = torch.full((n,), float("inf"), dtype=torch.float64)  # smallest tau outside
    prev = None  # (log tau, log ratio) of the previous evaluation
    best_ratio = torch.full((n,), float("inf"), dtype=torch.float64)
    target = math.log(1.0 - rtol / 2)
    for _ in range(max_outer):
        slices = active.repeat_interleave(c).to(x.device)
        tau = log_tau.exp().repeat_interleave(c).to(x.device)
        best_z, best_lam, st = _maximise_dual(x64, y64, scale, lam, z, raw, opt, tau, slices)
        z[slices], lam[slices] = best_z[slices], best_lam[slices]
        raw = y64 - separable(op_h, op_w, z.clamp(low, high))
        steps += torch.where(active, st.reshape(n, c).amax(1), 0)
        ratio = ratio_of(raw)
        inside = active & (ratio <= 1)
        # Keep each image's answer: its latest iterate inside the ball (the largest tau
        # inside so far: the closest to the projection), else its least residual.
        keep = inside | (active & ~(log_lo > -float("inf")) & (ratio < best_ratio))
        best_ratio = torch.where(active & (ratio < best_ratio), ratio, best_ratio)
        if bool(keep.any()):
            idx = keep.nonzero().flatten().to(x.device)
            out[idx] = z.reshape(n, c, H, W)[idx].clamp(low, high).to(x.dtype)
        log_lo = torch.where(inside, log_tau, log_lo)
        log_hi = torch.where(active & ~inside, log_tau, log_hi)
        active &= ~(inside & (ratio >= 1 - rtol))
        if not bool(active.any()):
            break
        # Safeguarded secant on f(log tau) = log ratio - target (slope 2 where the residual
        # is linear in tau), kept inside the bracket (else its middle, or a step of e).
        f = torch.log(ratio.clamp(min=1e-300)) - target
        slope = torch.full((n,), 2.0, dtype=torch.float64)
        if prev is not None:
            dt, df = log_tau - prev[0], f - prev[1]
            fit = (dt.abs() > 1e-12) & (df / dt.where(dt != 0, 1.0) > 0.05)
            slope = torch.where(fit, df / dt.where(dt != 0, 1.0), slope)
        prev = (log_tau.clone(), f)
        step = log_tau - f / slope
        bounded = torch.isfinite(log_lo) & torch.isfinite(log_hi)
        fallback = torch.where(
            bounded,
            (log_lo + log_hi) / 2,
            torch.where(torch.isfinite(log_hi), log_tau - 1.0, log_tau + 1.0),
        )
        ok = (step > log_lo) & (step < log_hi) & torch.isfinite(step)
        log_tau = torch.where(active, torch.where(ok, step, fallback), log_tau)
    return out, steps


@dataclass(frozen=True)
class _Solver:
    """Settings of the block dual ascent and their defaults (`project_consistent_box` says
    what each does); `low`, `high` the box."""

    low: float = 0.0
    high: float = 1.0
    tol: float = 1e-13
    max_iter: int = 300
    sweep_iter: int = 30
    block: int = 16
    max_sweeps: int = 30
    chunk: int = 2**18
    patience: int = 3
    max_dual: float = 1000.0
    whole: int = 4096
    whole_iter: int = 6


def _settings(x, y, scale: int, name: str, low: float, high: float, solver: dict) -> _Solver:
    """Check shapes and the block size; -> the solver settings (`solver` over the defaults)."""
    _check_shapes(x, y, scale, name)
    opt = _Solver(low, high, **solver)
    if opt.block < 3:  # one colour's blocks are one block apart; the bicubic reaches 1.5 LR pixels
        raise ConfigError(
            f"{name}: block={opt.block} LR pixels; it must be at least 3, or blocks "
            f"solved together would share HR pixels"
        )
    return opt


def _as_slices(x: torch.Tensor, y: torch.Tensor, scale: int):
    """x (N, C, H, W), y (N, C, h, w) -> float64 slices (N*C, H, W), (N*C, h, w) and the
    banded factors of the two sides."""
    n, c, H, W = x.shape
    x64 = x.reshape(n * c, H, W).to(torch.float64)
    y64 = y.reshape(n * c, H // scale, W // scale).to(torch.float64)
    return x64, y64, degradation_band(H, scale), degradation_band(W, scale)


def _maximise_dual(
    x64: torch.Tensor,
    y64: torch.Tensor,
    scale: int,
    lam: torch.Tensor,
    z: torch.Tensor,
    raw: torch.Tensor,
    opt: _Solver,
    tau: torch.Tensor | None = None,
    todo: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sweeps of block dual ascent (see `project_consistent_box`) from the multipliers
    lam (S, h, w), z = x + D^T lam (S, H, W) and the residual raw = y - D clamp(z), all
    float64 slices, updated in place. `tau` (S,): the Tikhonov weight of each slice's dual
    (`project_noise_ball`; None: 0, the exact projection); `todo` (S,) bool: the slices to
    work on (None: all). -> (each slice's best z, its lam, Newton steps (S,) long)."""
    S, H, W = z.shape
    h, w = H // scale, W // scale
    low, high, tol, block = opt.low, opt.high, opt.tol, opt.block
    bound = opt.max_dual * scale**2  # |lam| bound: pixel changes are about lam / s^2
    steps = torch.zeros(S, dtype=torch.long)
    tau_s = None if tau is None else tau[:, None, None]

    # `raw` is refreshed only on the LR pixels that the solved blocks reach, so a sweep
    # costs in proportion to the blocks it visits.
    def residual() -> torch.Tensor:
        """The projected gradient (S, h, w): the residual (less tau lam), less the entries
        of multipliers held at the bound."""
        grad = raw if tau_s is None else raw - tau_s * lam
        return torch.where(_outward(lam, grad, bound), 0.0, grad)

    best_z, best_err = z.clone(), torch.full((S,), float("inf"), dtype=torch.float64)
    best_lam = lam.clone()
    stalled = torch.zeros(S, dtype=torch.long)
    first_whole = h * w <= opt.whole and max(h, w) > block  # (else blocks are whole anyway)
    for sweep in range(opt.max_sweeps + 1):
        r = residual()
        err = (r * r).flatten(1).mean(1)
        better = err < best_err
        best_z[better], best_err[better], best_lam[better] = z[better], err[better], lam[better]
        stalled = torch.where(better, torch.zeros_like(stalled), stalled + 1)
        busy = (err > tol) & (steps < opt.max_iter) & (stalled < opt.patience)
        if todo is not None:
            busy &= todo
        if sweep == opt.max_sweeps or not bool(busy.any()):
            break
        if first_whole and sweep == 0:  # one block per (image, channel)
            side, shift, per_sweep = max(h, w), 0, opt.whole_iter
        else:
            # Regions that stay hard are solved together in larger blocks (up to 512 HR
            # pixels); from one sweep to the next the grid moves by half a block.
            grid_sweep = sweep - 1 if first_whole else sweep  # sweeps in blocks so far
            side = max(block, min(block * 2 ** (grid_sweep // 2), 512 // scale))
            shift, per_sweep = (side // 2 if grid_sweep % 2 else 0), opt.sweep_iter
        rows, ah_all = _block_factors(H, scale, side, shift)
        cols, aw_all = _block_factors(W, scale, side, shift)
        ah_all, aw_all = ah_all.to(z.device), aw_all.to(z.device)
        reach = (
            _block_factors(H, scale, side, shift, True),
            _block_factors(W, scale, side, shift, True),
        )
        taken = torch.zeros(S, dtype=torch.long)
        for colour in ((0, 0), (0, 1), (1, 0), (1, 1)):
            if colour != (0, 0):
                r = residual()
            todo_blocks = [
                (si, bi, bj)
                for si in busy.nonzero().flatten().tolist()
                for bi in range(colour[0], len(rows), 2)
                for bj in range(colour[1], len(cols), 2)
                if float(r[si, rows[bi][0] : rows[bi][1], cols[bj][0] : cols[bj][1]].pow(2).mean())
                > tol / 4
            ]
            per_chunk = max(1, opt.chunk // (ah_all.shape[2] * aw_all.shape[2]))
            for start in range(0, len(todo_blocks), per_chunk):
                part = todo_blocks[start : start + per_chunk]
                budget = (opt.max_iter - steps[[p[0] for p in part]]).clamp(max=per_sweep)
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
                    tau,
                )
                for (si, _, _), k in zip(part, its.tolist()):
                    taken[si] = max(int(taken[si]), k)
            for start in range(0, len(todo_blocks), per_chunk):
                part = todo_blocks[start : start + per_chunk]
                _refresh_residual(part, reach, y64, z, raw, low, high)
        steps += taken
    return best_z, best_lam, steps


def _solve_blocks(
    part, rows, cols, ah_all, aw_all, x64, y64, z, lam, settings, budget, tau=None
) -> torch.Tensor:
    """Solve the blocks `part` [(slice, block row, block col)] within `budget` (k,) Newton
    steps each, settings = (low, high, tol, bound) as in `_newton_blocks`, `tau` (S,) each
    slice's Tikhonov weight or None; write lam and z back; returns the steps taken (k,)."""
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
    taus = None if tau is None else tau[[p[0] for p in part]]
    ls, its = _newton_blocks(ah, aw, xs, base, ys, ls, low, high, tol, budget, bound, tau=taus)
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
