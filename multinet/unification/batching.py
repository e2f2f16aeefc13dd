"""Batched members: same-shaped layers of different members run as one batched or grouped op.

Sibling fusion (fusion.py) merges layers that read the *same* tensor. Members of an ensemble
(several copies of one architecture, or members that share a block design) also hold layers that
read *different* tensors of the same shape with the same layer settings: member a's ``conv2`` and
member b's ``conv2``. Those become one op over the members' inputs stacked together:

- ``nn.Linear``: the inputs stacked on a new leading dim (token inputs flattened to rows first), one
  ``baddbmm`` with the weights stacked, then ``unbind`` (and the token dims restored);
- ``nn.Conv1d/2d/3d``: the inputs concatenated along channels, one convolution with ``groups``
  multiplied by the number of members, then a split per member.

Why: N small ops become one (one kernel launch on a GPU instead of N, and a GEMM/conv large enough
to fill the device), so N members execute as one wide network. On a CPU a batched op is about as
fast as the ops it replaces and a grouped conv is often slower (measured in
benchmarks/results/multinet_speed.md), so this form is opt-in: ``net.fused(batched=True)``, or
``multinet.infer(..., fuse="auto")``, which times every form on the device and keeps the fastest.

Layers are matched by their settings, their input's recorded shape and their depth in the graph
(the longest path from the inputs: member a's third conv and member b's third conv in an ensemble;
depth rather than a per-member rank, so layers that sibling fusion already merged across a member's
q/k/v still line up). Depth grows along every edge, so a set's layers never depend on each other and
merged sets cannot wait on each other (links between members included); the graph is then re-ordered
topologically, each batched op after all of its inputs. Outputs equal the unfused graph's up to float
rounding. The batched form is built for the input shape recorded in the graph: two members whose
tensors have equal shapes there are assumed to keep equal shapes at other input sizes (they read the
same input); where they do not, the stack or concatenation refuses the batch.
"""
from __future__ import annotations

import copy
import operator
from collections import defaultdict

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.tools_common import stable_topological_sort

from .fusion import FUSE_MIN_DEPTH, _CONVS, finish_rewrite

_CONV_FUNCTIONS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


