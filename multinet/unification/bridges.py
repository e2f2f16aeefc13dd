"""Bridges: let a member's layer read another member's tensor, so that it can stop computing its own.

A chosen link (see ``choose_links``) concatenates the source tensor (average-pooled to the
layer's grid when needed) in front of the layer's own input (a layer with a skip link and a link to
another member reads both, so a head can draw on both members' features), and the layer is widened with zero
weights for those channels: outputs are unchanged. REAP then treats the source channels as
columns that help reconstruct (they belong to the source member's group), and may remove the
layer's own input channels entirely: its producer chain is then dead code. Links go in both
directions between members; the graph stays acyclic and no two tensors stand in for each other.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from ..graph import trace
from ..graph.dropping import mark_bridged
from ..graph.tracing import propagate_shapes
from .multinet import Link, MultiNet
from .similarity import _POOLS, Candidate, ancestors


@dataclass
class Bridge:
    consumer: str  # the member's layer that now also reads another member's channels
    model: str
    sources: list[tuple[str, str, int]]  # (other member, the layer whose input it shares, channels)
    own: int  # the layer's own input channels
    r2: float = 0.0  # how much of the layer's own input the sources explain (least squares, calibration data)
    pool: tuple[int, ...] | None = None  # average pooling applied to the source first
    tensors: tuple[str, ...] = ()  # per source, the graph node it reads (the source layer's input)


def choose_links(gm: fx.GraphModule, candidates: Iterable[Candidate], rank: dict[str, int],
                 min_r2: float, ways: set[tuple[str, str]] | None = None) -> list[Candidate]:
    """At most two sources per layer, one of each kind: the best-explaining tensor of another member
    and the best-explaining earlier tensor of its own member (a skip link), each with R² ≥ ``min_r2``,
    that keep the network acyclic and do not let two tensors stand in for each other (REAP's
    per-group curves would then count the same redundancy twice). Layers claim in order of their best R², ties
    broken by the canonical member ``rank`` (later members read earlier ones), never by list order.
    ``ways``: the (reader, source) member pairs allowed; by default one direction per pair
    (:func:`directions`). Both directions between two members may be allowed: the acyclicity and
    stand-in checks then keep them from reading each other's same tensors."""
    calls = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    inputs = {n.name: {a.name for a in n.all_input_nodes} for n in gm.graph.nodes}
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    candidates = [c for c in candidates if c.r2 >= min_r2]
    if ways is None:
        ways = directions(candidates, rank)
    by_layer: dict[str, list[Candidate]] = {}
    for c in candidates:
        if (c.model, c.source) in ways:
            by_layer.setdefault(c.layer, []).append(c)
    for options in by_layer.values():
        options.sort(key=lambda c: (-round(c.r2, 9), rank[c.source], order[calls[c.source_layer].name]))
    stands_in: dict[str, set[str]] = {}  # own input tensor -> source tensors that may replace it
    chosen = []
    layers = sorted(by_layer, key=lambda t: (-round(by_layer[t][0].r2, 9), -rank[by_layer[t][0].model],
                                              order[calls[t].name]))
    for layer in layers:
        node = calls[layer]
        own = node.args[0].name
        taken: set[bool] = set()  # kinds of source this layer has: True = its own member's (a skip link)
        for c in by_layer[layer]:
            kind = c.source == c.model
            if kind in taken:
                continue
            source = calls[c.source_layer].args[0].name
            if node.name in _reach(inputs, source) or own in _reach(stands_in, source):
                continue
            inputs[node.name].add(source)
            stands_in.setdefault(own, set()).add(source)
            chosen.append(c)
            taken.add(kind)
    return chosen


def directions(candidates: list[Candidate], rank: dict[str, int]) -> set[tuple[str, str]]:
    """Per pair of members, the one direction (reader, source) whose layers the other explains best
    in total (sum over layers of their best R²); ties: the later member in canonical order reads.
    A member's skip links (reader = source) are always allowed.
    Links both ways between two members would widen layers on both sides for the same redundancy."""
    best: dict[tuple[str, str], dict[str, float]] = {}
    for c in candidates:
        layers = best.setdefault((c.model, c.source), {})
        layers[c.layer] = max(layers.get(c.layer, 0.0), c.r2)
    score = {pair: round(sum(layers.values()), 9) for pair, layers in best.items()}
    return {(a, b) for (a, b), s in score.items()
            if a == b or (s, rank[a]) > (score.get((b, a), float("-inf")), rank[b])}


