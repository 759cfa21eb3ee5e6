"""Progress of long sampling work (docs/sampling.md, "Progress"): units of work are UNet calls
(one per step, or one per batch of tiles), flow decodes and projections.

`reporting(fn)` routes every finished unit to `fn(n)` (e.g. a tqdm bar's `update`) for the
code run inside it; `advance()` reports one; `Counted` wraps a network so that each of its
calls is one unit. `GPSR.work_units` says beforehand how many units one image will take, so a
bar can show its total and the time left. Outside `reporting` nothing is recorded.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

__all__ = ["reporting", "advance", "Counted", "show_bars"]

_sink: ContextVar[Callable[[int], object] | None] = ContextVar("gpsr_progress", default=None)


@contextmanager
def reporting(fn: Callable[[int], object]) -> Iterator[None]:
    """Within this block, each finished unit of sampling work calls `fn(1)`."""
    token = _sink.set(fn)
    try:
        yield
    finally:
        _sink.reset(token)


def advance(n: int = 1) -> None:
    """Report `n` finished units (nothing outside `reporting`)."""
    fn = _sink.get()
    if fn is not None:
        fn(n)


class Counted(nn.Module):
    """`net` (x, t) -> output, each call one unit of progress."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.net(x, t)
        advance()
        return out


def show_bars(enabled: bool) -> bool:
    """Whether to draw progress bars: asked for (`progress=true`) and stderr is a terminal;
    otherwise the entry points log one plain line per image or batch."""
    return bool(enabled) and sys.stderr.isatty()
