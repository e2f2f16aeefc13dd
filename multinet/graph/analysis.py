"""The channel analysis: one pass over an fx graph that tracks the channel axis of every tensor.

Each rule maps the channel axes of a node's inputs to the channel axis of its output and records
how surgery must edit the graph. Producers (Conv, Linear) create spaces; pass-through ops carry
them; residual adds, gating and parameters tie them; concat and split move them by offsets.
Anything not understood fails closed: the spaces that reach it are marked unprunable with a reason.
"""
from __future__ import annotations

import math
import operator
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from . import op_tables as ops
from .axes import Axis, Segment, aligned_pieces, scale_blocks, slice_segments
from .edits import (ATEN_SLICE, Balanced, Edit, GroupedInput, SetCount, ShapeLiteral, SliceBounds, SliceTensor,
                    SplitSizes)
from .spaces import SpaceTable

Info = Axis | list | None


@dataclass
class LayerUse:
    """A Conv/Linear (module or functional) seen as producer and/or consumer of channels."""

    name: str
    kind: str  # "conv" | "linear"
    nodes: list[str]
    columns_per_position: int  # kh*kw for a conv, 1 for a linear
    in_segments: tuple[Segment, ...] | None = None
    out_space: int | None = None
    conv_groups: int = 1  # a grouped conv's input: output block g reads only input block g
    out_segments: tuple[Segment, ...] | None = None  # its output channels: one space, or one per part


@dataclass
class AnalysisResult:
    table: SpaceTable
    edits: list[Edit]
    layers: dict[str, LayerUse]
    passthrough: dict[int, set[str]]  # space -> names of pass-through layers carrying params
    inexact: dict[int, list[str]]  # space -> why pruning it changes the kept channels' values
    unknown_ops: list[str] = None  # labels of the ops the analysis did not understand
    unit_requests: dict[str, int] = None  # producer -> features per channel a later pass should use
    space_units: dict[int, int] = None  # producer space -> features per channel (head_dim for heads)
    part_requests: dict[str, frozenset[int]] = None  # producer -> feature offsets where a later pass cuts it
    head_spaces: set[int] = None  # spaces tied by attention (sdpa, batched matmul, einsum): head channels
    # node name -> the channel axis of its output, for nodes with one: what a weightless layer's cost
    # (attention, batched matmul) shrinks with when the channels there go (schedule/costs.py)
    node_axes: dict[str, Axis] = None


def _shape(arg) -> tuple[int, ...] | None:
    if isinstance(arg, fx.Node):
        meta = arg.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            return tuple(meta.shape)
    return None


