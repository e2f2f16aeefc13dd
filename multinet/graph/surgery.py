"""Graph surgery: a new GraphModule with physically smaller layers.

It only slices tensors and rewrites size literals, following the edits the channel analysis
recorded; it never does linear algebra (solvers pass replacement consumer weights in).
"""
from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import PruneError
from .axes import kept_positions
from .edits import ATEN_SLICE, Balanced, GroupedInput, SetCount, ShapeLiteral, SliceBounds, SliceTensor, SplitSizes
from .groups import ChannelGraph
from .op_tables import weight_output_dim
from .trace_api import trace
from .tracing import propagate_shapes

WeightSpec = torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]


def prune(
    model_or_graph: nn.Module | ChannelGraph,
    keep: Mapping[int, object],
    consumer_weights: Mapping[str, WeightSpec] | None = None,
    example_inputs=None,
) -> fx.GraphModule:
    """Keep only ``keep[group_id]`` channels of each named group; other groups stay whole.

    ``consumer_weights`` maps a consumer (its module name, or the weight attribute of a
    functional layer) to a replacement weight, or (weight, bias), already in the pruned shape:
    this is how reconstruction solvers hand their result to surgery.
    """
    graph = model_or_graph if isinstance(model_or_graph, ChannelGraph) else None
    if graph is None:
        if example_inputs is None:
            raise PruneError("prune(model, ...) needs example_inputs to trace the model (or pass a ChannelGraph)")
        graph = trace(model_or_graph, example_inputs)
    keep_local = _local_keep(graph, keep)
    gm = copy.deepcopy(graph.module)
    nodes = {n.name: n for n in gm.graph.nodes}
    for edit in graph.analysis.edits:
        _apply(gm, nodes, edit, keep_local)
    for name, spec in (consumer_weights or {}).items():
        _set_consumer_weight(gm, graph, name, spec)
    gm.graph.lint()
    gm.recompile()
    _refresh_shapes(gm, graph.example_inputs)
    return gm


def _refresh_shapes(gm: fx.GraphModule, example_inputs) -> None:
    """The copied nodes still carry the unpruned shapes from tracing: record the pruned ones, so
    that ``count(prune(...))`` is right without example inputs (one pass over the example; propagate_shapes
    runs it in eval mode, so no BatchNorm statistics move)."""
    if not example_inputs:
        return
    device = next((p.device for p in gm.parameters()), None)
    inputs = tuple(t.to(device) if isinstance(t, torch.Tensor) and device is not None else t for t in example_inputs)
    propagate_shapes(gm, inputs)


def _local_keep(graph: ChannelGraph, keep: Mapping[int, object]) -> dict[int, torch.Tensor]:
    """Group channel indices -> kept channel indices of each member space."""
    out: dict[int, torch.Tensor] = {}
    for gid, indices in keep.items():
        try:
            group = graph.group(gid)
        except KeyError as exc:
            raise PruneError(exc.args[0]) from None
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if idx.numel() == 0:
            raise PruneError(f"group {gid} would be pruned to zero channels; keep at least one")
        if idx.min() < 0 or idx.max() >= group.size:
            raise PruneError(f"group {gid} has {group.size} channels; indices must lie in 0..{group.size - 1}")
        idx = torch.unique(idx)  # sorted
        if len(idx) != len(torch.as_tensor(indices).reshape(-1)):
            raise PruneError(f"group {gid}: duplicate channel indices")
        if len(idx) < group.size and not group.prunable:
            raise PruneError(f"group {gid} is not prunable: {group.reasons[0]}")
        for space, offset in group.members:
            size = graph.analysis.table.spaces[space].size
            local = idx - offset
            out[space] = local[(local >= 0) & (local < size)]
    return out


def kept_output_rows(graph: ChannelGraph, group_id: int, keep) -> dict[str, torch.Tensor]:
    """For each layer producing group ``group_id``, the rows of its weight (output features) that
    keeping channels ``keep`` leaves: a head is head_dim rows, a packed q/k/v projection has a part of
    the group at each third."""
    group = graph.group(group_id)
    keep_local = _local_keep(graph, {group_id: keep})
    table = graph.analysis.table
    owners = {table.spaces[s].owner for s, _ in group.members if table.spaces[s].kind == "producer"}
    rows: dict[str, torch.Tensor] = {}
    for edit in graph.analysis.edits:
        if not (isinstance(edit, SliceTensor) and edit.attr.endswith(".weight")):
            continue
        owner = edit.attr[: -len(".weight")]
        if owner not in owners or edit.dim != weight_output_dim(_module_or_none(graph.module, owner)):
            continue
        if any(seg.space in keep_local for seg in edit.segments):
            rows[owner] = kept_positions(edit.segments, keep_local)
    return rows


def _module_or_none(gm: nn.Module, name: str) -> nn.Module | None:
    """The module called ``name``; None for a functional layer's weight attribute."""
    try:
        return gm.get_submodule(name)
    except AttributeError:
        return None


def _resolve(gm: nn.Module, path: str) -> tuple[nn.Module, str]:
    owner, _, attr = path.rpartition(".")
    return (gm.get_submodule(owner) if owner else gm), attr


