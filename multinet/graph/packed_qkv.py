"""An fx pass: a packed q/k/v projection split by indexing becomes a split of its features.

Swin (torchvision's ``shifted_window_attention``) and timm-style ViTs cut a packed ``qkv`` Linear
output into q, k and v after reshaping it to heads::

    qkv.reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)  ->  qkv[0], qkv[1], qkv[2]   (or .unbind(0))

The reshape puts "which of q, k, v" and "which head" on two dims of one channel axis, which the
channel analysis (one channel dim per tensor) cannot follow, so the heads used to be unprunable.
The same values come from splitting the features first and reshaping each third to heads::

    split(qkv, C, -1)[i].reshape(B, N, H, hd).permute(0, 2, 1, 3)

which the analysis reads like any packed projection chunked in user code. The pass rewrites the
first form into the second when every use of the reshaped tensor is an integer index of the q/k/v
dim (through at most one permute); anything else is left as it is (and stays unprunable, with its
reason). It needs the shapes of a shape propagation pass.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from .capture import is_aten_graph

_aten = torch.ops.aten
_RESHAPES = {torch.reshape, _aten.view.default, _aten.reshape.default, _aten._unsafe_view.default}
_PERMUTES = {torch.permute, _aten.permute.default}
_UNBINDS = {torch.unbind, _aten.unbind.int}


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def _is(node: fx.Node, functions: set, methods: tuple[str, ...]) -> bool:
    return (node.op == "call_function" and node.target in functions
            or node.op == "call_method" and node.target in methods)


def _shape_args(node: fx.Node) -> list | None:
    """The target shape a reshape/view node was given, as a list (fx varargs or one sequence)."""
    args = list(node.args[1:]) if node.op == "call_method" else [node.args[1] if len(node.args) > 1
                                                                  else node.kwargs.get("shape")]
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = list(args[0])
    return args


def _permutation(node: fx.Node, ndim: int) -> list[int] | None:
    args = list(node.args[1:]) if node.op == "call_method" else [node.args[1] if len(node.args) > 1
                                                                  else node.kwargs.get("dims")]
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = list(args[0])
    if not all(isinstance(d, int) for d in args) or len(args) != ndim:
        return None
    return [d % ndim for d in args]


def _selected_index(node: fx.Node, dim: int, ndim: int) -> list[tuple[fx.Node, int]] | None:
    """The (node, index) pairs that take one q/k/v part of ``dim``: an integer select or index of
    that dim, or the items of an unbind along it. None for any other use."""
    if node.op == "call_function" and node.target is _aten.select.int and len(node.args) == 3:
        d, i = node.args[1], node.args[2]
        return [(node, i)] if isinstance(d, int) and d % ndim == dim and isinstance(i, int) else None
    if node.op == "call_method" and node.target == "select" and len(node.args) == 3:
        d, i = node.args[1], node.args[2]
        return [(node, i)] if isinstance(d, int) and d % ndim == dim and isinstance(i, int) else None
    if node.op == "call_function" and node.target is operator.getitem and dim == 0 and isinstance(node.args[1], int):
        return [(node, node.args[1])]
    if _is(node, _UNBINDS, ("unbind",)):
        d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(d, int) or d % ndim != dim:
            return None
        items = []
        for user in node.users:
            if not (user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int)):
                return None
            items.append((user, user.args[1]))
        return items
    return None


def _match(reshape: fx.Node):
    """(split position k_dim, parts k, the permute or None, [(select node, index)]) or None."""
    src, out = _shape(reshape.args[0]), _shape(reshape)
    if src is None or out is None or len(out) < len(src) + 1:
        return None
    lead = len(src) - 1
    k = out[lead]
    if out[:lead] != src[:lead] or k < 2 or math.prod(out[lead:]) != src[-1]:
        return None
    shape_args = _shape_args(reshape)
    if shape_args is None or len(shape_args) != len(out) or shape_args[lead] not in (k, -1):
        return None
    users = list(reshape.users)
    permute, dim = None, lead
    if len(users) == 1 and _is(users[0], _PERMUTES, ("permute",)):
        permute = users[0]
        perm = _permutation(permute, len(out))
        if perm is None:
            return None
        dim = perm.index(lead)
        users = list(permute.users)
    selects = []
    for user in users:
        picked = _selected_index(user, dim, len(out))
        if picked is None:
            return None
        selects.extend(picked)
    return (lead, k, permute, selects) if selects else None


def unpack_selected_qkv(gm: fx.GraphModule) -> int:
    """Rewrite every matched packed-q/k/v reshape in place; returns how many were rewritten."""
    rewritten = 0
    aten_graph = is_aten_graph(gm)
    for reshape in list(gm.graph.nodes):
        if not _is(reshape, _RESHAPES, ("reshape", "view")):
            continue
        found = _match(reshape)
        if found is None:
            continue
        lead, k, permute, selects = found
        source = reshape.args[0]
        width = _shape(source)[-1] // k
        shape_args = _shape_args(reshape)
        part_shape = shape_args[:lead] + shape_args[lead + 1:]
        if -1 in shape_args[lead + 1:]:
            continue  # the part's own sizes must be explicit
        ndim = len(shape_args)
        perm = _permutation(permute, ndim) if permute is not None else list(range(ndim))
        part_perm = [d - (d > lead) for d in perm if d != lead]
        with gm.graph.inserting_after(reshape):
            if aten_graph:
                parts = gm.graph.call_function(_aten.split.Tensor, (source, width, -1))
            else:
                parts = gm.graph.call_function(torch.chunk, (source, k, -1))
        anchor = parts
        part_nodes: dict[int, fx.Node] = {}
        for _, index in selects:
            index %= k
            if index in part_nodes:
                continue
            with gm.graph.inserting_after(anchor):
                piece = gm.graph.call_function(operator.getitem, (parts, index))
            with gm.graph.inserting_after(piece):
                shaped = gm.graph.call_function(_aten.reshape.default if aten_graph else torch.reshape,
                                                (piece, part_shape))
            anchor = shaped
            if part_perm != list(range(len(part_perm))):
                with gm.graph.inserting_after(shaped):
                    shaped = gm.graph.call_function(_aten.permute.default if aten_graph else torch.permute,
                                                    (shaped, part_perm))
                anchor = shaped
            part_nodes[index] = shaped
        for node, index in selects:
            node.replace_all_uses_with(part_nodes[index % k])
        for node, _ in selects:
            if not node.users:
                producer = node.args[0] if node.args else None
                gm.graph.erase_node(node)
                if isinstance(producer, fx.Node) and _is(producer, _UNBINDS, ("unbind",)) and not producer.users:
                    gm.graph.erase_node(producer)
        for node in (permute, reshape):
            if node is not None and not node.users:
                gm.graph.erase_node(node)
        rewritten += 1
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return rewritten
