"""Calibrated per-pixel intervals from K samples, with a finite-sample guarantee
(Risk-Controlling Prediction Sets, Angelopoulos et al., ICML 2022; docs/uncertainty.md).

For an LR image, K GPSR samples give a centre (their per-pixel mean) and a spread (their
per-pixel standard deviation plus half an 8-bit level, so pixels on which all samples agree
still get an interval of one level). The interval of width parameter lambda is

    [centre - lambda * spread, centre + lambda * spread], clipped to [0, 1]

(clipping never changes whether an HR pixel in [0, 1] is inside). An image's loss is the
fraction of its HR pixels (all channels) outside the interval; it does not grow with
lambda. Calibration picks, on n held-out images, the smallest lambda of a grid at which the
Hoeffding-Bentkus upper confidence bound of the mean loss is below alpha at that lambda and
at every larger one of the grid: then, with probability at least 1 - delta over the
calibration images, the expected loss of a new image from the same distribution is at most
alpha.

Every tensor function documents its shapes; images are in [0, 1] pixel units.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.stats import binom
from torchmetrics import Metric

__all__ = [
    "SPREAD_FLOOR",
    "LAMBDA_GRID",
    "grid_index",
    "centre_spread",
    "interval",
    "needed_lambda",
    "losses_on_grid",
    "hb_upper_bound",
    "images_needed",
    "calibrate_lambda",
    "width_on_grid",
    "IntervalMetrics",
]

SPREAD_FLOOR = 0.5 / 255  # half an 8-bit level
# The lambdas calibration chooses from: 0 to 30 spreads in steps of 0.01, then 200 steps of
# equal ratio up to 1000 (beyond 510 the floor alone makes every interval [0, 1], so some
# lambda of the grid always holds every pixel).
LAMBDA_GRID = np.concatenate([np.round(np.arange(0, 3000) * 0.01, 2), np.geomspace(30, 1000, 200)])


def grid_index(lam: float, grid: np.ndarray = LAMBDA_GRID) -> int:
    """The position of the grid's value closest to `lam`."""
    return int(np.abs(grid - lam).argmin())


def centre_spread(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """samples (N, K, C, H, W) in [0, 1], K >= 2 -> centre (N, C, H, W), the mean over the K
    samples, and spread (N, C, H, W) > 0, their standard deviation (K - 1 in the
    denominator) plus `SPREAD_FLOOR`."""
    if samples.dim() != 5 or samples.shape[1] < 2:
        raise ValueError(f"need (N, K >= 2, C, H, W) samples, got {tuple(samples.shape)}")
    x = samples.double()
    return x.mean(1).to(samples.dtype), (x.std(1) + SPREAD_FLOOR).to(samples.dtype)


def interval(
    centre: torch.Tensor, spread: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper), each like centre, = centre -/+ lam * spread clipped to [0, 1]."""
    return (centre - lam * spread).clamp(0, 1), (centre + lam * spread).clamp(0, 1)


def needed_lambda(hr: torch.Tensor, centre: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """The smallest lambda whose interval holds each HR pixel: |hr - centre| / spread, in
    float64, of shape (N, C*H*W). hr, centre, spread (N, C, H, W); hr in [0, 1]."""
    return ((hr.double() - centre.double()).abs() / spread.double()).flatten(1)


def losses_on_grid(need: torch.Tensor, grid: np.ndarray = LAMBDA_GRID) -> np.ndarray:
    """need (N, P) from `needed_lambda` -> (N, L) float64: for each image and each lambda of
    the grid (L,), the fraction of its P pixels outside the interval (need > lambda)."""
    srt = need.sort(dim=1).values
    lams = torch.as_tensor(grid, dtype=srt.dtype, device=srt.device).expand(srt.shape[0], -1)
    inside = torch.searchsorted(srt.contiguous(), lams.contiguous(), right=True)
    return (1.0 - inside.double() / srt.shape[1]).cpu().numpy()


def _kl_bernoulli(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """h1(a, b) = a log(a/b) + (1-a) log((1-a)/(1-b)), with 0 log 0 = 0."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = np.where(a > 0, a * np.log(a / b), 0.0)
        t2 = np.where(a < 1, (1 - a) * np.log((1 - a) / (1 - b)), 0.0)
    return t1 + t2


def _hb_p_value(risk_hat: np.ndarray, n: int, r: np.ndarray) -> np.ndarray:
    """The Hoeffding-Bentkus p-value of the null "mean loss >= r" given the mean of n
    losses in [0, 1]: min(exp(-n h1(min(risk_hat, r), r)), e * P(Binomial(n, r) <=
    ceil(n * risk_hat)))."""
    hoeffding = np.exp(-n * _kl_bernoulli(np.minimum(risk_hat, r), r))
    bentkus = math.e * binom.cdf(np.ceil(n * risk_hat - 1e-12), n, r)
    return np.minimum(hoeffding, bentkus)


def hb_upper_bound(risk_hat, n: int, delta: float) -> np.ndarray:
    """The Hoeffding-Bentkus upper confidence bound (RCPS, Bates et al. 2021, Prop. 5):
    sup {r in [risk_hat, 1] : p-value(r) >= delta}, elementwise over `risk_hat` (an array of
    empirical mean losses of n images each), found by bisection to 1e-10."""
    rh = np.clip(np.asarray(risk_hat, dtype=np.float64), 0.0, 1.0)
    lo, hi = rh.copy(), np.ones_like(rh)
    for _ in range(40):
        mid = (lo + hi) / 2
        ok = _hb_p_value(rh, n, mid) >= delta
        lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid)
    return hi


