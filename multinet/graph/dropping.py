"""Removing a group entirely, when every layer that reads it also reads other channels.

A group of one model that a MultiNet bridge lets another model's channels stand in for can lose
all its channels: each consumer reads the group through a concatenation with other inputs, so
dropping the group's inputs from those concatenations (and giving the consumers their
re-solved weights) leaves the group's producer chain unused, and dead-code elimination removes
it — the computation is gone, not just narrowed to one channel.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import PruneError
from .groups import ChannelGraph, ChannelGroup


def _cat_inputs(node: fx.Node) -> fx.Node | None:
    x = node.args[0] if node.args else None
    if isinstance(x, fx.Node) and x.op == "call_function" and x.target is torch.cat and len(x.users) == 1:
        dim = x.args[1] if len(x.args) > 1 else x.kwargs.get("dim", 0)
        if dim in (1, -len(x.meta["tensor_meta"].shape) + 1):
            return x
    return None


def _owned_args(graph: ChannelGraph, group: ChannelGroup, consumer: str) -> tuple[fx.Node, list[int]] | None:
    """The consumer's concatenation and which of its inputs carry only this group's channels,
    when they carry all of the group's channels there and something else remains."""
    nodes = {n.name: n for n in graph.module.graph.nodes}
    use = graph.analysis.layers[consumer]
    if len(use.nodes) != 1:
        return None
    cat = _cat_inputs(nodes[use.nodes[0]])
    if cat is None:
        return None
    mine = set()
    for slot in group.consumers:
        if slot.consumer == consumer:
            for p in slot.positions.tolist():
                mine.update(range(p, p + slot.block))
    owned, start = [], 0
    for i, arg in enumerate(cat.args[0]):
        width = arg.meta["tensor_meta"].shape[1]
        span = set(range(start, start + width))
        if span <= mine:
            owned.append(i)
        elif span & mine:
            return None
        start += width
    covered = {p for i in owned for p in range(*_span(cat, i))}
    if covered != mine or len(owned) == len(cat.args[0]):
        return None
    return cat, owned


def _span(cat: fx.Node, index: int) -> tuple[int, int]:
    widths = [a.meta["tensor_meta"].shape[1] for a in cat.args[0]]
    start = sum(widths[:index])
    return start, start + widths[index]


def droppable(graph: ChannelGraph, group: ChannelGroup) -> bool:
    """True when the group can lose all its channels: every reader is a MultiNet bridge (a module
    layer whose concatenated input also holds another model's channels; see the module doc)."""
    bridged = set(graph.module.meta.get("multinet_bridges", ()))
    if not group.prunable or group.pieces or not group.consumers or not set(group.consumer_names) <= bridged:
        return False
    return all(_owned_args(graph, group, c) is not None for c in group.consumer_names)


def drop_group(graph: ChannelGraph, gid: int, consumer_weights: Mapping[str, object]) -> fx.GraphModule:
    """A new GraphModule without group ``gid``: its consumers get ``consumer_weights`` (weight or
    (weight, bias), without the group's columns) and its producer chain is eliminated."""
    group = graph.group(gid)
    if not droppable(graph, group):
        raise PruneError(f"group {gid} cannot be removed entirely: some layer reads only its channels")
    plans = {c: _owned_args(graph, group, c) for c in group.consumer_names}
    gm = copy.deepcopy(graph.module)
    nodes = {n.name: n for n in gm.graph.nodes}
    for consumer, (cat, owned) in plans.items():
        cat = nodes[cat.name]
        remaining = [a for i, a in enumerate(cat.args[0]) if i not in owned]
        user = next(iter(cat.users))
        if len(remaining) == 1:
            user.replace_input_with(cat, remaining[0])
        else:
            cat.args = (remaining, *cat.args[1:])
        spec = consumer_weights[consumer]
        weight, bias = (spec, None) if isinstance(spec, torch.Tensor) else spec
        module = gm.get_submodule(consumer)
        if isinstance(module, nn.Linear):
            module.in_features = weight.shape[1]
        else:
            module.in_channels = weight.shape[1]
        module.weight = nn.Parameter(weight.detach().to(module.weight).clone())
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().to(module.weight).clone())
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm
