"""Linear-time forms of the separable degradation's 1-D factors (docs/method.md §8).

`D_s(x) = A_h x A_w^T` per channel, and each 1-D factor `A` (n/s, n) is banded: row i holds
the same bicubic taps shifted by s, except for a few rows at each border where the kernel is
cut and renormalised. `(A A^T)^-1` is not banded, but its entries decay by about 1e-16 within
32 diagonals, so a band of that width equals it in float64. Held as a shift-invariant kernel
plus dense corrections at the two borders (`Banded`), both apply to a signal of length n in
O(n) time and memory, where the dense matrices cost O(n^2) (the projection and the
pseudoinverse of a 2048 x 2048 image would otherwise multiply 2048 x 512 matrices).

Everything here is float64 and checked against the dense matrices of `gpsr.ops` in the tests.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "Banded",
    "dense_degradation",
    "degradation_band",
    "gram_inverse_band",
    "separable",
    "separable_adjoint",
]

# Rows of the dense reference from which a band is read; sides up to this many rows use the
# exact dense matrix (as the "top" correction) instead.
_REFERENCE_ROWS = 192


@dataclass(frozen=True)
class Banded:
    """A (rows, cols) matrix applied along the last axis in O(cols).

    Row i is `kernel` (P*stride taps, float64) placed at columns i*stride + offset + t,
    t = 0..P*stride-1 (taps outside [0, cols) dropped), plus `top` (bt, mt) added to rows
    [:bt] from columns [:mt] and `bottom` (bb, mb) to rows [-bb:] from columns [-mb:].
    """

    rows: int
    cols: int
    stride: int
    offset: int
    kernel: torch.Tensor
    top: torch.Tensor
    bottom: torch.Tensor

    @property
    def periods(self) -> int:
        return self.kernel.numel() // self.stride

    def _pads(self) -> tuple[int, int]:
        left = -self.offset
        right = (self.rows - 1 + self.periods) * self.stride - self.cols - left
        return left, right

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., cols) -> (..., rows), same dtype and device."""
        k = self.kernel.to(x).reshape(self.periods, self.stride)
        out = x.new_zeros(*x.shape[:-1], self.rows)
        if k.any():
            xp = F.pad(x, self._pads())
            v = xp.reshape(*x.shape[:-1], self.rows - 1 + self.periods, self.stride)
            for q in range(self.periods):
                out = out + v[..., q : q + self.rows, :] @ k[q]
        if self.top.numel():
            bt, mt = self.top.shape
            out[..., :bt] += x[..., :mt] @ self.top.T.to(x)
        if self.bottom.numel():
            bb, mb = self.bottom.shape
            out[..., self.rows - bb :] += x[..., self.cols - mb :] @ self.bottom.T.to(x)
        return out

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """The transpose: y (..., rows) -> (..., cols), same dtype and device."""
        k = self.kernel.to(y).reshape(self.periods, self.stride)
        left = self._pads()[0]
        lead = y.shape[:-1]
        if k.any():
            vp = y.new_zeros(*lead, self.rows - 1 + self.periods, self.stride)
            for q in range(self.periods):
                vp[..., q : q + self.rows, :] += y[..., :, None] * k[q]
            out = vp.reshape(*lead, -1)[..., left : left + self.cols].contiguous()
        else:
            out = y.new_zeros(*lead, self.cols)
        if self.top.numel():
            bt, mt = self.top.shape
            out[..., :mt] += y[..., :bt] @ self.top.to(y)
        if self.bottom.numel():
            bb, mb = self.bottom.shape
            out[..., self.cols - mb :] += y[..., self.rows - bb :] @ self.bottom.to(y)
        return out

    def dense(self) -> torch.Tensor:
        """The matrix itself (rows, cols), float64 (for tests)."""
        return self.apply(torch.eye(self.cols, dtype=torch.float64)).T.contiguous()


def _conv_rows(
    kernel: torch.Tensor, rows: int, cols: int, stride: int, offset: int
) -> torch.Tensor:
    """The dense (rows, cols) matrix of the shift-invariant part alone."""
    out = torch.zeros(rows, cols, dtype=torch.float64)
    for i in range(rows):
        for t, v in enumerate(kernel.tolist()):
            j = i * stride + offset + t
            if 0 <= j < cols:
                out[i, j] = v
    return out