def batch_members(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` in which same-shaped layers of different members run as one batched op."""
    gm = copy.deepcopy(gm)
    sets = parallel_layers(gm)
    if not sets:
        return gm
    for nodes in sets:
        _batch(gm, nodes)
    stable_topological_sort(gm)  # each batched op after all of its inputs, the order kept otherwise
    return finish_rewrite(gm)


def batched_count(gm: fx.GraphModule) -> int:
    """How many batched ops a graph holds (each stands for two or more members' layers)."""
    return sum(1 for name, _ in gm.named_parameters()
               if "." not in name and name.startswith("batched_") and name.endswith("_weight"))


def parallel_layers(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Sets of layers with equal settings and input shapes at the same depth of the graph (the longest
    path from the inputs): in members of one architecture, the layers at the same place. Depth grows
    along every edge, so layers at one depth never depend on each other, and merging each set into one
    node cannot make a cycle (a set at depth d only waits for nodes at depths below d)."""
    depth: dict[fx.Node, int] = {}
    sets: dict[tuple, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        depth[node] = 1 + max((depth[i] for i in node.all_input_nodes), default=-1)
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            continue
        key = _batch_key(gm.get_submodule(node.target), node.args[0])
        if key is not None:
            sets[(key, depth[node])].append(node)
    return [nodes for nodes in sets.values() if len(nodes) > 1]


def _batch_key(module: nn.Module, source: fx.Node) -> tuple | None:
    """What must match for layers to run as one batched op; None for a layer this pass leaves alone
    (too shallow to pay for stacking its input: FUSE_MIN_DEPTH, as for sibling fusion)."""
    if type(module) is not nn.Linear and type(module) not in _CONVS:
        return None
    meta = source.meta.get("tensor_meta")
    w = module.weight
    if not hasattr(meta, "shape") or w[0].numel() < FUSE_MIN_DEPTH:
        return None
    common = (tuple(meta.shape), meta.dtype, w.dtype, w.device, module.bias is not None)
    if type(module) is nn.Linear and len(meta.shape) >= 2:
        return ("linear", module.in_features, module.out_features, *common)
    if type(module) in _CONVS and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return (type(module).__name__, module.in_channels, module.out_channels, module.kernel_size, module.stride,
                module.padding, module.dilation, module.groups, *common)
    return None


def _batch(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Replace ``nodes`` (one layer per member) by one batched op and a split of its output."""
    modules = [gm.get_submodule(n.target) for n in nodes]
    name = _free_prefix(gm)
    xs = [n.args[0] for n in nodes]
    graph = gm.graph
    with graph.inserting_before(nodes[0]):  # placed for now; the sort moves it after its inputs
        if isinstance(modules[0], nn.Linear):
            pieces = _batched_linear(gm, graph, name, modules, xs)
        else:
            pieces = _grouped_conv(gm, graph, name, modules, xs)
    for node, piece in zip(nodes, pieces):
        node.replace_all_uses_with(piece)
        graph.erase_node(node)


def _free_prefix(gm: fx.GraphModule) -> str:
    """``batched_<i>`` with neither ``batched_<i>_weight`` nor ``_bias`` yet (the op's parameters)."""
    i = 0
    while hasattr(gm, f"batched_{i}_weight") or hasattr(gm, f"batched_{i}_bias"):
        i += 1
    return f"batched_{i}"


def _parameter(gm: fx.GraphModule, graph: fx.Graph, name: str, value: torch.Tensor, like: torch.Tensor) -> fx.Node:
    gm.register_parameter(name, nn.Parameter(value.detach().clone(), requires_grad=like.requires_grad))
    return graph.get_attr(name)


def _batched_linear(gm, graph: fx.Graph, name: str, modules: list[nn.Linear], xs: list[fx.Node]) -> list[fx.Node]:
    """k linears over same-shaped inputs: one batched matrix product, (k, rows, in) @ (k, in, out).
    Token inputs (N, T, in) are flattened to rows first and unflattened after: a broadcast matmul over
    (k, N, T, in) would copy the weight for every row block."""
    k, ndim = len(modules), len(xs[0].meta["tensor_meta"].shape)
    first = modules[0]
    w = _parameter(gm, graph, f"{name}_weight", torch.stack([m.weight.T for m in modules]), first.weight)
    rows = xs if ndim == 2 else [graph.call_method("flatten", (x, 0, -2)) for x in xs]
    stacked = graph.call_function(torch.stack, (rows,))
    if first.bias is not None:
        bias = torch.stack([m.bias for m in modules]).unsqueeze(1)  # (k, 1, out)
        out = graph.call_function(torch.baddbmm, (_parameter(gm, graph, f"{name}_bias", bias, first.bias), stacked, w))
    else:
        out = graph.call_function(torch.bmm, (stacked, w))
    parts = graph.call_function(torch.unbind, (out,))
    pieces = [graph.call_function(operator.getitem, (parts, i)) for i in range(k)]
    if ndim == 2:
        return pieces
    leading = [graph.call_function(operator.getitem, (graph.call_function(getattr, (x, "shape")), slice(None, -1)))
               for x in xs]
    return [graph.call_method("unflatten", (piece, 0, lead)) for piece, lead in zip(pieces, leading)]


def _grouped_conv(gm, graph: fx.Graph, name: str, modules: list[nn.Module], xs: list[fx.Node]) -> list[fx.Node]:
    """k convolutions over same-shaped inputs: one convolution with k times the groups."""
    first = modules[0]
    w = _parameter(gm, graph, f"{name}_weight", torch.cat([m.weight for m in modules]), first.weight)
    b = None
    if first.bias is not None:
        b = _parameter(gm, graph, f"{name}_bias", torch.cat([m.bias for m in modules]), first.bias)
    joined = graph.call_function(torch.cat, (xs, 1))
    out = graph.call_function(_CONV_FUNCTIONS[type(first)], (joined, w, b, first.stride, first.padding,
                                                              first.dilation, first.groups * len(modules)))
    parts = graph.call_function(torch.split, (out, first.out_channels, 1))
    # a channel slice is strided; the layers after it run faster on a dense copy
    return [graph.call_method("contiguous", (graph.call_function(operator.getitem, (parts, i)),))
            for i in range(len(modules))]