def _apply(gm: fx.GraphModule, nodes: dict[str, fx.Node], edit, keep_local) -> None:
    if isinstance(edit, SliceTensor):
        owner, attr = _resolve(gm, edit.attr)
        tensor = getattr(owner, attr)
        idx = kept_positions(edit.segments, keep_local).to(tensor.device)
        sliced = tensor.detach().index_select(edit.dim, idx).clone()
        if isinstance(tensor, nn.Parameter):
            setattr(owner, attr, nn.Parameter(sliced, requires_grad=tensor.requires_grad))
        elif attr in owner._buffers:
            owner._buffers[attr] = sliced
        else:
            setattr(owner, attr, sliced)
    elif isinstance(edit, SetCount):
        width = len(kept_positions(edit.segments, keep_local))
        setattr(gm.get_submodule(edit.module), edit.attr, (width,) if edit.as_tuple else width)
    elif isinstance(edit, SplitSizes):
        kept = kept_positions(edit.segments, keep_local)
        sizes = [int(((kept >= lo) & (kept < hi)).sum()) for lo, hi in edit.ranges]
        if min(sizes) == 0:
            raise PruneError(f"pruning empties a piece of the split at `{edit.node}`")
        node = nodes[edit.node]
        node.op, node.target = "call_function", torch.split
        node.args, node.kwargs = (node.args[0], sizes, edit.dim), {}
    elif isinstance(edit, SliceBounds):
        kept = kept_positions(edit.segments, keep_local)
        begin, end = int((kept < edit.begin).sum()), int((kept < edit.end).sum())
        if begin == end:
            raise PruneError(f"pruning empties the slice at `{edit.node}`")
        node = nodes[edit.node]
        if edit.index_pos == ATEN_SLICE:
            node.args = (node.args[0], node.args[1], begin, end, *node.args[4:])
        elif edit.index_pos < 0:
            node.args = (node.args[0], slice(begin, end))
        else:
            index = list(node.args[1])
            index[edit.index_pos] = slice(begin, end)
            node.args = (node.args[0], tuple(index))
    elif isinstance(edit, ShapeLiteral):
        width = len(kept_positions(edit.segments, keep_local))
        _set_arg(nodes[edit.node], edit.arg_path, width * edit.mul // edit.div)
    elif isinstance(edit, Balanced):
        _balanced_counts(edit.segments, edit.parts, keep_local, edit.owner)
    elif isinstance(edit, GroupedInput):
        _slice_grouped_input(gm, edit, keep_local)


def _balanced_counts(segments, parts: int, keep_local, owner: str) -> list[torch.Tensor]:
    """Kept positions of each of ``parts`` equal blocks, local to the block; all equally many."""
    kept = kept_positions(segments, keep_local)
    per = sum(s.width for s in segments) // parts
    blocks = [kept[(kept >= g * per) & (kept < (g + 1) * per)] - g * per for g in range(parts)]
    if len({len(b) for b in blocks}) != 1:
        raise PruneError(f"grouped conv `{owner}` has {parts} groups: keep the same number of channels in each "
                         f"(kept {[len(b) for b in blocks]})")
    return blocks


def _slice_grouped_input(gm: fx.GraphModule, edit: GroupedInput, keep_local) -> None:
    """Output block g of the weight keeps the kept input positions of input block g."""
    owner, attr = _resolve(gm, edit.attr)
    tensor = getattr(owner, attr)
    blocks = _balanced_counts(edit.segments, edit.groups, keep_local, edit.attr)
    rows = tensor.shape[0] // edit.groups
    parts = [tensor.detach()[g * rows:(g + 1) * rows].index_select(1, idx.to(tensor.device))
             for g, idx in enumerate(blocks)]
    setattr(owner, attr, nn.Parameter(torch.cat(parts).clone(), requires_grad=tensor.requires_grad))


def _set_arg(node: fx.Node, path: tuple, value: int) -> None:
    head, rest = path[0], path[1:]
    container = list(node.args) if isinstance(head, int) else dict(node.kwargs)
    if rest:
        inner = list(container[head])
        inner[rest[0]] = value
        container[head] = type(container[head])(inner) if isinstance(container[head], tuple) else inner
    else:
        container[head] = value
    if isinstance(head, int):
        node.args = tuple(container)
    else:
        node.kwargs = container


def _set_consumer_weight(gm: fx.GraphModule, graph: ChannelGraph, name: str, spec: WeightSpec) -> None:
    use = graph.analysis.layers.get(name)
    if use is None or use.in_segments is None:
        raise PruneError(f"`{name}` is not a consumer of any channel group")
    weight, bias = (spec, None) if isinstance(spec, torch.Tensor) else spec
    path = f"{name}.weight" if _is_module(gm, name) else name
    owner, attr = _resolve(gm, path)
    current = getattr(owner, attr)
    if tuple(weight.shape) != tuple(current.shape):
        raise PruneError(f"replacement weight for `{name}` has shape {tuple(weight.shape)}, "
                         f"the pruned layer needs {tuple(current.shape)}")
    setattr(owner, attr, nn.Parameter(weight.detach().to(current).clone()))
    if bias is not None:
        bias_path = f"{name}.bias" if _is_module(gm, name) else _functional_bias(graph, name)
        if bias_path is None:
            raise PruneError(f"`{name}` has no bias to replace")
        b_owner, b_attr = _resolve(gm, bias_path)
        b_current = getattr(b_owner, b_attr)
        if b_current is None and _is_module(gm, name) and tuple(bias.shape) == (current.shape[0],):
            b_current = current.new_zeros(current.shape[0])  # a bias-free layer gains a bias
        if b_current is None or tuple(bias.shape) != tuple(b_current.shape):
            raise PruneError(f"replacement bias for `{name}` does not match the layer's bias")
        setattr(b_owner, b_attr, nn.Parameter(bias.detach().to(b_current).clone()))


def _is_module(gm: fx.GraphModule, name: str) -> bool:
    try:
        return isinstance(gm.get_submodule(name), nn.Module)
    except AttributeError:
        return False


def _functional_bias(graph: ChannelGraph, weight: str) -> str | None:
    for node in graph.module.graph.nodes:
        if node.op == "call_function" and len(node.args) > 2 and getattr(node.args[1], "target", None) == weight:
            bias = node.args[2]
            return bias.target if isinstance(bias, fx.Node) else None
    return None