def _from_reference(ref: torch.Tensor, stride: int, rows: int, cols: int, tiny: float) -> Banded:
    """Read the band of a dense reference (R, C) in its middle row, and the corrections at
    its borders, and lay them out for a matrix of `rows` x `cols` with the same border
    geometry (cols - rows * stride == C - R * stride). Entries below `tiny` times the
    largest count as zero."""
    r_rows, r_cols = ref.shape
    tiny = tiny * float(ref.abs().max())
    mid = r_rows // 2
    nz = (ref[mid].abs() > tiny).nonzero().flatten()
    first, last = int(nz[0]), int(nz[-1])
    periods = math.ceil((last - first + 1) / stride)
    kernel = torch.zeros(periods * stride, dtype=torch.float64)
    width = min(periods * stride, r_cols - first)
    kernel[:width] = ref[mid, first : first + width]
    offset = first - mid * stride
    if offset > 0:
        raise RuntimeError("banded operators assume the band starts at or before row i * stride")
    diff = ref - _conv_rows(kernel, r_rows, r_cols, stride, offset)
    bad = (diff.abs() > tiny).any(1).nonzero().flatten().tolist()
    bt = next((i for i in range(r_rows) if i not in bad), r_rows)
    bb = next((i for i in range(r_rows) if r_rows - 1 - i not in bad), r_rows)
    if bt + bb >= r_rows or len(bad) != bt + bb:
        raise RuntimeError("banded reference too small for its border corrections")

    def used_cols(block: torch.Tensor) -> int:
        cols_nz = (block.abs() > tiny).any(0).nonzero().flatten()
        return int(cols_nz[-1]) + 1 if cols_nz.numel() else 0

    top = diff[:bt]
    mt = used_cols(top)
    bottom = diff[r_rows - bb :].flip(-1)
    mb = used_cols(bottom)
    return Banded(
        rows,
        cols,
        stride,
        offset,
        kernel,
        top[:, :mt].contiguous(),
        bottom[:, :mb].flip(-1).contiguous(),
    )


def _dense_as_banded(matrix: torch.Tensor, stride: int) -> Banded:
    """A small matrix held entirely as its `top` correction (no band)."""
    rows, cols = matrix.shape
    return Banded(
        rows,
        cols,
        stride,
        0,
        torch.zeros(stride, dtype=torch.float64),
        matrix.contiguous(),
        torch.zeros(0, 0, dtype=torch.float64),
    )


def dense_degradation(n: int, scale: int) -> torch.Tensor:
    """The exact 1-D factor (n/s, n) of `gpsr.ops.degrade`, float64."""
    eye = torch.eye(n, dtype=torch.float64).reshape(1, 1, n, n)
    return F.interpolate(
        eye, size=(n // scale, n), mode="bicubic", antialias=True, align_corners=False
    )[0, 0]


@functools.lru_cache(maxsize=32)
def degradation_band(n: int, scale: int, power: int = 1) -> Banded:
    """`A` (n/s, n), the 1-D factor of the degradation D_s, as a `Banded` operator; with
    power=2 the matrix of its squared entries (for diagonals of `A M A^T`)."""
    rows = n // scale
    if rows <= _REFERENCE_ROWS:
        return _dense_as_banded(dense_degradation(n, scale) ** power, scale)
    ref = dense_degradation(_REFERENCE_ROWS * scale, scale) ** power
    return _from_reference(ref, scale, rows, n, tiny=1e-14)  # rows differ by rounding only


@functools.lru_cache(maxsize=32)
def gram_inverse_band(n: int, scale: int) -> Banded:
    """`(A A^T)^-1` (n/s, n/s) for the 1-D factor A of D_s, as a `Banded` operator
    (its entries beyond the band are below 1e-15 of the largest: float64 rounding)."""
    rows = n // scale
    size = min(rows, _REFERENCE_ROWS)
    a = dense_degradation(size * scale, scale)
    ref = torch.linalg.inv(a @ a.T)
    ref = 0.5 * (ref + ref.T)
    if rows <= _REFERENCE_ROWS:
        return _dense_as_banded(ref, 1)
    return _from_reference(ref, 1, rows, rows, tiny=1e-15)


def separable(op_h: Banded, op_w: Banded, x: torch.Tensor) -> torch.Tensor:
    """`op_h x op_w^T` on the last two axes: x (..., op_h.cols, op_w.cols) -> (..., op_h.rows,
    op_w.rows)."""
    x = op_w.apply(x)
    return op_h.apply(x.transpose(-1, -2)).transpose(-1, -2)


def separable_adjoint(op_h: Banded, op_w: Banded, y: torch.Tensor) -> torch.Tensor:
    """`op_h^T y op_w` on the last two axes: y (..., op_h.rows, op_w.rows) -> (..., op_h.cols,
    op_w.cols)."""
    y = op_h.adjoint(y.transpose(-1, -2)).transpose(-1, -2)
    return op_w.adjoint(y)
