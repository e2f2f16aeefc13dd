"""Removing a group entirely: its channels, its producer chain, and what only it fed.

Two cases, where nothing is lost that least squares cannot stand in for:

* **Bridged readers.** A group of one model that a MultiNet bridge lets another model's channels stand
  in for: each consumer reads the group through a concatenation with other inputs, so dropping the
  group's inputs from those concatenations (and giving the consumers their re-solved weights) leaves
  the group's producer chain unused, and dead-code elimination removes it — the computation is gone,
  not just narrowed to one channel.
* **A residual branch** (``branches=True``): every reader reads only this group and adds its output to
  a residual stream (``x + bn(conv2(relu(bn(conv1(x)))))``). With no channels left, each reader's
  least-squares fit is its bias alone — the mean of what it wrote — so the branch becomes a constant
  added to the stream (the BatchNorm after the reader folded in), and the block is its skip connection.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import PruneError
from .groups import ChannelGraph, ChannelGroup
from .streams import _is_batchnorm, _is_identity, stream_operand


# where a graph keeps the names of its bridged layers: its ``meta`` (copied by tracing, deep copies and
# .mnet files, so a unified network re-compressed later still knows them); only the two functions below
# read or write it
_BRIDGED = "multinet_bridges"


def bridged_layers(gm: fx.GraphModule) -> frozenset[str]:
    """The layers marked as MultiNet bridges (``mark_bridged``): the ones a group may be dropped from."""
    return frozenset(gm.meta.get(_BRIDGED, ()))


def mark_bridged(gm: fx.GraphModule, layers: Iterable[str]) -> None:
    """Record that ``layers`` read a concatenation of their own input with other members' tensors (what
    unification's bridges add): a group whose every reader is one of them can be removed entirely."""
    gm.meta[_BRIDGED] = sorted(set(layers))


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


def droppable(graph: ChannelGraph, group: ChannelGroup, branches: bool = False) -> bool:
    """True when the group can lose all its channels: every reader is a MultiNet bridge (a module
    layer whose concatenated input also holds another model's channels), or, with ``branches``, the
    group is a residual branch (see the module doc)."""
    if not group.prunable or group.pieces or not group.consumers:
        return False
    bridged = bridged_layers(graph.module)
    if set(group.consumer_names) <= bridged:
        return all(_owned_args(graph, group, c) is not None for c in group.consumer_names)
    return branches and residual_branch(graph, group)


def residual_branch(graph: ChannelGraph, group: ChannelGroup) -> bool:
    """Every reader of the group is a Conv/Linear module called once, with no conv groups, that reads
    only the group's channels, and whose output reaches a same-shaped ``+`` (a residual stream) through
    eval-mode identities or the BatchNorm right after it (one with running statistics); the group
    itself is no stream. And what a reader is added to is not the output of another such branch: in
    ``a(h) + b(h)`` neither term may go (once one is a constant, the other is added to no stream), while
    in ``x + f(x)`` or ``ds(x) + f(x)`` the other term stays whatever happens to ``f``."""
    modules, nodes = dict(graph.module.named_modules()), {n.name: n for n in graph.module.graph.nodes}
    if not _branch_shaped(graph, group, modules, nodes):
        return False
    for name in group.consumer_names:
        reader = nodes[graph.analysis.layers[name].nodes[0]]
        other = _through_identities(graph.module, stream_operand(graph.module, reader))
        if other.op == "call_module" and any(other.target in g.consumer_names and g.id != group.id
                                             and _branch_shaped(graph, g, modules, nodes)
                                             for g in graph.prunable_groups):
            return False
    return True


def _branch_shaped(graph: ChannelGraph, group: ChannelGroup, modules: dict, nodes: dict) -> bool:
    """The group-level and per-reader conditions of a residual branch (see residual_branch)."""
    if not group.prunable or group.pieces or not group.consumers:
        return False
    if group.grouped_conv or group.attention_heads or group.unit != 1 or is_residual_stream(graph, group):
        return False
    return all(_reads_only_group(graph, group, name, modules, nodes) for name in group.consumer_names)


_READERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _through_identities(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Back from ``node`` through eval-mode identities and BatchNorms to the op that computed it."""
    while (_is_identity(gm, node) or _is_batchnorm(gm, node)) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _reads_only_group(graph: ChannelGraph, group: ChannelGroup, name: str, modules: dict, nodes: dict) -> bool:
    """Reader ``name`` of the group: a Conv/Linear module called once, reading the group's channels and
    nothing else, whose output is added to a residual stream (BatchNorms on the way keep running stats)."""
    use = graph.analysis.layers[name]
    module = modules.get(name)  # a functional layer's reader is named by its weight: not a module
    if len(use.nodes) != 1 or not isinstance(module, _READERS):
        return False
    if isinstance(module, nn.Linear):
        width = module.in_features
    elif module.groups == 1:
        width = module.in_channels
    else:
        return False
    mine = {p + i for s in group.consumers if s.consumer == name for p in s.positions.tolist() for i in range(s.block)}
    node = nodes[use.nodes[0]]
    if mine != set(range(width)) or stream_operand(graph.module, node) is None:
        return False
    user = next(iter(node.users))
    return not _is_batchnorm(graph.module, user) or modules[user.target].running_mean is not None


def _unused_branch_residue(gm: fx.GraphModule) -> None:
    """Dead-code elimination keeps a dropout (a random op) that nothing reads any more, and with it the
    layers in front: erase unread eval-mode identities until none is left."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(gm.graph.nodes)):
            if not node.users and node.op != "output" and _is_identity(gm, node):
                gm.graph.erase_node(node)
                changed = True
        gm.graph.eliminate_dead_code()


def is_residual_stream(graph: ChannelGraph, group: ChannelGroup) -> bool:
    """Two producers writing the same channels: an addition ties them (a residual stream)."""
    table = graph.analysis.table
    spans = [(off, off + table.spaces[s].size) for s, off in group.members if table.spaces[s].kind == "producer"]
    return any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1:])


def drop_group(graph: ChannelGraph, gid: int, consumer_weights: Mapping[str, object]) -> fx.GraphModule:
    """A new GraphModule without group ``gid``: its consumers get ``consumer_weights`` (weight or
    (weight, bias), without the group's columns) — or, for a residual branch, become their bias — and
    its producer chain is eliminated."""
    group = graph.group(gid)
    if not droppable(graph, group, branches=True):
        raise PruneError(f"group {gid} cannot be removed entirely: some layer reads only its channels")
    bridged = bridged_layers(graph.module)
    if not set(group.consumer_names) <= bridged:
        return _drop_branch(graph, group, consumer_weights)
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


def _drop_branch(graph: ChannelGraph, group: ChannelGroup, consumer_weights: Mapping[str, object]) -> fx.GraphModule:
    """Each reader's output, up to the ``+`` of its residual stream, replaced by a constant: its re-solved
    bias (the mean of what it wrote) passed through what lies between (a BatchNorm, identities), as a
    buffer broadcast over the batch and positions."""
    gm = copy.deepcopy(graph.module)
    nodes = {n.name: n for n in gm.graph.nodes}
    for name in group.consumer_names:
        spec = consumer_weights[name]
        weight, bias = (spec, None) if isinstance(spec, torch.Tensor) else spec
        node = nodes[graph.analysis.layers[name].nodes[0]]
        shape = node.meta["tensor_meta"].shape
        module = gm.get_submodule(name)
        width = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        value = bias if bias is not None else module.bias if module.bias is not None else torch.zeros(width)
        value = value.detach().to(module.weight).reshape(1, -1, *([1] * (len(shape) - 2)))
        if isinstance(module, nn.Linear):  # features last: (1, ..., 1, out_features)
            value = value.reshape(*([1] * (len(shape) - 1)), -1)
        chain = [node]
        with torch.no_grad():  # fold what lies between the reader and the addition (eval mode)
            while _is_batchnorm(gm, next(iter(chain[-1].users))) or _is_identity(gm, next(iter(chain[-1].users))):
                chain.append(next(iter(chain[-1].users)))
                if chain[-1].op == "call_module":
                    value = gm.get_submodule(chain[-1].target).eval()(value)
        target = _free_buffer(gm, f"{name.replace('.', '_')}_constant")
        gm.register_buffer(target, value.detach().clone())
        with gm.graph.inserting_before(next(iter(chain[-1].users))):
            constant = gm.graph.get_attr(target)
        chain[-1].replace_all_uses_with(constant)
        for dead in reversed(chain):  # erased by hand: dead-code elimination keeps a dropout (a random op)
            gm.graph.erase_node(dead)
    _unused_branch_residue(gm)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm


def _free_buffer(gm: fx.GraphModule, stem: str) -> str:
    name, i = stem, 1
    while hasattr(gm, name):
        name, i = f"{stem}_{i}", i + 1
    return name
