"""Images of a batch on separate CPU cores: `split_batch`.

torch spreads each operation over its threads (intra-op parallelism). For the flow's dense
subnets, whose 3 x 3 convolutions have few output channels (the paper's growth of 24), that
split gains little: on the 2-core machine measured, the paper flow's bf16 inverse of 2 images
took 1.2 to 1.4 times as long with 2 threads on the batch as with the 2 images on one thread
each (docs/benchmarks.md). `split_batch` runs a function on slices of the batch in worker
threads that share the process's torch threads among them, so the cores are used without
oversubscription: with T threads and W = min(N, T) workers, each worker gets T // W threads
(the first T % W one more).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import torch

__all__ = ["split_batch", "batch_workers"]

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_lock = threading.Lock()


def batch_workers(batch: int, threads: int | None = None) -> list[int]:
    """The torch threads of each worker for a batch of `batch` items with `threads` threads
    in all (default: this thread's `torch.get_num_threads()`): one worker per item up to the
    thread count, the threads shared out as evenly as they go. [threads] when one worker."""
    total = torch.get_num_threads() if threads is None else threads
    workers = max(1, min(batch, total))
    return [total // workers + (i < total % workers) for i in range(workers)]


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    old = None
    with _lock:
        if _pool is None or _pool_size < workers:
            old = _pool
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="gpsr-batch")
            _pool_size = workers
        pool = _pool
    if old is not None:
        # Not waited for, and outside the lock: another caller's workers may still be
        # running on the old pool and take the lock to set their thread count.
        old.shutdown(wait=False)
    return pool


def _run(fn: Callable[..., torch.Tensor], threads: int, args: tuple) -> torch.Tensor:
    # Thread counts are per OS thread (OpenMP); a worker keeps its count between calls.
    if torch.get_num_threads() != threads:
        with _lock:
            torch.set_num_threads(threads)
    with torch.no_grad():
        return fn(*args)


def split_batch(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    """`fn(*tensors)` for inference on CPU, the batch split over worker threads:
    tensors (N, ...) each, fn(*slices) -> (n, ...) for a slice of n items; returns the
    slices' outputs concatenated in order, (N, ...).

    `fn` must treat the items of a batch independently (as the flow's inverse does), so the
    result equals one call on the whole batch up to the rounding of kernels that the batch
    size can change. Runs `fn` directly, in this thread, when one worker would do (N = 1,
    one thread), when gradients are enabled, or for tensors not on the CPU. Afterwards this
    thread's torch thread count is as before, and so is the count that threads started
    later take."""
    n = tensors[0].shape[0]
    threads = batch_workers(n)
    if len(threads) < 2 or torch.is_grad_enabled() or tensors[0].device.type != "cpu":
        return fn(*tensors)
    total = sum(threads)
    chunks = list(zip(*(t.tensor_split(len(threads)) for t in tensors)))
    pool = _executor(len(threads))
    try:
        futures = [pool.submit(_run, fn, k, args) for k, args in zip(threads, chunks)]
        wait(futures)  # all finished before an error is raised
        outs = [f.result() for f in futures]
    finally:
        # A worker's set_num_threads also sets the default of threads started later.
        with _lock:
            torch.set_num_threads(total)
    return torch.cat(outs)
