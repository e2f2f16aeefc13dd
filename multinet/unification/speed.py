"""Unified only where it is not slower: a unified part against its members compressed separately, timed.

The search counts FLOPs, and FLOPs miss what a CPU's convolution kernels charge per layer and per
channel block. Measured on this project's digits (1 thread, oneDNN, AVX-512): a 3x3 conv with 17 output
channels took 3.6x the time of one with 16 at a batch of 256 8x8 images, and about the same at a batch
of 32; a VGG + ResNet pair unified at 15 % of their FLOPs had the separately compressed pair's FLOPs
but ran 1.2x their time at a batch of 128 (0.8x at a batch of 1), its ResNet keeping a 1-channel
residual stream of nine convolutions that cost more than their FLOPs. So a link trial is also timed,
on one evaluation batch (the run's ``batch_size``) where it will run, and dropped where its fused
network is slower than its members' separate networks one after another.

Seven paired rounds settle most trials; one whose first reading is within ``SPEED_BAND`` of 1 is timed
for ``CONFIRM_ROUNDS`` more and judged on all of them. A fixed slack above 1 on seven rounds (5 % until
now) let through MLP trials that a 21-round reading put at 1.03-1.08x their members' time, and made
which of them were kept follow the machine's noise (and so the order of the models, through the
timing alone).
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

SPEED_ROUNDS = 7  # paired rounds per comparison, after one warm-up call of each
SPEED_BAND = 0.05  # a first reading within this fraction of 1 is too close to call on SPEED_ROUNDS rounds
CONFIRM_ROUNDS = 21  # more paired rounds for such a reading; the ratio is then the median of all of them


def is_slower(ratio: float) -> bool:
    """A unified part whose settled ratio (``settled_ratio``) is above 1 runs slower than its members apart."""
    return ratio > 1.0


def time_ratio(first: Callable[[], object], second: Callable[[], object], rounds: int = SPEED_ROUNDS,
               device: torch.device | None = None, clock: Callable[[], float] = time.perf_counter) -> float:
    """The median over ``rounds`` of t(first) / t(second) (``paired_ratios``)."""
    return statistics.median(paired_ratios(first, second, rounds, device, clock))


def settled_ratio(first: Callable[[], object], second: Callable[[], object], device: torch.device | None = None,
                  clock: Callable[[], float] = time.perf_counter) -> float:
    """``time_ratio`` over ``SPEED_ROUNDS`` rounds, or, where that is within ``SPEED_BAND`` of 1, the median of
    those and ``CONFIRM_ROUNDS`` more: the few trials near the limit get the rounds that decide them, the
    rest cost no more than before."""
    ratios = paired_ratios(first, second, SPEED_ROUNDS, device, clock)
    if abs(statistics.median(ratios) - 1.0) <= SPEED_BAND:
        ratios += paired_ratios(first, second, CONFIRM_ROUNDS, device, clock, warm_up=False)
    return statistics.median(ratios)


def paired_ratios(first: Callable[[], object], second: Callable[[], object], rounds: int,
                  device: torch.device | None = None, clock: Callable[[], float] = time.perf_counter,
                  warm_up: bool = True) -> list[float]:
    """t(first) / t(second) in each of ``rounds`` rounds, both timed in the same round, taking turns at
    going first (load from other processes falls on both alike, and neither always runs warm after the
    other). Callers take medians: a shared 2-core box has outliers a mean would chase."""
    device = device or torch.device("cpu")
    ratios = []
    with torch.no_grad():
        if warm_up:
            first(), second()  # allocations, kernel choice
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
    return ratios


def unified_vs_separate(unified: torch.nn.Module, separate: Sequence[torch.nn.Module], batch,
                        rounds: int | None = None, device: str | torch.device | None = None) -> float:
    """Time ratio of ``unified`` (the part, every member's outputs) to the ``separate`` networks run one
    after another (``settled_ratio``, or the median of ``rounds`` rounds where given), on one batch of
    evaluation inputs (as ``batches.call`` takes them), on ``device``
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

    if rounds is not None:
        return time_ratio(lambda: batches.call(unified, batch), run_separate, rounds, device)
    return settled_ratio(lambda: batches.call(unified, batch), run_separate, device)