def _norm(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


class ChannelAnalysis:
    """One pass over the graph. ``units`` makes a producer's channel a block of features (an
    attention head of head_dim features); passes that meet a head split ask for it in
    ``unit_requests`` and the driver (groups.build_groups) reruns the analysis with them.

    ``parts`` cuts a producer's output into several spaces at the given feature offsets: a packed
    q/k/v projection (one Linear, chunked) whose thirds attention ties head by head. One space
    cannot be tied to itself at another offset, so a pass that meets such a tie asks for the cut
    in ``part_requests``; the parts are then tied into one group like separate projections."""

    def __init__(self, gm: fx.GraphModule, units: dict[str, int] | None = None,
                 parts: dict[str, frozenset[int]] | None = None):
        self.gm = gm
        self.units = dict(units or {})
        self.unit_requests: dict[str, int] = {}
        self.parts = dict(parts or {})
        self.part_requests: dict[str, frozenset[int]] = {}
        self.head_spaces: set[int] = set()
        self.unknown_ops: list[str] = []
        self.modules = dict(gm.named_modules())
        self.table = SpaceTable()
        self.info: dict[fx.Node, Info] = {}
        self.edits: list[Edit] = []
        self.layers: dict[str, LayerUse] = {}
        self.passthrough: dict[int, set[str]] = defaultdict(set)
        self.inexact: dict[int, list[str]] = defaultdict(list)
        self._module_axis: dict[str, tuple[Segment, ...]] = {}
        self._param_space: dict[tuple[str, int], int] = {}
        self._param_binders: dict[str, set[str]] = defaultdict(set)
        # values read off a channel axis (x.size(1), x.shape[-1], and arithmetic on them): node -> spaces,
        # or for a whole shape tuple node -> (channel dim, spaces)
        self._channel_sizes: dict[fx.Node, set[int]] = {}
        self._shape_tuples: dict[fx.Node, tuple[int, set[int]]] = {}
        self._space_unit: dict[int, int] = {}
        self._space_start: dict[int, int] = {}  # producer space -> its first feature in the producer's output
        self._module_space: dict[str, int] = {}

    # ------------------------------------------------------------------ driver
    def run(self) -> AnalysisResult:
        for node in self.gm.graph.nodes:
            self.info[node] = self._visit(node)
        self._check_param_uses()
        return AnalysisResult(self.table, self.edits, self.layers, dict(self.passthrough), dict(self.inexact),
                              self.unknown_ops, self.unit_requests, dict(self._space_unit), self.part_requests,
                              self.head_spaces,
                              {n.name: info for n, info in self.info.items() if isinstance(info, Axis)})

    def _visit(self, node: fx.Node) -> Info:
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "output":
            for ax in self._tracked_inputs(node):
                self.table.mark(ax.spaces(), "reaches the model output")
            return None
        if node.op == "call_module":
            return self._visit_module(node, self.modules[node.target])
        if node.op == "call_function":
            rule = ops.function_rule(node.target)
            label = getattr(node.target, "__name__", str(node.target))
        else:
            rule = ops.method_rule(node.target)
            label = f".{node.target}()"
        if rule is None:
            self.unknown_ops.append(label)
            return self._unknown(node, f"unsupported op `{label}`")
        try:
            return getattr(self, f"_rule_{rule}")(node)
        except Exception as exc:  # an odd call signature must not crash tracing: fail closed
            return self._unknown(node, f"could not analyse `{label}` ({type(exc).__name__}: {exc})")

    # ------------------------------------------------------------------ helpers
    def _axis(self, arg) -> Axis | None:
        if isinstance(arg, fx.Node):
            info = self.info.get(arg)
            return info if isinstance(info, Axis) else None
        return None

    def _tracked_inputs(self, node: fx.Node) -> list[Axis]:
        found: list[Axis] = []

        def visit(a):
            info = self.info.get(a)
            if isinstance(info, Axis):
                found.append(info)
            elif isinstance(info, list):
                found.extend(i for i in info if isinstance(i, Axis))
            return a

        fx.node.map_arg((node.args, node.kwargs), visit)
        return found

    def _fail(self, axes, why: str, node: fx.Node) -> None:
        for ax in axes:
            if ax is not None:
                self.table.mark(ax.spaces(), f"{why} at `{node.name}`")

    def _unknown(self, node: fx.Node, why: str) -> None:
        self._fail(self._tracked_inputs(node), why, node)
        return None

    def _where(self, node: fx.Node) -> str:
        return f"`{node.name}`"

    def _tie_module_input(self, name: str, segments: tuple[Segment, ...], node: fx.Node) -> bool:
        """A module called twice must see the same channels both times. True on the first call."""
        if name in self._module_axis:
            self.table.tie_segments(self._module_axis[name], segments, self._where(node))
            return False
        self._module_axis[name] = segments
        return True

    def _whole(self, sid: int) -> tuple[Segment, ...]:
        """All channels of a space, each a block of the producer's unit (head_dim for heads)."""
        unit = self._space_unit.get(sid, 1)
        return (Segment(sid, 0, self.table.spaces[sid].size, unit),)

    def _new_producer(self, name: str, size: int, kind: str, nodes: list[str], cols: int, reason: str | None,
                      weight: str, bias: str | None, module: str | None, weight_dim: int = 0) -> tuple[Segment, ...]:
        """The producer's output channels: one space, or one per part when a pass asked for parts.
        ``weight_dim``: the weight's dim of the outputs (1 for a transposed conv)."""
        use = self.layers.setdefault(name, LayerUse(name, kind, [], cols))
        if use.out_space is None:
            whole = self.units.get(name, 1)
            whole = whole if size % whole == 0 else 1
            cuts = sorted({0, size} | set(self.parts.get(name, ())))
            # a part may ask for its own unit (Phi-3's packed q/k/v under GQA: a channel is two q heads
            # in the q part, one k or v head in the others)
            units = [self.units.get((name, lo), whole) for lo in cuts[:-1]]
            if any(not 0 <= c <= size for c in cuts) or any((hi - lo) % u or lo % whole
                                                             for lo, hi, u in zip(cuts, cuts[1:], units)):
                cuts, units = [0, size], [whole]
            segs = []
            for lo, hi, unit in zip(cuts, cuts[1:], units):
                sid = self.table.new((hi - lo) // unit, "producer", name, reason)
                self._space_unit[sid] = unit
                self._space_start[sid] = lo
                segs.extend(self._whole(sid))
            use.out_space, use.out_segments = segs[0].space, tuple(segs)
            seg = use.out_segments
            self.edits.append(SliceTensor(weight, weight_dim, seg))
            if bias is not None:
                self.edits.append(SliceTensor(bias, 0, seg))
            if module is not None:
                self.edits.append(SetCount(module, "out_channels" if kind == "conv" else "out_features", seg))
        use.nodes.extend(n for n in nodes if n not in use.nodes)
        return use.out_segments

    def _consume(self, name: str, kind: str, ax: Axis | None, node: fx.Node, cols: int, weight: str,
                 module: str | None, conv_groups: int = 1, weight_dim: int = 1) -> None:
        """``weight_dim``: the weight's dim of the inputs (0 for a transposed conv)."""
        use = self.layers.setdefault(name, LayerUse(name, kind, [], cols))
        use.conv_groups = conv_groups
        if ax is None:
            if use.in_segments is not None:
                self.table.mark({s.space for s in use.in_segments}, f"layer `{name}` also reads untracked input")
            return
        if use.in_segments is None:
            use.in_segments = ax.segments
            if conv_groups > 1:
                self.edits += [GroupedInput(weight, conv_groups, ax.segments),
                               Balanced(name, conv_groups, ax.segments)]
            else:
                self.edits.append(SliceTensor(weight, weight_dim, ax.segments))
            if module is not None:
                self.edits.append(SetCount(module, "in_channels" if kind == "conv" else "in_features", ax.segments))
        else:
            self.table.tie_segments(use.in_segments, ax.segments, self._where(node))

    def _passthrough_params(self, node: fx.Node, ax: Axis, attrs: list[str], counts: list[tuple[str, bool]]) -> None:
        """A module with one parameter entry per channel (BatchNorm, LayerNorm, PReLU...)."""
        name = node.target
        if not self._tie_module_input(name, ax.segments, node):
            return
        module = self.modules[name]
        for attr in attrs:
            if getattr(module, attr, None) is not None:
                self.edits.append(SliceTensor(f"{name}.{attr}", 0, ax.segments))
        for attr, as_tuple in counts:
            self.edits.append(SetCount(name, attr, ax.segments, as_tuple))
        for s in ax.spaces():
            self.passthrough[s].add(name)

    def _bind_param(self, param: fx.Node, dim: int, ax: Axis, node: fx.Node) -> None:
        """A channel-wise parameter (layer scale, functional norm weight): slice it with the channels."""
        key = (param.target, dim)
        width = ax.width
        sid = self._param_space.get(key)
        if sid is None:
            sid = self.table.new(width, "param", param.target)
            self._param_space[key] = sid
            self.edits.append(SliceTensor(param.target, dim, (Segment(sid, 0, width),)))
        self._param_binders[param.target].add(node.name)
        self.table.tie_segments(ax.segments, (Segment(sid, 0, width),), self._where(node))
        for s in ax.spaces():
            self.passthrough[s].add(param.target)

    def _check_param_uses(self) -> None:
        """A bound parameter that other ops also read cannot be sliced safely."""
        users: dict[str, set[str]] = defaultdict(set)
        for n in self.gm.graph.nodes:
            if n.op == "get_attr":
                users[n.target].update(u.name for u in n.users)
        for (target, _), sid in self._param_space.items():
            extra = users[target] - self._param_binders[target]
            if extra:
                self.table.mark([sid], f"parameter `{target}` is also used by `{sorted(extra)[0]}` (a weight "
                                       f"shared with another op: give each its own copy to prune this group)")

    # ------------------------------------------------------------------ modules
    def _visit_module(self, node: fx.Node, m: nn.Module) -> Info:
        try:
            return self._module_rule(node, m)
        except Exception as exc:  # fail closed, as for functions
            return self._unknown(node, f"could not analyse `{type(m).__name__}` ({type(exc).__name__}: {exc})")

    def _module_rule(self, node: fx.Node, m: nn.Module) -> Info:
        x = node.args[0] if node.args else None
        ax = self._axis(x)
        shape = _shape(x)
        name = node.target
        if isinstance(m, ops.CONV_MODULES):
            return self._conv_module(node, m, ax)
        if isinstance(m, ops.CONV_TRANSPOSE_MODULES):
            return self._conv_transpose_module(node, m, ax)
        if isinstance(m, nn.Linear):
            return self._linear(node, ax, shape, name, m.out_features, f"{name}.weight",
                                f"{name}.bias" if m.bias is not None else None, module=name)
        if isinstance(m, ops.UNARY_MODULES):
            return ax
        if isinstance(m, nn.Embedding):
            return self._embedding_module(node, m, ax)
        if ax is None:
            if isinstance(m, (ops.BATCHNORM_MODULES, ops.INSTANCENORM_MODULES, nn.LayerNorm, nn.GroupNorm)):
                return None
            return self._unknown(node, f"unsupported module `{type(m).__name__}`")
        if isinstance(m, ops.BATCHNORM_MODULES + ops.INSTANCENORM_MODULES):
            if ax.dim != 1:
                return self._fail([ax], f"{type(m).__name__} on a non-channel dim", node)
            self._passthrough_params(node, ax, ["weight", "bias", "running_mean", "running_var"],
                                     [("num_features", False)])
            return ax
        if isinstance(m, nn.LayerNorm):
            return self._layer_norm(node, ax, shape, tuple(m.normalized_shape), module=m)
        if isinstance(m, nn.GroupNorm):
            return self._group_norm(node, m, ax)
        if isinstance(m, nn.PReLU):
            if m.num_parameters == 1:
                return ax
            if ax.dim != 1:
                return self._fail([ax], "PReLU on a non-channel dim", node)
            self._passthrough_params(node, ax, ["weight"], [("num_parameters", False)])
            return ax
        if type(m) in ops.POOL_MODULES:
            if getattr(m, "return_indices", False):
                return self._unknown(node, f"{type(m).__name__} with return_indices")
            k = ops.POOL_MODULES[type(m)]
            return self._spatial(node, ax, shape, k)
        if isinstance(m, nn.Flatten):
            return self._flatten(node, ax, shape, m.start_dim, m.end_dim)
        if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
            return self._softmax_dim(node, ax, shape, m.dim)
        return self._unknown(node, f"unsupported module `{type(m).__name__}`")

    def _conv_module(self, node: fx.Node, m: nn.Module, ax: Axis | None) -> Info:
        name = node.target
        cols = math.prod(m.kernel_size)
        if ax is not None and ax.dim != 1:
            self._fail([ax], "conv input whose channel axis is not dim 1", node)
            ax = None
        bias = f"{name}.bias" if m.bias is not None else None
        if m.groups == 1:
            self._consume(name, "conv", ax, node, cols, f"{name}.weight", module=name)
            out = self._new_producer(name, m.out_channels, "conv", [node.name], cols, None, f"{name}.weight",
                                     bias, module=name)
            return Axis(1, out)
        if m.groups == m.in_channels and m.out_channels % m.in_channels == 0:
            if ax is None:
                return None
            mult = m.out_channels // m.in_channels
            out = scale_blocks(ax.segments, mult)
            if self._tie_module_input(name, ax.segments, node):
                self.edits += [SliceTensor(f"{name}.weight", 0, out), SetCount(name, "in_channels", ax.segments),
                               SetCount(name, "out_channels", out), SetCount(name, "groups", ax.segments)]
                if bias:
                    self.edits.append(SliceTensor(bias, 0, out))
                for s in ax.spaces():
                    self.passthrough[s].add(name)
            return Axis(1, out)
        return self._grouped_conv(node, m, ax, cols, bias)

    def _conv_transpose_module(self, node: fx.Node, m: nn.Module, ax: Axis | None) -> Info:
        """A transposed conv (a U-Net decoder's upsampling): a consumer of its input channels (weight dim
        0) and the producer of its outputs (weight dim 1). Its statistics are those of the conv it equals
        (calib.unfold); grouped ones and calls with ``output_size`` are not followed."""
        name = node.target
        if m.groups != 1:
            return self._unknown(node, f"grouped `{type(m).__name__}` (groups={m.groups})")
        if len(node.args) > 1 or node.kwargs:
            return self._unknown(node, f"`{type(m).__name__}` called with an output_size")
        if ax is not None and ax.dim != 1:
            self._fail([ax], "transposed conv input whose channel axis is not dim 1", node)
            ax = None
        cols = math.prod(m.kernel_size)
        bias = f"{name}.bias" if m.bias is not None else None
        self._consume(name, "conv", ax, node, cols, f"{name}.weight", module=name, weight_dim=0)
        out = self._new_producer(name, m.out_channels, "conv", [node.name], cols, None, f"{name}.weight", bias,
                                 module=name, weight_dim=1)
        return Axis(1, out)

    def _grouped_conv(self, node: fx.Node, m: nn.Module, ax: Axis | None, cols: int, bias: str | None) -> Info:
        """groups=G: output block g reads only input block g. Pruning keeps the same number of
        channels in every block on both sides (Balanced), so ``groups`` stays G."""
        name, groups = node.target, m.groups
        self._consume(name, "conv", ax, node, cols, f"{name}.weight", module=name, conv_groups=groups)
        first = name not in self.layers or self.layers[name].out_space is None
        out = self._new_producer(name, m.out_channels, "conv", [node.name], cols, None, f"{name}.weight", bias,
                                 module=name)
        if first:
            self.edits.append(Balanced(name, groups, out))
        return Axis(1, out)

    def _linear(self, node, ax, shape, name, out_features, weight, bias, module) -> Info:
        if shape is None:
            return self._unknown(node, "Linear on an input of unknown shape")
        if ax is not None and ax.dim != len(shape) - 1:
            self._fail([ax], f"Linear `{name}` acts on a dim other than the channel dim", node)
            ax = None
        self._consume(name, "linear", ax, node, 1, weight, module=module)
        out = self._new_producer(name, out_features, "linear", [node.name], 1, None, weight, bias, module=module)
        return Axis(len(shape) - 1, out)

    def _layer_norm(self, node, ax, shape, normalized_shape, module=None, weight=None, bias=None) -> Info:
        nd = len(normalized_shape)
        if ax.dim < len(shape) - nd:
            return ax  # normalises other dims: each channel on its own
        if nd != 1:
            self._fail([ax], "LayerNorm over the channel dim and other dims", node)
            return ax
        if module is not None:
            self._passthrough_params(node, ax, ["weight", "bias"], [("normalized_shape", True)])
        else:
            for param in (weight, bias):
                if isinstance(param, fx.Node) and param.op == "get_attr":
                    self._bind_param(param, 0, ax, node)
                elif isinstance(param, fx.Node):
                    self._fail([ax], "layer_norm with a computed weight", node)
            path = (1, 0) if len(node.args) > 1 else ("normalized_shape", 0)
            self.edits.append(ShapeLiteral(node.name, path, ax.segments))
        note = f"LayerNorm `{node.name}` normalises over this channel: pruning shifts the kept channels' statistics"
        for s in ax.spaces():
            self.inexact[s].append(note)
        return ax

    def _group_norm(self, node, m: nn.GroupNorm, ax: Axis) -> Info:
        if ax.dim != 1:
            return self._fail([ax], "GroupNorm on a non-channel dim", node)
        if m.num_groups == m.num_channels:
            self._passthrough_params(node, ax, ["weight", "bias"], [("num_channels", False), ("num_groups", False)])
        elif m.num_groups == 1:
            self._passthrough_params(node, ax, ["weight", "bias"], [("num_channels", False)])
            for s in ax.spaces():
                self.inexact[s].append(f"GroupNorm `{node.name}` (1 group) normalises over this channel")
        else:
            self._fail([ax], f"GroupNorm with {m.num_groups} groups ties channels into groups", node)
        return ax

    # ------------------------------------------------------------------ function rules
    def _rule_meta(self, node):
        """x.size(d), x.size(), x.shape: remember which values carry a channel count."""
        x = node.args[0] if node.args else None
        ax = self._axis(x)
        if ax is None:
            return None
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if name == "size" and len(node.args) > 1:
            if _norm(node.args[1], len(_shape(x))) == ax.dim:
                self._channel_sizes[node] = ax.spaces()
        elif name == "size" or (name == "getattr" and node.args[1] == "shape"):
            self._shape_tuples[node] = (ax.dim, ax.spaces())
        return None

    def _size_tags(self, node) -> set[int]:
        """Spaces whose channel count flows into any argument of ``node``."""
        tags: set[int] = set()

        def visit(a):
            tags.update(self._channel_sizes.get(a, ()))
            return a

        fx.node.map_arg((node.args, node.kwargs), visit)
        return tags

    def _check_shape_args(self, node, allowed_position: int | None, ax: Axis | None,
                          scale: tuple[int, int] | None = None) -> None:
        """A channel count read off one tensor and used to shape another cannot follow pruning.

        With ``scale`` (a reshape's mul, div), a count read off another tensor that sits exactly
        where the reshaped tensor's own channel axis lands (``out.reshape(B, N, C)`` with C the
        residual stream's width, out the attention heads') becomes a literal that follows the
        reshaped tensor's channels."""
        sizes = node.args[1:]
        wrapped = len(sizes) == 1 and isinstance(sizes[0], (tuple, list))
        if wrapped:
            sizes = sizes[0]
        for pos, value in enumerate(sizes):
            tags = self._channel_sizes.get(value, set()) if isinstance(value, fx.Node) else set()
            if not tags:
                continue
            same = ax is not None and pos == allowed_position and tags <= ax.spaces()
            if not same and scale is not None and ax is not None and pos == allowed_position:
                path = (1, pos) if wrapped else (1 + pos,)
                self.edits.append(ShapeLiteral(node.name, path, ax.segments, *scale))
                continue
            if not same:
                self.table.mark(tags | (ax.spaces() if ax is not None else set()),
                                f"a channel count shapes another tensor at `{node.name}`")

    def _rule_unary(self, node):
        ax = self._axis(node.args[0]) if node.args else None
        others = [a for a in self._tracked_inputs(node) if a is not ax]
        if others and node.target not in ("type_as", "to", torch.ops.aten.type_as.default):  # dtype only
            self._fail(others, "used as a secondary argument", node)
        return ax

    def _rule_binary(self, node):
        tags = self._size_tags(node)
        if tags and _shape(node) is None:  # arithmetic on a channel count (C // 2, C * 4)
            self._channel_sizes[node] = tags
            return None
        a = node.args[0] if node.args else node.kwargs.get("input")
        b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        out_shape = _shape(node)
        if out_shape is None:
            return self._unknown(node, "elementwise op with an unknown output shape")
        ndim = len(out_shape)
        ax_a, ax_b = self._axis(a), self._axis(b)
        placed = [(self._to_out_dim(x, ax, ndim), x, ax) for x, ax in ((a, ax_a), (b, ax_b))]
        tracked = [(d, x, ax) for d, x, ax in placed if ax is not None]
        if not tracked:
            return None
        dim = tracked[0][0]
        if any(d != dim for d, _, _ in tracked) or any(ax.width != out_shape[dim] for _, _, ax in tracked):
            return self._fail([t[2] for t in tracked], "elementwise op on mismatched channel dims", node)
        if len(tracked) == 2:
            self._tie_parts(ax_a.segments, ax_b.segments, node)
            return ax_a.at(dim)
        ax = tracked[0][2]
        other = b if ax is ax_a else a
        other_shape = _shape(other)
        if other_shape is None:
            return ax.at(dim)  # a Python scalar
        odim = dim - (ndim - len(other_shape))
        if odim < 0 or other_shape[odim] == 1:
            return ax.at(dim)  # broadcast along the channels
        if isinstance(other, fx.Node) and other.op == "get_attr":
            self._bind_param(other, odim, ax, node)
            return ax.at(dim)
        source = self._param_source(other, odim)
        if source is not None:  # a parameter reshaped on the way (a relative position bias per head)
            param, pdim, chain, literals = source
            self._bind_param(param, pdim, ax, node)
            self._param_binders[param.target].add(chain[-1].name)
            self.edits += [ShapeLiteral(n.name, path, ax.segments) for n, path in literals]
            return ax.at(dim)
        self._fail([ax], "combined elementwise with an untracked tensor of full channel size", node)
        return ax.at(dim)

    def _param_source(self, t, dim: int):
        """Follow an untracked tensor back to the parameter it is a view of, dim by dim: through
        contiguous/clone, unsqueeze, permute, transpose, reshape (that keeps ``dim`` whole) and
        indexing the leading dim with an index tensor (a bias table looked up by relative
        position). Returns (parameter node, its dim, the chain, size literals to rewrite) or None.
        Every node of the chain must have this one user, so slicing the parameter changes nothing else."""
        chain: list[fx.Node] = []
        literals: list[tuple[fx.Node, tuple[int, ...]]] = []
        while isinstance(t, fx.Node):
            if t.op == "get_attr":
                return (t, dim, chain, literals) if chain else None
            if t.op not in ("call_function", "call_method") or len(t.users) != 1 or self.info.get(t) is not None:
                return None
            rule = ops.function_rule(t.target) if t.op == "call_function" else ops.method_rule(t.target)
            x = t.args[0] if t.args else None
            xs, ts = _shape(x), _shape(t)
            if xs is None or ts is None:
                return None
            chain.append(t)
            if rule == "unary" and xs == ts or rule == "binary" and xs == ts and \
                    sum(isinstance(a, fx.Node) for a in (*t.args, *t.kwargs.values())) == 1:
                pass  # elementwise (a copy, clamp, exp: Swin V2's logit scale; 1 + w: Gemma's RMSNorm weight)
            elif rule == "unsqueeze":
                d = _norm(_arg(t, 1, "dim"), len(ts))
                if d == dim:
                    return None
                dim -= 1 if d < dim else 0
            elif rule == "permute":
                dims = t.args[1:] if t.op == "call_method" else [_arg(t, 1, "dims")]
                if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
                    dims = dims[0]
                dim = _norm(dims[dim], len(xs))
            elif rule == "transpose":
                d0, d1 = (_norm(d, len(xs)) for d in (t.args[1], t.args[2]))
                dim = d1 if dim == d0 else d0 if dim == d1 else dim
            elif rule == "view":
                sources = [c for c in range(len(xs)) if _map_reshape(xs, ts, c) == (dim, 1, 1)]
                if len(sources) != 1:
                    return None
                sizes = t.args[1:]
                wrapped = len(sizes) == 1 and isinstance(sizes[0], (tuple, list))
                sizes = sizes[0] if wrapped else sizes
                if dim >= len(sizes) or isinstance(sizes[dim], fx.Node):
                    return None
                if sizes[dim] != -1:
                    literals.append((t, (1, dim) if wrapped else (1 + dim,)))
                dim = sources[0]
            elif (rule == "getitem" and _is_index_tensor(t.args[1]) or _is_aten_index(t)) \
                    and dim >= len(ts) - len(xs) + 1:
                dim -= len(ts) - len(xs)  # x[index]: the index's dims replace x's first dim
            else:
                return None
            t = x
        return None

    def _to_out_dim(self, x, ax: Axis | None, out_ndim: int) -> int | None:
        shape = _shape(x)
        if ax is None or shape is None:
            return None
        return ax.dim + out_ndim - len(shape)

    def _tensor_list(self, node) -> list | None:
        tensors = _arg(node, 0, "tensors")
        return list(tensors) if isinstance(tensors, (list, tuple)) else None

    def _rule_cat(self, node):
        tensors = self._tensor_list(node)
        if tensors is None:
            return self._unknown(node, "cat of a computed list of tensors")
        out_shape = _shape(node)
        dim = _norm(_arg(node, 1, "dim", 0), len(out_shape))
        axes = [self._axis(t) for t in tensors]
        tracked = [a for a in axes if a is not None]
        if not tracked:
            return None
        if any(a.dim != tracked[0].dim for a in tracked):
            return self._fail(tracked, "cat of tensors with different channel dims", node)
        cdim = tracked[0].dim
        if dim == cdim:
            segs: list[Segment] = []
            for t, a in zip(tensors, axes):
                if a is not None:
                    segs.extend(a.segments)
                else:
                    width = _shape(t)[dim]
                    sid = self.table.new(width, "untracked", f"{node.name}[untracked input]",
                                         f"untracked tensor concatenated at `{node.name}`")
                    segs.append(Segment(sid, 0, width))
            return Axis(dim, tuple(segs))
        return self._tie_all(node, tensors, axes, cdim)

    def _tie_all(self, node, tensors, axes, cdim: int) -> Info:
        first = next(a for a in axes if a is not None)
        for t, a in zip(tensors, axes):
            if a is first:
                continue
            if a is not None:
                self.table.tie_segments(first.segments, a.segments, self._where(node))
            elif isinstance(t, fx.Node) and t.op == "get_attr":
                self._bind_param(t, cdim, first, node)
            elif self._expanded_param(t) is not None:
                self._bind_expanded(t, cdim, first, node)
            else:
                self._fail([first], "joined with an untracked tensor", node)
        return first

    def _bind_expanded(self, t: fx.Node, cdim: int, first: Axis, node: fx.Node) -> None:
        """A class token ``param.expand(B, -1, -1)`` joined to the stream: slice the parameter."""
        param, expand = self._expanded_param(t)
        pdim = cdim - (len(_shape(expand)) - len(_shape(param)))
        if pdim < 0 or _shape(param)[pdim] != first.width:
            return self._fail([first], "joined with a broadcast parameter", node)
        self._bind_param(param, pdim, first, node)
        self._param_binders[param.target].add(expand.name)
        self._record_size_literal(expand, cdim, first.segments, 1, 1)

    def _rule_stack(self, node):
        tensors = self._tensor_list(node)
        if tensors is None:
            return self._unknown(node, "stack of a computed list of tensors")
        out_shape = _shape(node)
        dim = _norm(_arg(node, 1, "dim", 0), len(out_shape))
        axes = [self._axis(t) for t in tensors]
        tracked = [a for a in axes if a is not None]
        if not tracked:
            return None
        if any(a.dim != tracked[0].dim for a in tracked):
            return self._fail(tracked, "stack of tensors with different channel dims", node)
        first = self._tie_all(node, tensors, axes, tracked[0].dim)
        return first.at(first.dim + (1 if dim <= first.dim else 0))

    def _split_like(self, node, dim_arg_index: int, rewrite: bool) -> Info:
        x = node.args[0]
        ax, shape = self._axis(x), _shape(x)
        metas = node.meta.get("tensor_meta")
        if ax is None:
            return None
        if not isinstance(metas, (tuple, list)) or shape is None:
            return self._unknown(node, "split with unknown piece shapes")
        dim = _norm(_arg(node, dim_arg_index, "dim", 0), len(shape))
        if dim != ax.dim:
            return [ax for _ in metas]
        ranges, pos = [], 0
        for meta in metas:
            ranges.append((pos, pos + meta.shape[dim]))
            pos += meta.shape[dim]
        pieces = [slice_segments(ax.segments, lo, hi) for lo, hi in ranges]
        if any(p is None for p in pieces):
            self._fail([ax], "split cuts through a channel block", node)
            return [None for _ in metas]
        if rewrite:
            self.edits.append(SplitSizes(node.name, ax.segments, tuple(ranges), dim))
        return [Axis(dim, p) for p in pieces]

    def _rule_split(self, node):
        return self._split_like(node, 2, rewrite=True)

    def _rule_chunk(self, node):
        return self._split_like(node, 2, rewrite=True)

    def _rule_getitem(self, node):
        base, index = node.args[0], node.args[1]
        if base in self._shape_tuples:
            dim, spaces = self._shape_tuples[base]
            rank = len(_shape(base.args[0]))
            if isinstance(index, int) and _norm(index, rank) == dim:
                self._channel_sizes[node] = spaces
            elif isinstance(index, slice) and dim not in range(rank)[index]:
                pass  # the other dims only (``x.shape[-2:]``, an FPN's upsampling size): no channel count in it
            elif not isinstance(index, int):
                self.table.mark(spaces, f"a shape containing the channel count is sliced at `{node.name}`")
            return None
        info = self.info.get(base) if isinstance(base, fx.Node) else None
        if isinstance(info, list):
            return info[index] if isinstance(index, int) else self._unknown(node, "non-integer index into a tuple")
        if not isinstance(info, Axis):
            return None
        shape = _shape(base)
        return self._tensor_index(node, info, shape, index)

    def _tensor_index(self, node, ax: Axis, shape, index) -> Info:
        items = list(index) if isinstance(index, tuple) else [index]
        if any(isinstance(i, fx.Node) or isinstance(i, (list, torch.Tensor)) for i in items):
            return self._fail([ax], "advanced indexing", node)
        consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
        expanded: list[tuple[int, object]] = []
        for pos, item in enumerate(items):
            if item is Ellipsis:
                expanded.extend((-2, slice(None)) for _ in range(len(shape) - consumed))
            else:
                expanded.append((pos, item))
        in_d = out_d = 0
        result: Axis | None = None
        for pos, item in expanded:
            if item is None:
                out_d += 1
                continue
            if in_d == ax.dim:
                if isinstance(item, int):
                    return self._fail([ax], "integer index into the channel axis", node)
                begin, end, step = item.indices(ax.width)
                if step != 1:
                    return self._fail([ax], "strided slice of the channel axis", node)
                if (begin, end) == (0, ax.width):
                    result = ax.at(out_d)
                else:
                    segs = slice_segments(ax.segments, begin, end)
                    if segs is None:
                        return self._fail([ax], "slice cuts through a channel block", node)
                    where = pos if isinstance(index, tuple) else -1
                    if where == -2:
                        return self._fail([ax], "slice of the channel axis via Ellipsis", node)
                    self.edits.append(SliceBounds(node.name, where, ax.segments, begin, end))
                    result = Axis(out_d, segs)
            if not isinstance(item, int):
                out_d += 1
            in_d += 1
        if result is None:  # the channel dim lies past the index: untouched
            result = ax.at(out_d + (ax.dim - in_d))
        return result

    def _rule_flatten(self, node):
        x = node.args[0]
        return self._flatten(node, self._axis(x), _shape(x), _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))

    def _flatten(self, node, ax, shape, start, end) -> Info:
        if ax is None:
            return None
        start, end = _norm(start, len(shape)), _norm(end, len(shape))
        if ax.dim < start:
            return ax
        if ax.dim > end:
            return ax.at(ax.dim - (end - start))
        if ax.dim != start:
            return self._fail([ax], "flatten merges dims before the channel dim into it", node)
        return Axis(start, scale_blocks(ax.segments, math.prod(shape[ax.dim + 1: end + 1])))

    def _rule_view(self, node):
        x = node.args[0]
        ax, shape, out = self._axis(x), _shape(x), _shape(node)
        if ax is None:
            self._check_shape_args(node, None, None)
            return None
        mapped = _map_reshape(shape, out, ax.dim)
        if mapped is None:
            return self._fail([ax], "reshape splits or interleaves the channel axis", node)
        j, mul, div = mapped
        self._check_shape_args(node, j, ax, (mul, div))
        segs = scale_blocks(ax.segments, mul, div)
        if segs is None:
            self._request_units(ax, div)  # a head split: the next pass makes each head one channel
            return self._fail([ax], "reshape cuts through a channel block", node)
        self._record_size_literal(node, j, ax.segments, mul, div)
        return Axis(j, segs)

    def _record_size_literal(self, node, j: int, segments, mul: int, div: int) -> None:
        """view(..., 512*7*7) / expand(..., C): the literal size must follow the channel count."""
        if node.op == "call_function":
            path = (1, j)
            sizes = node.args[1] if len(node.args) > 1 else node.kwargs.get("shape")
        elif len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
            path, sizes = (1, j), node.args[1]
        else:
            path, sizes = (1 + j,), node.args[1:]
        if sizes is None or j >= len(sizes):
            return
        literal = sizes[j]
        if isinstance(literal, int) and literal != -1:
            self.edits.append(ShapeLiteral(node.name, path, segments, mul, div))

    def _rule_expand(self, node):
        x = node.args[0]
        ax, shape, out = self._axis(x), _shape(x), _shape(node)
        if ax is None:
            self._check_shape_args(node, None, None)
            return None
        j = ax.dim + len(out) - len(shape)
        self._check_shape_args(node, j, ax)
        self._record_size_literal(node, j, ax.segments, 1, 1)
        return ax.at(j)

    def _rule_permute(self, node):
        x = node.args[0]
        ax, shape = self._axis(x), _shape(x)
        if ax is None:
            return None
        dims = node.args[1:] if node.op == "call_method" else [_arg(node, 1, "dims")]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        dims = [_norm(d, len(shape)) for d in dims]
        return ax.at(dims.index(ax.dim))

    def _rule_transpose(self, node):
        x = node.args[0]
        ax, shape = self._axis(x), _shape(x)
        if ax is None:
            return None
        d0, d1 = (_norm(d, len(shape)) for d in (node.args[1], node.args[2]))
        return ax.at(d1 if ax.dim == d0 else d0 if ax.dim == d1 else ax.dim)

    def _rule_unsqueeze(self, node):
        x = node.args[0]
        ax = self._axis(x)
        if ax is None:
            return None
        d = _norm(_arg(node, 1, "dim"), len(_shape(node)))
        return ax.at(ax.dim + (1 if d <= ax.dim else 0))

    def _rule_squeeze(self, node):
        x = node.args[0]
        ax, shape = self._axis(x), _shape(x)
        if ax is None:
            return None
        dim = _arg(node, 1, "dim", None)
        candidates = range(len(shape)) if dim is None else [dim] if isinstance(dim, int) else dim
        removed = {_norm(d, len(shape)) for d in candidates if shape[_norm(d, len(shape))] == 1}
        if ax.dim in removed:
            return self._fail([ax], "squeeze removes the channel dim", node)
        return ax.at(ax.dim - sum(1 for d in removed if d < ax.dim))

    def _rule_reduce(self, node):
        return self._reduced(node, _arg(node, 1, "dim", None), bool(_arg(node, 2, "keepdim", False)), "reduction")

    def _rule_vector_norm(self, node):
        """``linalg_vector_norm(x, ord, dims, keepdim)`` (F.normalize in an ATen graph): a reduction."""
        return self._reduced(node, _arg(node, 2, "dim", None), bool(_arg(node, 3, "keepdim", False)), "norm")

    def _reduced(self, node, dim, keepdim: bool, what: str) -> Info:
        """Channels pass a reduction over other dims (moving down past the dims it removes)."""
        x = node.args[0]
        ax, shape = self._axis(x), _shape(x)
        if ax is None:
            return None
        if dim is None or dim == () or dim == []:
            return self._fail([ax], f"{what} over every dim", node)
        dims = {_norm(d, len(shape)) for d in ([dim] if isinstance(dim, int) else dim)}
        if ax.dim in dims and keepdim and dims == {ax.dim} and self._normalises(node):
            note = (f"`{node.name}` normalises over this channel (RMSNorm): pruning shifts the kept channels' "
                    f"statistics")
            for space in ax.spaces():
                self.inexact[space].append(note)
            return None  # one value per position, broadcast back over the channels
        if ax.dim in dims:
            return self._fail([ax], f"{what} over the channel dim", node)
        return ax if keepdim else ax.at(ax.dim - sum(1 for d in dims if d < ax.dim))

    def _normalises(self, reduction: fx.Node) -> bool:
        """A mean over the channels that only rescales the tensor it was taken of, as RMSNorm does:
        ``x * rsqrt(mean(x ** 2, -1, keepdim=True) + eps)``. The mean's input and the rescaled tensor
        come from one tensor through elementwise ops, and the mean reaches the rescaling through
        elementwise ops alone."""
        if reduction.target not in (torch.mean, torch.ops.aten.mean.dim, "mean"):
            return False
        source = self._elementwise_source(reduction.args[0])
        node = reduction
        for _ in range(8):
            if len(node.users) != 1:
                return False
            (user,) = node.users
            operands = [a for a in user.args if isinstance(a, fx.Node)]
            rule = ops.function_rule(user.target) if user.op == "call_function" else ops.method_rule(user.target)
            if rule not in ("unary", "binary"):
                return False
            if len(operands) == 2:
                other = operands[0] if operands[1] is node else operands[1]
                return user.target in _RESCALES and self._elementwise_source(other) is source
            node = user
        return False

    def _elementwise_source(self, t: fx.Node) -> fx.Node:
        """The tensor ``t`` is computed from by single-input elementwise ops (casts, powers, scalars)."""
        while isinstance(t, fx.Node) and t.op in ("call_function", "call_method"):
            rule = ops.function_rule(t.target) if t.op == "call_function" else ops.method_rule(t.target)
            inputs = [a for a in t.args if isinstance(a, fx.Node)]
            if rule not in ("unary", "binary") or len(inputs) != 1 or _shape(inputs[0]) != _shape(t):
                break
            t = inputs[0]
        return t

    def _rule_spatial(self, node):
        x = node.args[0] if node.args else node.kwargs.get("input")
        return self._spatial(node, self._axis(x), _shape(x), -1)

    def _spatial(self, node, ax, shape, k: int) -> Info:
        """Pooling/upsampling act on the last k dims (all but batch and channel when k < 0)."""
        if ax is None:
            return None
        k = len(shape) - 2 if k < 0 else k
        if ax.dim >= len(shape) - k:
            return self._fail([ax], "pooling over the channel dim", node)
        return ax

    def _rule_pad(self, node):
        shape = _shape(node.args[0])
        pad = _arg(node, 1, "pad")
        return self._moves_positions(node, lambda: {len(shape) - 1 - i // 2 for i, p in enumerate(pad) if p}, "padding")

    def _rule_roll(self, node):
        """A cyclic shift along other dims (Swin's shifted windows) moves positions, not channels."""
        shape = _shape(node.args[0])
        dims = _arg(node, 2, "dims", ())
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not dims:  # the flattened tensor rolls: channels move
            dims = range(len(shape or ()))
        return self._moves_positions(node, lambda: {_norm(d, len(shape)) for d in dims}, "roll")

    def _moves_positions(self, node, moved_dims, what: str) -> Info:
        """Channels pass an op that only moves positions along ``moved_dims()``, unless it moves them."""
        ax = self._axis(node.args[0])
        if ax is None:
            return None
        if ax.dim in moved_dims():
            return self._fail([ax], f"{what} along the channel dim", node)
        return ax

    def _rule_aten_index(self, node):
        """``aten.index.Tensor(x, [index])``: rows of the leading dim gathered (a bias table computed by
        an MLP, looked up by relative position); channels on another dim pass through."""
        x = node.args[0]
        ax, shape, out = self._axis(x), _shape(x), _shape(node)
        if ax is None:
            return None
        if not _is_aten_index(node) or out is None:
            return self._fail([ax], "indexing with several or boolean index tensors", node)
        if ax.dim == 0:
            return self._fail([ax], "indexing the channel dim", node)
        return ax.at(ax.dim + len(out) - len(shape))

    def _rule_fresh(self, node):
        """A new tensor that takes only dtype and device from its input (``x.new_zeros(size)``):
        untracked, unless its literal size names the input's channel count, which pruning changes."""
        ax = self._axis(node.args[0]) if node.args else None
        sizes = _arg(node, 1, "size", ())
        sizes = [sizes] if isinstance(sizes, int) else list(sizes or ())
        if ax is not None and ax.width in sizes:
            return self._fail([ax], "a new tensor sized like the channels", node)
        self._check_shape_args(node, None, None)
        return None

    def _rule_softmax(self, node):
        x = node.args[0]
        return self._softmax_dim(node, self._axis(x), _shape(x), _arg(node, 1, "dim"))

    def _softmax_dim(self, node, ax, shape, dim) -> Info:
        if ax is None:
            return None
        if dim is None or _norm(dim, len(shape)) == ax.dim:
            self._fail([ax], "softmax across channels", node)
        return ax

    def _rule_layer_norm(self, node):
        x = node.args[0]
        ax, shape = self._axis(x), _shape(x)
        if ax is None:
            return None
        ns = _arg(node, 1, "normalized_shape")
        ns = (ns,) if isinstance(ns, int) else tuple(ns)
        return self._layer_norm(node, ax, shape, ns, weight=_arg(node, 2, "weight"), bias=_arg(node, 3, "bias"))

    def _rule_batch_norm(self, node):
        x = node.args[0]
        ax = self._axis(x)
        if ax is None:
            return None
        if ax.dim != 1:
            return self._fail([ax], "batch_norm on a non-channel dim", node)
        for index, name in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
            param = _arg(node, index, name)
            if isinstance(param, fx.Node) and param.op == "get_attr":
                self._bind_param(param, 0, ax, node)
            elif isinstance(param, fx.Node):
                self._fail([ax], "batch_norm with computed statistics", node)
        return ax

    def _functional_weights(self, node) -> tuple[str, str | None] | None:
        w, b = _arg(node, 1, "weight"), _arg(node, 2, "bias")
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            return None
        if isinstance(b, fx.Node) and b.op != "get_attr":
            return None
        return w.target, (b.target if isinstance(b, fx.Node) else None)

    def _rule_conv(self, node):
        x = node.args[0]
        ax = self._axis(x)
        refs = self._functional_weights(node)
        groups = _arg(node, 6, "groups", 1)
        if refs is None or groups != 1:
            return self._unknown(node, "functional conv with computed weights or groups > 1")
        weight, bias = refs
        w = _shape(_arg(node, 1, "weight"))
        if ax is not None and ax.dim != 1:
            self._fail([ax], "conv input whose channel axis is not dim 1", node)
            ax = None
        cols = math.prod(w[2:])
        self._consume(weight, "conv", ax, node, cols, weight, module=None)
        out = self._new_producer(weight, w[0], "conv", [node.name], cols, None, weight, bias, module=None)
        return Axis(1, out)

    def _rule_linear(self, node):
        x = node.args[0]
        refs = self._functional_weights(node)
        if refs is None:
            return self._unknown(node, "functional linear with computed weights")
        weight, bias = refs
        w = _shape(_arg(node, 1, "weight"))
        if self._reads_with_a_table(node, x, weight, w):
            return None
        return self._linear(node, self._axis(x), _shape(x), weight, w[0], weight, bias, module=None)

    def _reads_with_a_table(self, node, x, weight: str, w: tuple[int, ...] | None) -> bool:
        """A layer whose weight is an embedding table (tied embeddings: a language model's head reads
        the stream with the table that wrote it). Its input channels are the table's columns, which
        the table's slice already cuts: it is bound to the table like a channel-wise parameter, not a
        consumer (a re-solved weight would rewrite the table). Its output (the vocabulary) is untracked."""
        sid = self._param_space.get((weight, 1))
        ax, shape = self._axis(x), _shape(x)
        if sid is None or ax is None or shape is None or ax.dim != len(shape) - 1 or w is None:
            return False
        if ax.width != self.table.spaces[sid].size or w[1] != ax.width:
            return False
        self._bind_param(_arg(node, 1, "weight"), 1, ax, node)
        return True

    # ------------------------------------------------------------------ attention heads
    def _request_units(self, ax: Axis, div: int) -> None:
        """Ask the next pass to make each producer channel a block that ``div`` divides (a head)."""
        for seg in ax.segments:
            space = self.table.spaces[seg.space]
            use = self.layers.get(space.owner)
            if space.kind != "producer" or use is None or seg.space not in {s.space for s in use.out_segments or ()}:
                continue
            unit = self._space_unit.get(seg.space, 1)
            new = unit * _gcd_factor(seg.block, div)
            if new != unit and (space.size * unit) % new == 0:
                # a producer already cut into parts coarsens only the part asked for
                key = (space.owner, self._space_start[seg.space]) if self.parts.get(space.owner) else space.owner
                old = self.unit_requests.get(key, self.units.get(key, 1))
                self.unit_requests[key] = old * new // math.gcd(old, new)

    def _tie_heads(self, a: tuple[Segment, ...], b: tuple[Segment, ...], node: fx.Node) -> None:
        """Tie two head axes. Heads of one producer space tied to other heads of the same space (q
        to k of a packed q/k/v projection) ask the next pass to cut the producer into parts there."""
        self.head_spaces.update(s.space for s in (*a, *b))
        self._tie_parts(a, b, node)

    def _tie_parts(self, a: tuple[Segment, ...], b: tuple[Segment, ...], node: fx.Node) -> None:
        """Tie two axes; where they put one producer's channels against other channels of the same
        producer (q against k of a packed q/k/v; gate against up of a packed gate_up MLP projection,
        chunked and multiplied), ask the next pass to cut the producer into parts there."""
        for pa, pb in aligned_pieces(a, b) or ():
            if pa.space != pb.space or pa.start == pb.start:
                continue
            space = self.table.spaces[pa.space]
            use = self.layers.get(space.owner)
            if space.kind != "producer" or use is None or pa.space not in {s.space for s in use.out_segments or ()}:
                continue
            unit, base = self._space_unit.get(pa.space, 1), self._space_start.get(pa.space, 0)
            cuts = {base + p.start * unit for p in (pa, pb)} | {base + (p.start + p.length) * unit for p in (pa, pb)}
            self.part_requests[space.owner] = frozenset(
                self.part_requests.get(space.owner, self.parts.get(space.owner, frozenset())) | cuts)
        self.table.tie_segments(a, b, self._where(node))

    def _tie_coarsening(self, a: Axis, b: Axis, node: fx.Node) -> None:
        """Tie two head axes position by position. Where one side's channels are blocks of the
        other's (a k/v head repeated for its q heads), the finer producer is asked for the coarser unit."""
        if aligned_pieces(a.segments, b.segments) is None:
            blocks_a, blocks_b = {s.block for s in a.segments}, {s.block for s in b.segments}
            if len(blocks_a) == len(blocks_b) == 1:
                x, y = blocks_a.pop(), blocks_b.pop()
                if x != y and max(x, y) % min(x, y) == 0:
                    self._request_units(a if x < y else b, max(x, y))
        self._tie_heads(a.segments, b.segments, node)

    def _rule_sdpa(self, node):
        """scaled_dot_product_attention(q, k, v): (..., heads, L, E). Head h of the output is
        computed from head h of q and its k/v head: the head dims are tied (with grouped-query
        attention, one k/v head with its block of q heads)."""
        tensors = [_arg(node, i, n) for i, n in enumerate(("query", "key", "value"))]
        axes = [self._axis(t) for t in tensors]
        tracked = [a for a in axes if a is not None]
        if not tracked:
            return None
        shapes = [_shape(t) for t in tensors]
        if any(a is None or a.dim != len(sh) - 3 for a, sh in zip(axes, shapes)):
            return self._fail(tracked, "attention whose q, k and v are not all tracked on the head dim", node)
        mask = _arg(node, 3, "attn_mask")
        mshape = _shape(mask)
        if self._axis(mask) is not None or (mshape is not None and len(mshape) >= 3 and mshape[-3] != 1):
            return self._fail(tracked, "attention mask with a head dim", node)
        q, k, v = axes
        self._tie_heads(k.segments, v.segments, node)
        ratio = shapes[0][-3] // shapes[1][-3]
        if ratio > 1:
            blocked = scale_blocks(q.segments, 1, ratio)
            if blocked is None:
                self._request_units(q, ratio)
                return self._fail(tracked, "grouped-query heads not yet one block per k/v head", node)
            q = Axis(q.dim, blocked)
        # k/v repeated to q's head count beforehand (Llama's repeat_kv: expand + reshape) arrive as
        # blocks of several positions per k/v head: q's heads are coarsened to match
        self._tie_coarsening(q, k, node)
        return axes[0]

    def _rule_matmul(self, node):
        """Batched matmul: a channel axis on a batch dim (attention heads) passes through and ties
        both operands; on a contracted dim it fails closed."""
        a, b = node.args[0], node.args[1]
        axa, axb = self._axis(a), self._axis(b)
        sa, sb, out = _shape(a), _shape(b), _shape(node)
        tracked = [x for x in (axa, axb) if x is not None]
        if not tracked:
            return None
        if out is None or len(sa) < 2 or len(sb) < 2:
            return self._fail(tracked, "matmul with a vector operand", node)
        nd = len(out)
        pa = _matmul_place(axa, len(sa), nd, rows=True) if axa else None
        pb = _matmul_place(axb, len(sb), nd, rows=False) if axb else None
        if "contract" in (pa, pb):
            return self._fail(tracked, "matmul contracts the channel axis", node)
        if axa is not None and axb is not None:
            if pa != pb or pa >= nd - 2:
                return self._fail(tracked, "matmul of two channel axes on different dims", node)
            self._tie_coarsening(axa, axb, node)
            return axa.at(pa)
        ax, p = (axa, pa) if axa is not None else (axb, pb)
        other, oshape = (b, sb) if axa is not None else (a, sa)
        if p < nd - 2:
            od = p - (nd - len(oshape))
            if od >= 0 and od < len(oshape) - 2 and oshape[od] != 1:
                return self._fail([ax], "matmul with an untracked operand along the channel axis", node)
        return ax.at(p)

    def _rule_einsum(self, node):
        """einsum("bhid,bhjd->bhij", q, k): a channel axis on a letter that every operand holding
        it shares and the output keeps (a batch letter: attention heads) passes through and ties the
        operands; a summed letter, or an untracked operand along it, fails closed."""
        equation, operands = node.args[0], list(node.args[1:])
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = list(operands[0])
        axes = [self._axis(t) for t in operands]
        tracked = [a for a in axes if a is not None]
        if not tracked:
            return None
        if not isinstance(equation, str) or "." in equation:
            return self._fail(tracked, "einsum with a computed equation or an ellipsis", node)
        equation = equation.replace(" ", "")
        ins, arrow, out = equation.partition("->")
        subs = ins.split(",")
        if not arrow:  # implicit output: the letters used once, in alphabetical order
            out = "".join(sorted(c for c in set(ins) if c.isalpha() and ins.count(c) == 1))
        shapes = [_shape(t) for t in operands]
        if len(subs) != len(operands) or any(sh is not None and len(sh) != len(sub) for sh, sub in zip(shapes, subs)):
            return self._fail(tracked, "einsum whose operands do not match its equation", node)
        letters = {sub[a.dim] for sub, a in zip(subs, axes) if a is not None}
        if len(letters) != 1:
            return self._fail(tracked, "einsum of channel axes on different letters", node)
        letter = letters.pop()
        if letter not in out or any(sub.count(letter) > 1 for sub in subs) or out.count(letter) > 1:
            return self._fail(tracked, "einsum sums or repeats the channel axis", node)
        for sub, a, t, sh in zip(subs, axes, operands, shapes):
            if a is None and letter in sub and (sh is None or sh[sub.index(letter)] != 1):
                return self._fail(tracked, "einsum with an untracked operand along the channel axis", node)
        first = tracked[0]
        for other in tracked[1:]:
            self._tie_coarsening(first, other, node)
        return first.at(out.index(letter))

    def _rule_repeat_interleave(self, node):
        x = node.args[0]
        ax, shape = self._axis(x), _shape(x)
        if ax is None:
            return None
        repeats, dim = _arg(node, 1, "repeats"), _arg(node, 2, "dim")
        if not isinstance(repeats, int) or dim is None:
            return self._fail([ax], "repeat_interleave with computed repeats or no dim", node)
        if _norm(dim, len(shape)) != ax.dim:
            return ax
        return Axis(ax.dim, scale_blocks(ax.segments, repeats))

    # ------------------------------------------------------------------ embeddings and tokens
    def _param_producer(self, param: fx.Node, dim: int, width: int, node: fx.Node, out_dim: int) -> Axis:
        """A parameter whose slices along ``dim`` are the channels (an embedding table's columns)."""
        key = (param.target, dim)
        sid = self._param_space.get(key)
        if sid is None:
            sid = self.table.new(width, "param", param.target)
            self._param_space[key] = sid
            self.edits.append(SliceTensor(param.target, dim, (Segment(sid, 0, width),)))
        self._param_binders[param.target].add(node.name)
        self.passthrough[sid].add(param.target)
        return Axis(out_dim, (Segment(sid, 0, width),))

    def _rule_embedding(self, node):
        weight = _arg(node, 1, "weight") if node.target is torch.nn.functional.embedding else node.args[0]
        indices = node.args[0] if node.target is torch.nn.functional.embedding else node.args[1]
        if self._axis(indices) is not None:
            return self._unknown(node, "embedding indexed by a tracked tensor")
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            return self._unknown(node, "embedding with a computed table")
        out = _shape(node)
        return self._param_producer(weight, 1, out[-1], node, len(out) - 1)

    def _embedding_module(self, node, m: nn.Embedding, ax) -> Info:
        if ax is not None:
            return self._unknown(node, "embedding indexed by a tracked tensor")
        name = node.target
        sid = self._module_space.get(name)
        if sid is None:
            sid = self.table.new(m.embedding_dim, "param", f"{name}.weight")
            self._module_space[name] = sid
            self._param_space[(f"{name}.weight", 1)] = sid  # a layer reading with the table binds to it
            seg = (Segment(sid, 0, m.embedding_dim),)
            self.edits += [SliceTensor(f"{name}.weight", 1, seg), SetCount(name, "embedding_dim", seg)]
            self.passthrough[sid].add(name)
        return Axis(len(_shape(node)) - 1, (Segment(sid, 0, m.embedding_dim),))

    def _expanded_param(self, t) -> tuple[fx.Node, fx.Node] | None:
        """(parameter, expand node) for ``param.expand(...)`` (a class token broadcast over the batch)."""
        if not isinstance(t, fx.Node) or ops.function_rule(t.target) != "expand" and t.target != "expand":
            return None
        source = t.args[0]
        if isinstance(source, fx.Node) and source.op == "get_attr":
            return source, t
        return None

    # ------------------------------------------------------------------ ATen-only forms
    def _rule_aten_slice(self, node):
        x = node.args[0]
        ax, shape = self._axis(x), _shape(x)
        if ax is None:
            return None
        dim = _norm(_arg(node, 1, "dim", 0), len(shape))
        if dim != ax.dim:
            return ax
        begin, end, step = slice(_arg(node, 2, "start"), _arg(node, 3, "end"), _arg(node, 4, "step", 1)).indices(ax.width)
        if step != 1:
            return self._fail([ax], "strided slice of the channel axis", node)
        if (begin, end) == (0, ax.width):
            return ax
        segs = slice_segments(ax.segments, begin, end)
        if segs is None:
            return self._fail([ax], "slice cuts through a channel block", node)
        self.edits.append(SliceBounds(node.name, ATEN_SLICE, ax.segments, begin, end))
        return Axis(dim, segs)

    def _rule_aten_select(self, node):
        x = node.args[0]
        ax, shape = self._axis(x), _shape(x)
        if ax is None:
            return None
        dim = _norm(_arg(node, 1, "dim"), len(shape))
        if dim == ax.dim:
            return self._fail([ax], "integer index into the channel axis", node)
        return ax.at(ax.dim - (1 if dim < ax.dim else 0))

    def _rule_sym_size(self, node):
        x = node.args[0]
        ax, shape = self._axis(x), _shape(x)
        if ax is not None and _norm(node.args[1], len(shape)) == ax.dim:
            self._channel_sizes[node] = ax.spaces()
        return None


def _map_reshape(shape, out, dim: int) -> tuple[int, int, int] | None:
    """Where the channel dim of ``shape`` lands in ``out``, and how its blocks scale (mul, div).

    The leading dims before the channel dim must keep their product, and the channel dim may
    absorb whole trailing dims (flatten: mul) or shed whole trailing dims (unflatten: div).
    """
    lead = math.prod(shape[:dim])
    width = shape[dim]
    for j in range(len(out)):
        if math.prod(out[:j]) != lead:
            continue
        if out[j] == 1 and width != 1:
            continue
        if out[j] % width == 0:
            mul = out[j] // width
            trail, m = 1, dim + 1
            while trail < mul and m < len(shape):
                trail *= shape[m]
                m += 1
            if trail == mul:
                return j, mul, 1
        elif width % out[j] == 0:
            div = width // out[j]
            trail, m = 1, j + 1
            while trail < div and m < len(out):
                trail *= out[m]
                m += 1
            if trail == div:
                return j, 1, div
        return None
    return None


# what rescales a tensor by a per-position statistic (x * rsqrt(ms + eps), x / norm)
_RESCALES = (torch.mul, torch.div, operator.mul, operator.truediv, "mul", "div", torch.ops.aten.mul.Tensor,
             torch.ops.aten.div.Tensor)

def _is_aten_index(t: fx.Node) -> bool:
    """``aten.index.Tensor(x, [index])``: torch.export's form of ``x[index]`` on the leading dim."""
    if t.op != "call_function" or t.target is not torch.ops.aten.index.Tensor or len(t.args) < 2:
        return False
    indices = t.args[1]
    return isinstance(indices, (list, tuple)) and len(indices) == 1 and _is_index_tensor(indices[0])


def _is_index_tensor(index) -> bool:
    """An integer tensor (not a mask, not a tuple of indices) indexing the leading dim."""
    meta = index.meta.get("tensor_meta") if isinstance(index, fx.Node) else None
    return getattr(meta, "dtype", None) in (torch.int64, torch.int32)


def _gcd_factor(block: int, div: int) -> int:
    """The smallest k with (block * k) % div == 0."""
    return div // math.gcd(block, div)


def _matmul_place(ax: Axis, ndim: int, out_ndim: int, rows: bool) -> int | str:
    """Where an operand's channel dim lands in a matmul's output ("contract" when it is summed)."""
    if ax.dim == ndim - (1 if rows else 2):
        return "contract"
    if ax.dim >= ndim - 2:
        return out_ndim - 2 if rows else out_ndim - 1
    return ax.dim + out_ndim - ndim
