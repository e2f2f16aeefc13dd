"""``multinet.trace``: model + example inputs -> ChannelGraph."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .groups import ChannelGraph, build_groups
from .tracing import as_tuple, propagate_shapes, symbolic_trace


def trace(
    model: torch.nn.Module,
    example_inputs,
    leaf_modules: Iterable[type | str] = (),
    autowrap_functions: Iterable[Callable] = (),
) -> ChannelGraph:
    """Trace ``model`` with torch.fx, propagate shapes and find its channel groups.

    ``leaf_modules`` (classes or qualified names) are kept as opaque calls and
    ``autowrap_functions`` are recorded as single calls instead of being traced through: the
    standard fx escape hatches for code with data-dependent control flow. Opaque calls make the
    channels that reach them unprunable, never silently wrong.
    """
    gm = symbolic_trace(model, leaf_modules, autowrap_functions)
    inputs = as_tuple(example_inputs)
    propagate_shapes(gm, inputs)
    groups, analysis = build_groups(gm)
    return ChannelGraph(gm, inputs, groups, analysis)
