"""Exact consistency with the LR input (docs/method.md §8): project a sample onto the images
that degrade to it, `D_s(x') = y`, optionally inside the [0, 1] box.

Both projections use the separable degradation matrices of `gpsr.ops`. Images are float
tensors (N, C, H, W) with LR (N, C, H/s, W/s) in the same units.
"""

from __future__ import annotations

import torch

from gpsr.ops import degradation_matrix, degrade, pseudoinverse
from gpsr.utils.errors import ConfigError

__all__ = ["project_consistent", "project_consistent_box"]


def project_consistent(x: torch.Tensor, y: torch.Tensor, scale: int) -> torch.Tensor:
    """Null-space projection `x + D_s^+(y - D_s(x))`: the closest `x'` with `D_s(x') = y`.

    x: (N, C, H, W), y: (N, C, H/s, W/s), same units -> (N, C, H, W), consistent to float
    precision. Not clamped: see `project_consistent_box` for outputs that must stay in a range.
    """
    if y.shape[-2] * scale != x.shape[-2] or y.shape[-1] * scale != x.shape[-1]:
        raise ConfigError(
            f"project_consistent: x {tuple(x.shape)} and y {tuple(y.shape)} do not match scale {scale}"
        )
    return x + pseudoinverse(y - degrade(x, scale), scale)


def _batched_cg(matvec, b: torch.Tensor, iters: int, rtol: float = 1e-13) -> torch.Tensor:
    """Conjugate gradients for independent SPD systems, one per (..., h, w) slice of b."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = (r * r).sum((-2, -1), keepdim=True)
    stop = (rtol**2) * rs.clamp(min=1e-300)
    for _ in range(iters):
        ap = matvec(p)
        pap = (p * ap).sum((-2, -1), keepdim=True)
        alpha = torch.where(pap > 0, rs / pap.clamp(min=1e-300), torch.zeros_like(pap))
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = (r * r).sum((-2, -1), keepdim=True)
        if bool((rs_new <= stop).all()):
            break
        p = r + torch.where(rs > 0, rs_new / rs.clamp(min=1e-300), torch.zeros_like(rs)) * p
        rs = rs_new
    return x


def project_consistent_box(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: int,
    low: float = 0.0,
    high: float = 1.0,
    tol: float = 1e-13,
    max_iter: int = 300,
    clamped_weight: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closest image to x that is consistent (`D_s(x') = y`) and inside [low, high].

    The Euclidean projection onto {D_s x = y} intersected with the box has the form
    `x' = clamp(x + D_s^T lam)` with `D_s x' = y`; lam maximises the concave dual
    `q(lam) = ||x' - x||^2 / 2 + <lam, y - D_s x'>` by a semi-smooth Newton method with Armijo
    backtracking, whose linear systems `D M D^T` (M: unclamped pixels) are solved by conjugate
    gradients on the separable operator. When every pixel under some LR pixel is clamped
    (saturated images) that exact generalised Hessian is singular and Newton stalls; an
    image whose line search had to backtrack therefore gives its clamped pixels the small
    weight `clamped_weight` instead of 0 (regular system, clamped pixels can come back), and
    the weight shrinks tenfold after every full step, so well-behaved images keep Newton's
    quadratic convergence. Every iterate lies in the box; an image stops once its
    consistency `mean((D_s(x') - y)^2)` is at most `tol`. Computed in float64.
    x: (N, C, H, W), y: (N, C, H/s, W/s), same units, y reachable inside the box ->
    (x' (N, C, H, W) in [low, high], Newton iterations per image (N,) long).
    """
    n = x.shape[0]
    x64, y64 = x.double(), y.double()
    ah = degradation_matrix(x.shape[-2], scale, torch.float64, x.device)
    aw = degradation_matrix(x.shape[-1], scale, torch.float64, x.device)
    ridge = 1e-10 * float((ah @ ah.T).diagonal().mean() * (aw @ aw.T).diagonal().mean())

    def lift(lam: torch.Tensor) -> torch.Tensor:  # D^T: (.., h, w) -> (.., H, W)
        return ah.T @ lam @ aw

    def state(lam: torch.Tensor):
        """x'(lam), residual r = y - D x', dual objective q and consistency per image."""
        z = x64 + lift(lam)
        xp = z.clamp(low, high)
        r = y64 - ah @ xp @ aw.T
        q = 0.5 * ((xp - x64) ** 2).flatten(1).sum(1) + (lam * r).flatten(1).sum(1)
        return z, xp, r, q, (r**2).flatten(1).mean(1)

    lam = torch.zeros_like(y64)
    z, xp, r, q, err = state(lam)
    iters = torch.zeros(n, dtype=torch.long)
    weight = torch.zeros(n, 1, 1, 1, dtype=torch.float64, device=x.device)
    for _ in range(max_iter):
        active = err > tol
        if not bool(active.any()):
            break
        iters[active.cpu()] += 1
        # Pixels on a bound count as free (a valid element of the generalised Jacobian);
        # clamped ones keep a small weight (see the docstring).
        free = ((z >= low) & (z <= high)).double()
        mask = free + (1.0 - free) * weight

        def normal_op(v: torch.Tensor, m: torch.Tensor = mask) -> torch.Tensor:
            return ah @ (m * lift(v)) @ aw.T + ridge * v

        delta = _batched_cg(normal_op, r, iters=500)
        # Armijo backtracking on the concave dual q, whose gradient is r: delta is an ascent
        # direction (<r, delta> > 0), so a small enough step always increases q.
        slope = (r * delta).flatten(1).sum(1)
        step = torch.ones(n, dtype=torch.float64, device=x.device)
        done = ~active
        for _ in range(40):
            cand = lam + step[:, None, None, None] * delta
            z_c, xp_c, r_c, q_c, err_c = state(cand)
            ok = ~done & (q_c >= q + 1e-4 * step * slope)
            keep = ok[:, None, None, None]
            lam = torch.where(keep, cand, lam)
            done |= ok
            if bool(done.all()):
                break
            step = torch.where(done, step, step * 0.5)
        full = (step == 1.0)[:, None, None, None]
        weight = torch.where(full, weight * 0.1, torch.full_like(weight, clamped_weight))
        z, xp, r, q, err = state(lam)
    return xp.to(x.dtype), iters
