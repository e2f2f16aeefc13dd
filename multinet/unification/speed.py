"""Unified only where it is not slower: a unified part against its members compressed separately, timed.

The search counts FLOPs, and FLOPs miss what a CPU's convolution kernels charge per layer and per
channel block. Measured on this project's digits (1 thread, oneDNN, AVX-512): a 3x3 conv with 17 output
channels took 3.6x the time of one with 16 at a batch of 256 8x8 images, and about the same at a batch
of 32; a VGG + ResNet pair unified at 15 % of their FLOPs had the separately compressed pair's FLOPs
but ran 1.2x their time at a batch of 128 (0.8x at a batch of 1), its ResNet keeping a 1-channel
residual stream of nine convolutions that cost more than their FLOPs. So a link trial is also timed,
on one evaluation batch (the run's ``batch_size``) where it will run, and dropped where its fused
network is slower than its members' separate networks one after another.
"""
from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from ..calib import batches
from ..runtime.devices import same_device
from ..schedule.latency import synchronize

SPEED_SLACK = 0.05  # slower than separate by more than this fraction (the median of paired rounds) is slower
SPEED_ROUNDS = 7  # paired rounds per comparison, after one warm-up call of each


def time_ratio(first: Callable[[], object], second: Callable[[], object], rounds: int = SPEED_ROUNDS,
               device: torch.device | None = None, clock: Callable[[], float] = time.perf_counter) -> float:
    """The median over ``rounds`` of t(first) / t(second), both timed in the same round, taking turns at
    going first (load from other processes falls on both alike, and neither always runs warm after the
    other). Medians: a shared 2-core box has outliers a mean would chase."""
    device = device or torch.device("cpu")
    ratios = []
    with torch.no_grad():
        first(), second()  # warm-up: allocations, kernel choice
        for i in range(rounds):
            pair = (first, second) if i % 2 == 0 else (second, first)
            took = []
            for fn in pair:
                synchronize(device)
                start = clock()
                fn()
                synchronize(device)
                took.append(clock() - start)
            a, b = took if i % 2 == 0 else took[::-1]
            ratios.append(a / max(b, 1e-12))
    return statistics.median(ratios)


def unified_vs_separate(unified: torch.nn.Module, separate: Sequence[torch.nn.Module], batch,
                        rounds: int = SPEED_ROUNDS, device: str | torch.device | None = None) -> float:
    """Time ratio of ``unified`` (the part, every member's outputs) to the ``separate`` networks run one
    after another, on one batch of evaluation inputs (as ``batches.call`` takes them), on ``device``
    (None: where ``unified``'s parameters are; elsewhere, copies are moved there: the caller's stay put).
    A MultiNet that is not fused yet is timed in its fused form for this batch (``fused(timed_on=batch)``:
    each set of its sibling layers fused where that is not slower here)."""
    here = next((p.device for p in unified.parameters()), torch.device("cpu"))
    device = here if device is None else torch.device(device)
    if not same_device(device, here) or any(not same_device(next((p.device for p in s.parameters()), device), device)
                                            for s in separate):
        unified, separate = copy.deepcopy(unified).to(device), [copy.deepcopy(s).to(device) for s in separate]
    batch = batches.to_device(batch, device)
    if getattr(unified, "is_fused", True) is False:
        unified = unified.fused(timed_on=batch)

    def run_separate():
        for net in separate:
            batches.call(net, batch)

    return time_ratio(lambda: batches.call(unified, batch), run_separate, rounds, device)