def _reach(edges: dict[str, set[str]], start: str) -> set[str]:
    """Everything reachable from ``start`` along ``edges`` (start included)."""
    seen, stack = {start}, [start]
    while stack:
        for nxt in edges.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["tensor_meta"].shape)


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


def add_bridges(net: MultiNet, example_inputs, links: Iterable[Candidate] = ()) -> tuple[fx.GraphModule, list[Bridge]]:
    """A copy of the MultiNet's graph in which each linked layer also reads its source's tensor.
    The bridged layers are marked on the graph (``graph.dropping.mark_bridged``): the channel analysis
    lets such a layer lose all its own channels."""
    gm = copy.deepcopy(net.graph_module)
    example = trace(gm, example_inputs).example_inputs
    calls = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    links = list(links)
    inputs = {name: calls[name].args[0] for lk in links for name in (lk.layer, lk.source_layer)}  # before any cat
    by_layer: dict[str, list[Candidate]] = {}
    for link in links:
        by_layer.setdefault(link.layer, []).append(link)
    bridges = []
    for layer, reads in by_layer.items():
        node, own = calls[layer], inputs[layer]
        dim = -1 if isinstance(gm.get_submodule(layer), nn.Linear) else 1  # where the layer's channels are
        tensors = []
        with gm.graph.inserting_before(node):
            for link in reads:
                source = inputs[link.source_layer]
                tensors.append(source if link.pool is None else
                               gm.graph.call_function(_POOLS[len(link.pool)], (source, link.pool)))
            cat = gm.graph.call_function(torch.cat, ([*tensors, own], dim))
        node.args = (cat, *node.args[1:])
        sources = [(link.source, link.source_layer, _shape(inputs[link.source_layer])[dim]) for link in reads]
        set_submodule(gm, layer, _widen(gm.get_submodule(layer), sum(w for _, _, w in sources)))
        bridges.append(Bridge(layer, reads[0].model, sources, _shape(own)[dim], max(lk.r2 for lk in reads),
                              reads[0].pool, tuple(inputs[lk.source_layer].name for lk in reads)))
    gm = _topologically_sorted(gm)
    propagate_shapes(gm, example)
    mark_bridged(gm, [b.consumer for b in bridges])
    return gm, bridges


def _topologically_sorted(gm: fx.GraphModule) -> fx.GraphModule:
    """The same graph with every node after its inputs (a link may read a member that comes later)."""
    graph, env = fx.Graph(), {}
    output = None
    for start in gm.graph.nodes:
        if start.op == "output":
            output = start
            continue
        stack = [start]
        while stack:
            node = stack[-1]
            if node in env:
                stack.pop()
                continue
            missing = [a for a in node.all_input_nodes if a not in env]
            if missing:
                stack.extend(missing)
                continue
            env[node] = graph.node_copy(node, lambda n: env[n])
            stack.pop()
    graph.node_copy(output, lambda n: env[n])
    out = fx.GraphModule(gm, graph, gm.__class__.__name__)
    out.meta.update(gm.meta)
    return out


def live_links(bridges: list[Bridge], gm: fx.GraphModule) -> list[Link]:
    """The links of ``bridges`` that ``gm`` (the compressed bridged graph) still computes: the layer is
    there and still depends on the tensor it was linked to. The source *layer* may be gone — a skip
    link can remove the layer whose input another member reads — while the tensor lives on."""
    nodes = {n.name: n for n in gm.graph.nodes}
    calls = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    out = []
    for b in bridges:
        call = calls.get(b.consumer)
        for (source, layer, _), tensor in zip(b.sources, b.tensors):
            if call is not None and tensor in nodes and nodes[tensor] in ancestors(call):
                out.append(Link(b.model, b.consumer, source, layer))
    return out

