"""Bridges: let a later model's layer read an earlier model's channels, so it can stop computing its own.

For every consumer (Conv/Linear) of model B whose input is prunable, the input of the earlier
models' consumer at the closest relative depth *with the same spatial shape* is concatenated in
front of B's own input, and the layer is widened with zero weights for those channels: outputs
are unchanged. Candidates come from shapes alone, so models need not share an architecture.
REAP then treats the earlier model's channels as columns that help reconstruct but are never
removed (they are another group's), and may remove B's own channels entirely: B's layer then
reads only the earlier model's channels and B's producer chain is dead code.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from ..graph import ChannelGraph, trace
from ..graph.tracing import propagate_shapes
from .multinet import Link, MultiNet, model_names

_WIDENABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class Bridge:
    consumer: str  # the later model's layer that now also reads earlier models' channels
    model: str
    sources: list[tuple[str, str, int]]  # (earlier model, the layer whose input it shares, channels)
    own: int  # the layer's own input channels


def _consumers(graph: ChannelGraph, gm: fx.GraphModule, model: str) -> list[tuple[str, fx.Node, fx.Node]]:
    """The model's module consumers with a tracked input, in graph order: (name, call, its own input)."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not node.target.startswith(f"{model}."):
            continue
        use = graph.analysis.layers.get(node.target)
        module = gm.get_submodule(node.target)
        if use is None or use.in_segments is None or not isinstance(module, _WIDENABLE):
            continue
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups != 1:
            continue
        if len(use.nodes) != 1:  # a layer called twice would be widened twice
            continue
        if isinstance(module, nn.Linear) and len(_shape(node.args[0])) != 2:  # channels on dim 1 only
            continue
        out.append((node.target, node, node.args[0]))
    return out


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["tensor_meta"].shape)


def _compatible(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) and a[2:] == b[2:] and a[0] == b[0]


def _widen(module: nn.Module, extra: int) -> nn.Module:
    """The same layer reading ``extra`` more input channels first, with zero weights for them."""
    w = module.weight.detach()
    zeros = w.new_zeros((w.shape[0], extra, *w.shape[2:]))
    if isinstance(module, nn.Linear):
        new = nn.Linear(module.in_features + extra, module.out_features, bias=module.bias is not None)
    else:
        new = type(module)(module.in_channels + extra, module.out_channels, module.kernel_size, module.stride,
                           module.padding, module.dilation, 1, module.bias is not None, module.padding_mode)
    new.weight = nn.Parameter(torch.cat([zeros, w], 1))
    if module.bias is not None:
        new.bias = nn.Parameter(module.bias.detach().clone())
    return new.to(w.device).eval()


def set_submodule(gm: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def add_bridges(net: MultiNet, example_inputs) -> tuple[fx.GraphModule, list[Bridge]]:
    """A copy of the MultiNet's graph in which each later model's consumers also read earlier models'
    channels. The graph's ``meta["multinet_bridges"]`` lists the bridged layers: the channel
    analysis (graph/dropping.py) reads it to let such a layer lose all its own channels."""
    names = model_names(net)
    gm = copy.deepcopy(net.graph_module)
    graph = trace(gm, example_inputs)
    prunable_inputs = {name for g in graph.prunable_groups for name in g.consumer_names}
    per_model = {m: _consumers(graph, gm, m) for m in names}
    bridges = []
    for i, later in enumerate(names[1:], 1):
        own = per_model[later]
        for idx, (name, node, x) in enumerate(own):
            if name not in prunable_inputs:
                continue
            depth = idx / max(1, len(own) - 1)
            sources, described = [], []
            for earlier in names[:i]:
                theirs = per_model[earlier]  # their own inputs: an earlier bridge's concatenation is not shared
                options = [(abs(j / max(1, len(theirs) - 1) - depth), j, layer, inp)
                           for j, (layer, _, inp) in enumerate(theirs)
                           if _compatible(_shape(inp), _shape(x)) and inp.op != "placeholder"]
                if options:
                    _, _, layer, inp = min(options, key=lambda o: (o[0], o[1]))
                    sources.append(inp)
                    described.append((earlier, layer, _shape(inp)[1]))
            if not sources:
                continue
            with gm.graph.inserting_before(node):
                cat = gm.graph.call_function(torch.cat, ([*sources, x], 1))
            node.args = (cat, *node.args[1:])
            set_submodule(gm, name, _widen(gm.get_submodule(name), sum(d[2] for d in described)))
            bridges.append(Bridge(name, later, described, _shape(x)[1]))
    gm.recompile()
    propagate_shapes(gm, graph.example_inputs)
    gm.meta["multinet_bridges"] = [b.consumer for b in bridges]
    return gm, bridges


def links_of(bridges: list[Bridge]) -> list[Link]:
    """One link per (bridged layer, earlier model's layer whose input it reads)."""
    return [Link(b.model, b.consumer, source, layer) for b in bridges for source, layer, _ in b.sources]
