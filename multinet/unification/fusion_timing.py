"""Which sibling layers to fuse for a given batch: one wider layer is not faster at every width and batch.

fusion.py fuses layers that read the same tensor into one wider layer; fewer, larger products usually
run faster. Not always: a CPU's convolution kernels charge by blocks of output channels, and how much
depends on the batch. Measured on this project's digit sizes (1 thread, oneDNN, AVX-512;
benchmarks/results/fusion_timing.md): two 16-channel 3x3 convs reading one 24 x 8 x 8 tensor ran 0.77x
the pair's time fused at a batch of 1 and 0.86x at 32, but 1.18x at 256; a 32 + 1-channel pair 1.06x
at 256. So, given a batch, each set of siblings is timed on the tensor it really reads there: the wider
layer with its split, against the layers one after another; it is fused only where that is not slower.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from ..calib import batches
from ..graph.tracing import evaluation_mode
from .fusion import widened_call
from .speed import SPEED_ROUNDS, time_ratio


def fusions_that_pay(gm: fx.GraphModule, sibling_sets: Sequence[Sequence[fx.Node]], batch,
                     rounds: int = SPEED_ROUNDS, clock: Callable[[], float] = time.perf_counter) -> list[bool]:
    """Per set of sibling layers of ``gm``: whether one wider layer computes them no slower than the layers
    one after another, on the tensor they read when ``gm`` runs ``batch`` (on ``gm``'s device)."""
    if not sibling_sets:
        return []
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    inputs = _sibling_inputs(gm, [gm.get_submodule(s[0].target) for s in sibling_sets], batch, device)
    return [fused_over_apart([gm.get_submodule(n.target) for n in siblings], x, rounds, device, clock) <= 1.0
            for siblings, x in zip(sibling_sets, inputs)]


def fused_over_apart(modules: Sequence[nn.Module], x: torch.Tensor, rounds: int = SPEED_ROUNDS,
                     device: torch.device | None = None, clock: Callable[[], float] = time.perf_counter) -> float:
    """Time of ``modules`` as one wider layer (its output split and each piece made dense, as fusion.py
    runs it) over their time one after another, on ``x`` (the median of paired rounds: speed.time_ratio)."""
    wide = widened_call(list(modules))
    return time_ratio(lambda: wide(x), lambda: [m(x) for m in modules], rounds, device, clock)


def _sibling_inputs(gm: fx.GraphModule, firsts: list[nn.Module], batch, device: torch.device) -> list[torch.Tensor]:
    """The tensor each set's first layer reads when ``gm`` runs ``batch`` (in eval mode: nothing such as a
    BatchNorm's running statistics changes; each module's own mode is restored)."""
    seen: dict[int, torch.Tensor] = {}

    def keep(i: int):
        def hook(module, args) -> None:  # returns None: the layer's input is left as it is
            seen.setdefault(i, args[0])
        return hook

    hooks = [m.register_forward_pre_hook(keep(i)) for i, m in enumerate(firsts)]
    try:
        with torch.no_grad(), evaluation_mode(gm):
            batches.call(gm, batches.to_device(batch, device))
    finally:
        for h in hooks:
            h.remove()
    return [seen[i] for i in range(len(firsts))]