def images_needed(alpha: float, delta: float) -> int:
    """The fewest images at which the bound can fall below alpha at all (every loss 0)."""
    n = 1
    while hb_upper_bound(0.0, n, delta) >= alpha:
        n *= 2
    lo, hi = n // 2, n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if hb_upper_bound(0.0, mid, delta) >= alpha else (lo, mid)
    return hi


def calibrate_lambda(
    losses: np.ndarray, alpha: float, delta: float, grid: np.ndarray = LAMBDA_GRID
) -> tuple[float | None, np.ndarray]:
    """losses (n, L) from `losses_on_grid` -> (lambda-hat, the bound at every lambda (L,)).

    lambda-hat is the smallest grid lambda such that the bound is below alpha there and at
    every larger grid lambda (the RCPS rule); None when even the largest is not."""
    n = losses.shape[0]
    ucb = hb_upper_bound(losses.mean(0), n, delta)
    below = ucb < alpha
    if not below[-1]:
        return None, ucb
    # Scan down from the largest lambda while the bound stays below alpha.
    first_above = np.nonzero(~below)[0]
    j = first_above[-1] + 1 if first_above.size else 0
    return float(grid[j]), ucb


def width_on_grid(
    centre: torch.Tensor, spread: torch.Tensor, grid: np.ndarray = LAMBDA_GRID
) -> np.ndarray:
    """centre, spread (N, C, H, W) -> (N, L) float64: each image's mean interval width
    (upper - lower, clipped to [0, 1]) at every lambda of the grid.

    The width of a pixel is min(lam s, 1 - c) + min(lam s, c): each term grows as lam s up to
    its breakpoint lam = a / s and stays at a after it; the sum over pixels at all L lambdas
    comes from the sorted breakpoints and cumulative sums, O(P log P + L) per image."""
    c = centre.double().flatten(1).clamp(0, 1)
    s = spread.double().flatten(1)
    a = torch.cat([1 - c, c], dim=1)  # (N, 2P) the cap of each term
    ss = torch.cat([s, s], dim=1)
    order = (a / ss).argsort(dim=1)
    brk = (a / ss).gather(1, order)
    a_cum = torch.nn.functional.pad(a.gather(1, order).cumsum(1), (1, 0))  # capped terms
    s_cum = ss.gather(1, order).flip(1).cumsum(1).flip(1)  # growing terms from index j on
    s_cum = torch.nn.functional.pad(s_cum, (0, 1))
    lams = torch.as_tensor(grid, dtype=torch.float64).expand(c.shape[0], -1).contiguous()
    j = torch.searchsorted(brk.contiguous(), lams, right=True)  # terms already capped
    total = a_cum.gather(1, j) + lams * s_cum.gather(1, j)
    return (total / c.shape[1]).cpu().numpy()


class IntervalMetrics(Metric):
    """Miscoverage and mean width of the interval at a calibrated lambda and at lambda = 1,
    summed over images (DDP-reducible sums, means at compute).

    update(samples (N, K, C, H, W), hr (N, C, H, W)), both in [0, 1], K >= 2.
    compute() -> {"miscoverage", "interval_width", "miscoverage_uncalibrated",
    "interval_width_uncalibrated"} (miscoverage: the fraction of HR pixels outside; width
    in [0, 1] pixel units; the calibrated pair only with a lambda)."""

    full_state_update = False

    def __init__(self, lam: float | None = None):
        super().__init__()
        self.lams = ([lam] if lam is not None else []) + [1.0]
        self.add_state("outside", torch.zeros(len(self.lams), dtype=torch.float64), "sum")
        self.add_state("width", torch.zeros(len(self.lams), dtype=torch.float64), "sum")
        self.add_state("images", torch.zeros((), dtype=torch.float64), "sum")

    def update(self, samples: torch.Tensor, hr: torch.Tensor) -> None:
        centre, spread = centre_spread(samples)
        need = needed_lambda(hr, centre, spread)
        grid = np.asarray(self.lams)
        self.outside += torch.as_tensor(losses_on_grid(need, grid).sum(0), device=self.device)
        self.width += torch.as_tensor(
            width_on_grid(centre, spread, grid).sum(0), device=self.device
        )
        self.images += hr.shape[0]

    def compute(self) -> dict[str, float]:
        miss, width = (self.outside / self.images).tolist(), (self.width / self.images).tolist()
        out = {"miscoverage_uncalibrated": miss[-1], "interval_width_uncalibrated": width[-1]}
        if len(self.lams) == 2:
            out.update(miscoverage=miss[0], interval_width=width[0])
        return out
