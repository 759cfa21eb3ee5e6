"""Device helpers for the entry points."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

import torch

__all__ = [
    "pick_device",
    "synchronize",
    "available_memory",
    "device_name",
    "cpu_threads",
    "set_cpu_threads",
    "keep_freed_memory",
]

log = logging.getLogger("gpsr")
_TORCH_DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice: the physical cores


def cpu_threads(processes: int = 1) -> tuple[int, str]:
    """How many torch threads a CPU process should use, and why: `OMP_NUM_THREADS` when
    set; else the cores this process may run on (its affinity mask, e.g. a SLURM or
    container allocation) shared among `processes` processes of the run (CPU DDP), and at
    most torch's own default (the physical cores: hyper-threads do not add arithmetic)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n = max(1, min(cores or 1, _TORCH_DEFAULT_THREADS) // max(1, processes))
    why = f"{cores} usable cores, {_TORCH_DEFAULT_THREADS} physical"
    return n, why + (f", shared by {processes} processes" if processes > 1 else "")


def set_cpu_threads(processes: int = 1) -> int:
    """Set torch's threads from `cpu_threads` and say once what was chosen."""
    n, why = cpu_threads(processes)
    torch.set_num_threads(n)
    log.info("CPU: %d torch thread(s) (%s)", n, why)
    return n


# glibc's mallopt parameters (malloc.h) and the values `keep_freed_memory` sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_BYTES = 2**30
_kept: str | None = None


def keep_freed_memory() -> str | None:
    """Make glibc's malloc keep freed memory of this process for reuse, once per process, and
    say so once; returns what was set (None where glibc's `mallopt` is not available: macOS,
    Windows, musl). Results do not change, only where memory comes from. The sampling entry
    points call it on a CPU; training does not (its smaller steps gained nothing measurable).

    torch on a CPU allocates each operation's output afresh. By default glibc serves blocks
    above its mmap threshold (adaptive, 128 KiB to 32 MiB) with fresh pages and hands the
    heap's free top back to the system once it exceeds the trim threshold, so large
    activations are faulted in page by page again at every call: about 15,000 page faults
    (60 MB) per call of the demo UNet on 256 tiles in bf16, 13 to 17 % of its time on the
    machine measured (docs/benchmarks.md). Here blocks up to `KEEP_BYTES` come from the heap
    and up to `KEEP_BYTES` of free heap is kept: the process's resident memory stays near
    its peak instead of shrinking between calls."""
    global _kept
    if _kept is not None:
        return _kept
    path = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(path).mallopt if path else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return None
    # Older glibc refuses mmap thresholds above 32 MiB: then blocks up to that.
    block = next((b for b in (KEEP_BYTES, 32 * 2**20) if mallopt(_M_MMAP_THRESHOLD, b)), None)
    if block is None or not mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES):
        return None
    _kept = (
        f"freed memory kept for reuse (glibc mallopt: blocks up to {block // 2**20} MiB from "
        f"the heap, up to {KEEP_BYTES // 2**20} MiB of it kept)"
    )
    log.info("CPU: %s", _kept)
    return _kept


def pick_device(name: str) -> torch.device:
    """ "auto" -> CUDA when available, else CPU; any other name as torch understands it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work (for timing); nothing to do on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device` (CUDA: free memory; CPU: the kernel's
    MemAvailable), or None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def device_name(device: torch.device) -> str:
    """The card's name, or "CPU (<model name from /proc/cpuinfo>, <threads> threads)"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            models = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        name = models[0] if models else name
    except OSError:
        pass
    return f"CPU ({name}, {torch.get_num_threads()} threads)"
