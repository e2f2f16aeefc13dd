"""Devices and threads: what ``device=`` and ``--threads`` mean, checked once, with one-line errors.

A device is where the work runs (calibration passes, solves, evaluation, latency); it is resolved
and checked here so every entry point refuses ``cuda`` on a machine without a GPU, or a misspelt
device, the same way and before any work starts.
"""
from __future__ import annotations

import os

import torch

from ..errors import MultinetError

DEVICE_KINDS = ("cpu", "cuda")


class DeviceError(MultinetError):
    """A device that is unknown or not present on this machine."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/'cpu' -> cpu; 'cuda' / 'cuda:N' -> that GPU, if this machine has it; anything else refused."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(str(device).strip())
        except RuntimeError:
            raise DeviceError(f"unknown device {device!r}; use one of {', '.join(DEVICE_KINDS)} (or cuda:N)") from None
    if dev.type not in DEVICE_KINDS:
        raise DeviceError(f"unsupported device {str(device)!r}; use one of {', '.join(DEVICE_KINDS)} (or cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {str(device)!r} requested, but this machine has no CUDA GPU (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {str(device)!r} requested, but this machine has only "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    return dev


def same_device(a: str | torch.device, b: str | torch.device) -> bool:
    """Whether two devices are the same one: 'cuda' (no index: the current GPU) is the 'cuda:0' that a
    parameter on the current GPU reports, which ``==`` on torch.device does not see."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        current = torch.cuda.current_device() if a.type == "cuda" and torch.cuda.is_available() else 0
        return (current if a.index is None else a.index) == (current if b.index is None else b.index)
    return a.index == b.index


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """The CPUs not already busy: all of them on an idle machine, fewer when others are running.

    torch's own default takes every core, and on a loaded machine a compression run then fights the
    other processes for them and runs many times slower than with fewer threads."""
    cpus = available_cpus()
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except OSError:
        busy = 0
    return max(1, min(cpus, cpus - busy))


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (``None``: :func:`default_threads`); returns the number set."""
    if threads is None:
        threads = default_threads()
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise MultinetError(f"threads must be a positive integer, got {threads!r}")
    torch.set_num_threads(threads)
    return threads


def available_memory() -> int | None:
    """Bytes of memory this machine can give a process now without swapping (Linux's MemAvailable),
    or None where that is not known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
