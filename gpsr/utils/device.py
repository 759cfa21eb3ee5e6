"""Device helpers for the entry points."""

from __future__ import annotations

import torch

__all__ = ["pick_device", "synchronize", "available_memory", "device_name"]


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
