"""Latency measured on the target device: warm-up runs, then the median of timed runs.

Medians, because a 2-core CI box or a shared GPU has outliers that a mean would chase.
"""
from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn as nn


def measure_ms(model: nn.Module, example: torch.Tensor, device: str | None = "cpu", warmup: int = 5,
               repeats: int = 21) -> float:
    """Median milliseconds of one forward pass of ``example`` on ``device`` (None: the CPU)."""
    dev = torch.device(device or "cpu")
    model = copy.deepcopy(model).to(dev).eval()  # never move the caller's model
    x = example.to(dev)
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            synchronize(dev)
            start = time.perf_counter()
            model(x)
            synchronize(dev)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a clock read after a call times the call (CUDA runs async)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latency_input(example: torch.Tensor, batch: int) -> torch.Tensor:
    """A batch of ``batch`` inputs shaped like the calibration data."""
    reps = -(-batch // len(example))
    return torch.cat([example] * reps)[:batch].contiguous()
