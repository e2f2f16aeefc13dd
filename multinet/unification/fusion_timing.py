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
from ..calib.stats import Capture
from ..graph.tracing import evaluation_mode
from .fusion import dense_pieces, widened_call
from .speed import SPEED_ROUNDS, time_ratio


def fusions_that_pay(gm: fx.GraphModule, sibling_sets: Sequence[Sequence[fx.Node]], batch,
                     rounds: int = SPEED_ROUNDS, clock: Callable[[], float] = time.perf_counter) -> list[bool]:
    """Per set of sibling layers of ``gm``: whether one wider layer computes them no slower than the layers
    one after another, on the tensor they read when ``gm`` runs ``batch`` (on ``gm``'s device).

    Each set is timed during one run of ``gm``, as soon as the value its layers read exists: the value of
    that node (not of the module, which may be called on other tensors too: a head shared across pyramid
    levels), and one at a time, so that no more than one set's input is kept beyond the run's own. In
    eval mode: nothing such as a BatchNorm's running statistics changes; each module's mode is restored."""
    if not sibling_sets:
        return []
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    pays: dict[int, bool] = {}

    def time_set(index: str, x: torch.Tensor) -> None:  # a graph runs each node once: each set is timed once
        siblings = list(sibling_sets[int(index)])
        modules = [gm.get_submodule(n.target) for n in siblings]
        pays[int(index)] = fused_over_apart(modules, x, rounds, device, clock, dense_pieces(gm, siblings)) <= 1.0

    watched = {siblings[0].name: str(i) for i, siblings in enumerate(sibling_sets)}
    args = batches.as_args(batches.to_device(batch, device), batches.input_names(gm))
    with torch.no_grad(), evaluation_mode(gm):
        Capture(gm, watched, time_set).run(*args)
    return [pays[i] for i in range(len(sibling_sets))]


def fused_over_apart(modules: Sequence[nn.Module], x: torch.Tensor, rounds: int = SPEED_ROUNDS,
                     device: torch.device | None = None, clock: Callable[[], float] = time.perf_counter,
                     dense: list[bool] | None = None) -> float:
    """Time of ``modules`` as one wider layer (its output split and the pieces ``dense`` says made dense, as
    fusion.py runs it) over their time one after another, on ``x`` (the median of paired rounds:
    speed.time_ratio)."""
    wide = widened_call(list(modules), dense)
    return time_ratio(lambda: wide(x), lambda: [m(x) for m in modules], rounds, device, clock)
