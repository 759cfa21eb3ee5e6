"""Timing and FLOP counting for benchmarks (knows nothing of the method)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from gpsr.utils.device import synchronize

__all__ = ["median_seconds", "interleaved_seconds", "paired_ratios", "count_flops"]


def median_seconds(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of `fn` after `warmup` calls (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_seconds(
    fns: Mapping[str, Callable[[], Any]],
    device: torch.device,
    warmup: int,
    rounds: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds of each call of each of `fns`, measured in `rounds` interleaved rounds after
    `warmup` calls of each: even rounds call the functions in the given order, odd rounds in
    reverse (A B, B A, A B, ...), so a change of the machine's speed during the run (a shared
    host's matrix units, its clock) falls on every function alike rather than on whichever
    ran last. -> {name: [seconds of round 0, round 1, ...]}. `clock` is injectable for tests.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    synchronize(device)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            start = clock()
            fns[name]()
            synchronize(device)
            seconds[name].append(clock() - start)
    return seconds


def paired_ratios(baseline: list[float], other: list[float]) -> list[float]:
    """baseline[r] / other[r] for each round r of `interleaved_seconds`: the speed-up of
    `other` over `baseline` within each round (the two calls of a round ran back to back)."""
    if len(baseline) != len(other) or not baseline:
        raise ValueError(
            f"paired timings need equal, non-empty rounds: {len(baseline)} / {len(other)}"
        )
    return [b / o for b, o in zip(baseline, other)]


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn`, counted by torch's FLOP counter."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()
