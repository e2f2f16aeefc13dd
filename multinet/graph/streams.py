"""Which consumers write into a residual stream, and what their output is added to there.

A consumer whose output goes (through ops that are the identity at inference, or the BatchNorm
that directly follows it) into ``out + r`` is a writer of a residual stream. Reconstructing it
towards its own original output leaves whatever drift the stream ``r`` already carries from
earlier compressed layers in place; aiming it at ``out_orig + (r_orig - r)`` lets it cancel what
its inputs can explain of that drift (the multi-branch rule of He et al. 2017, "Channel Pruning
for Accelerating Very Deep Neural Networks", sec. 4.1). This pass only finds ``r``'s node; the
statistics (calib.stats) and the problem (pipeline.group_problems) do the rest.
"""
from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
import torch.fx as fx
import torch.nn as nn

_aten = torch.ops.aten
_IDENTITY_FUNCTIONS = {torch.nn.functional.dropout, torch.dropout, _aten.dropout.default, _aten.clone.default}
_ADD_FUNCTIONS = {operator.add, torch.add, _aten.add.Tensor}


def _is_identity(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An op that hands its single tensor input on unchanged in eval mode."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity))
    if node.op == "call_function" and node.target in _IDENTITY_FUNCTIONS:
        return node.target is not _aten.dropout.default or node.args[2:3] == (False,)
    return False


def _is_batchnorm(gm: fx.GraphModule, node: fx.Node) -> bool:
    return (node.op == "call_module"
            and isinstance(gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm))


def _add_operands(node: fx.Node) -> tuple | None:
    """(a, b) of a plain two-tensor ``a + b`` (no alpha), else None."""
    is_add = ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
              or (node.op == "call_method" and node.target == "add"))
    if not is_add or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args
    return (a, b) if isinstance(a, fx.Node) and isinstance(b, fx.Node) and a is not b else None


def _shape(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def stream_operand(gm: fx.GraphModule, call: fx.Node) -> fx.Node | None:
    """The node ``r`` that consumer call ``call``'s output is added to, or None when the output does
    not reach a same-shaped ``+`` unchanged (only through eval-mode identities, or a BatchNorm that
    directly follows: the consumer's problem already weights its outputs by that BatchNorm's scale)."""
    node = call
    first = True
    while len(node.users) == 1:
        user = next(iter(node.users))
        if _is_identity(gm, user) or (first and _is_batchnorm(gm, user)):
            node, first = user, False
            continue
        operands = _add_operands(user)
        if operands is None:
            return None
        other = operands[1] if operands[0] is node else operands[0]
        if _shape(other) is None or _shape(other) != _shape(node):
            return None  # a broadcast add (a bias-like tensor) is no residual stream
        return other
    return None


def _stream_sum(gm: fx.GraphModule, call: fx.Node) -> fx.Node:
    """The ``+`` node that ``stream_operand`` found for ``call``."""
    node = call
    while _add_operands(node) is None or node is call:
        node = next(iter(node.users))
    return node


def _closure(node: fx.Node, step) -> set[str]:
    """Names of the nodes reached from ``node`` (itself included) by following ``step(n)``."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        todo.extend(step(n))
    return seen


def ancestors(node: fx.Node) -> set[str]:
    """Names of every node ``node`` is computed from (itself included)."""
    return _closure(node, lambda n: n.all_input_nodes)


def descendants(node: fx.Node) -> set[str]:
    """Names of every node computed from ``node`` (itself included)."""
    return _closure(node, lambda n: n.users)


def stream_partners(gm: fx.GraphModule, calls: dict[str, list[str]], pending: Iterable[str],
                    solved: Iterable[str] = ()) -> dict[str, str]:
    """Consumer name -> the node its output is added to, for the consumers in ``calls`` (name -> its call
    nodes) called once, where cancelling the drift helps:
      * ``r`` does not depend on a ``pending`` node (a consumer still to be re-solved: ``r`` would change
        after the statistics were taken, so the drift measured would be stale);
      * no ``solved`` node (a consumer already re-solved) reads the sum: it was fitted to the drifted
        stream, and undoing the drift under it would undo its fit (a ResNet stage whose stream group was
        pruned, and so re-solved its readers, before the blocks inside it)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    pending, solved = set(pending), set(solved)
    partners = {}
    for name, call_nodes in calls.items():
        if len(call_nodes) != 1:
            continue
        call = nodes[call_nodes[0]]
        other = stream_operand(gm, call)
        if other is None or ancestors(other) & pending or descendants(_stream_sum(gm, call)) & solved:
            continue
        partners[name] = other.name
    return partners


def residual_partners(graph, names: Iterable[str], pending_layers: Iterable[str],
                      solved_layers: Iterable[str] = ()) -> dict[str, str]:
    """``stream_partners`` for consumers of a ChannelGraph, by layer name: ``pending_layers`` are the
    consumers still to be re-solved (the group being solved among them), ``solved_layers`` those
    re-solved before."""
    layers = graph.analysis.layers

    def call_nodes(names_):
        return {node for layer in names_ if layer in layers for node in layers[layer].nodes}

    return stream_partners(graph.module, {n: layers[n].nodes for n in names}, call_nodes(pending_layers),
                           call_nodes(solved_layers))
