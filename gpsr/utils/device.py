"""Device helpers for the entry points."""

from __future__ import annotations

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
