"""Fused parallel execution: layers that read the same tensor become one wider layer.

Every member of a MultiNet starts with a layer that reads the shared input, and unification's
links make later members read earlier members' tensors too. Sibling Conv/Linear layers (same
input node, same kernel, stride, padding, dilation, ``groups=1``, dtype and device, and at least
FUSE_MIN_DEPTH multiply-adds per output element) compute one
matrix product each; fused, they are one product with the output channels concatenated, and
``torch.split`` hands each original consumer its own channels. One larger GEMM/conv runs faster
than several small ones (fewer kernel launches, the input read once), and the outputs are the
same up to float rounding. The pass is an fx rewrite of a copy; the original graph is untouched,
so compression keeps working on the unfused graph where every member owns its layers.
"""
from __future__ import annotations

import copy
import fnmatch
import operator
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn as nn

from ..graph.op_tables import UNARY_MODULES
from ..graph.tracing import propagate_shapes
from .pooling import halve_pools

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# multiply-adds per output element below which siblings stay apart: a fused layer's output is split
# and its channel slices copied, and for a shallow layer (the 1-channel 3x3 stem of two VGGs on digits,
# 9) that costs more than the call it saves: 5-10 % slower than the unfused pair on one CPU thread
# (benchmarks/results/unify.md). A Linear on 64 features (the MLPs' first layers) is fused.
FUSE_MIN_DEPTH = 32


def fuse_parallel(gm: fx.GraphModule, halve: bool = True, timed_on=None) -> fx.GraphModule:
    """A copy of ``gm`` in which every set of sibling Conv/Linear layers is one wider layer (and, with
    ``halve``, the links' average pools are strided sums on a CPU: pooling.py). ``timed_on``: a batch of
    inputs; each set is then fused only where its wider layer is not slower on what that batch makes it
    read (fusion_timing.py: at some widths and batches it is)."""
    gm = copy.deepcopy(gm)
    merge_repeated_ops(gm)  # each member's flatten(x): one flatten, so their first layers become siblings
    sets = sibling_layers(gm)
    if timed_on is not None:
        from .fusion_timing import fusions_that_pay

        sets = [s for s, pays in zip(sets, fusions_that_pay(gm, sets, timed_on)) if pays]
    for siblings in sets:
        _fuse(gm, siblings)
    if halve:
        halve_pools(gm, _device_of(gm))
    return finish_rewrite(gm)


def fuse_across_members(gm: fx.GraphModule, members: list[str], keep: tuple[str, ...] = ()) -> fx.GraphModule:
    """A copy of ``gm`` in which layers of *different* members that read the same tensor are one wider layer,
    for compression rather than speed: the fused layer's output channels are one channel group, so REAP
    chooses among all the members' channels at once which to keep (a head bridged to both members'
    features reads the union, and its least squares picks from it), where apart each member's group
    would be cut by its own curve and the schedule would split the budget between them. Digits: an MLP
    digit classifier and a parity MLP at 2 % of their FLOPs, both heads reading both first layers:
    0.87 / 0.90 accuracy fused, 0.72 / 0.97 apart (separately compressed: 0.57 / 0.90).

    Layers of one member stay apart (that is the member's own architecture), and so do layers named
    by ``keep`` (glob patterns, e.g. a budget's ``ignore``: they must stay findable by name). The
    fused layer is named after its first sibling (``shared_<layer>``), so two parts fused apart can
    be combined into one MultiNet without a name clash."""
    gm = copy.deepcopy(gm)
    merge_repeated_ops(gm)
    for chosen in _across_members(gm, members, keep):
        _fuse(gm, chosen, stem=f"{SHARED}{str(chosen[0].target).replace('.', '_')}")
    return finish_rewrite(gm)


SHARED = "shared_"  # the name prefix of a layer fuse_across_members made from several members' layers


def layers_fused_across_members(gm: fx.GraphModule, members: list[str], keep: tuple[str, ...] = ()) -> list[list[str]]:
    """The layer names :func:`fuse_across_members` would fuse, per fused layer (``gm`` is not changed)."""
    gm = copy.deepcopy(gm)
    merge_repeated_ops(gm)
    return [[str(n.target) for n in chosen] for chosen in _across_members(gm, members, keep)]


def _across_members(gm: fx.GraphModule, members: list[str], keep: tuple[str, ...]) -> list[list[fx.Node]]:
    """Sibling layers of different members (at most one per member, none named by ``keep``)."""
    out = []
    for siblings in sibling_layers(gm):
        chosen, owners = [], set()
        for node in siblings:
            owner = next((m for m in members if str(node.target).startswith(f"{m}.")), None)
            if owner is None or owner in owners or any(fnmatch.fnmatchcase(str(node.target), p) for p in keep):
                continue
            chosen.append(node)
            owners.add(owner)
        if len(chosen) > 1:
            out.append(chosen)
    return out


def finish_rewrite(gm: fx.GraphModule) -> fx.GraphModule:
    """After an fx rewrite: drop what is no longer read, check the graph, regenerate its code and
    record the new nodes' shapes (save records the input shape; counting reads output shapes)."""
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    _refresh_shapes(gm)
    return gm


# parameter-free layers whose output depends only on their input and settings
_STATELESS = (nn.Flatten, nn.Unflatten, nn.Identity, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
              nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
              nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_PURE_FUNCTIONS = {torch.flatten, torch.reshape, torch.relu, torch.nn.functional.relu, torch.permute,
                   torch.transpose, torch.nn.functional.adaptive_avg_pool2d, operator.getitem}
_PURE_METHODS = {"flatten", "view", "reshape", "permute", "transpose", "contiguous", "size", "relu", "mean"}


def merge_repeated_ops(gm: fx.GraphModule) -> None:
    """Common subexpressions across members: the same stateless op on the same arguments runs once."""
    seen: dict[tuple, fx.Node] = {}
    for node in list(gm.graph.nodes):
        key = _op_key(gm, node)
        if key is None:
            continue
        try:
            hash(key)
        except TypeError:  # an argument such as a list: compare by repr instead
            key = repr(key)
        if key in seen:
            node.replace_all_uses_with(seen[key])
            gm.graph.erase_node(node)
        else:
            seen[key] = node


def _op_key(gm: fx.GraphModule, node: fx.Node) -> tuple | None:
    """What makes two nodes compute the same value; None where that is not known to hold."""
    if node.kwargs.get("inplace"):
        return None
    args = (node.args, tuple(sorted(node.kwargs.items())))
    if node.op == "call_function" and node.target in _PURE_FUNCTIONS:
        return ("function", node.target, *args)
    if node.op == "call_method" and node.target in _PURE_METHODS:
        return ("method", node.target, *args)
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if type(module) in _STATELESS and not getattr(module, "inplace", False):
            return ("module", type(module), module.extra_repr(), *args)
    return None


def sibling_layers(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Groups of two or more module calls that read the same node and can be one layer."""
    groups: dict[tuple, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            continue
        key = _fusion_key(gm.get_submodule(node.target))
        if key is not None:
            groups[(node.args[0], key)].append(node)
    return [nodes for nodes in groups.values() if len(nodes) > 1]


def _fusion_key(module: nn.Module) -> tuple | None:
    """What must match for layers to share one call; None for a layer this pass does not fuse
    (among them layers too shallow to pay for the split: FUSE_MIN_DEPTH)."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() < 2 or w[0].numel() < FUSE_MIN_DEPTH:
        return None
    if type(module) is nn.Linear:
        return ("linear", module.in_features, w.dtype, w.device)
    if type(module) in _CONVS and module.groups == 1 and module.padding_mode == "zeros" and not isinstance(
            module.padding, str):
        return (type(module).__name__, module.in_channels, module.kernel_size, module.stride, module.padding,
                module.dilation, w.dtype, w.device)
    return None


def _fuse(gm: fx.GraphModule, siblings: list[fx.Node], stem: str = "fused") -> None:
    """Replace ``siblings`` by one wider layer (named ``stem_<i>``) and a split of its output, in their order."""
    modules = [gm.get_submodule(n.target) for n in siblings]
    name = _free_name(gm, stem)
    gm.add_submodule(name, _wider(modules))
    sizes, dim = _split_of(modules)
    dense = dense_pieces(gm, siblings)
    first = siblings[0]  # siblings come in graph order: the first one's place is after their shared input
    with gm.graph.inserting_before(first):
        wide = gm.graph.call_module(name, first.args)
        parts = gm.graph.call_function(torch.split, (wide, sizes, dim))
        for i, node in enumerate(siblings):
            piece = gm.graph.call_function(operator.getitem, (parts, i))
            if dense[i]:
                piece = gm.graph.call_method("contiguous", (piece,))
            node.replace_all_uses_with(piece)
    for node in siblings:
        gm.graph.erase_node(node)


# layers that read a strided slice of a Linear's output as fast as a dense copy and write a dense output
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)  # return it as is
_READ_STRIDED = (nn.Linear, *(m for m in UNARY_MODULES if m not in _PASS_THROUGH))


def dense_pieces(gm: fx.GraphModule, siblings: list[fx.Node]) -> list[bool]:
    """Which slices of a fused output are made dense (a copy): a conv's channel slice always (the layers after
    it run slower strided), a Linear's last-dim slice unless every reader is a Linear or an elementwise layer
    that is not in place: a strided slice breaks what views it (``y.view(-1)``) or returns it (an output),
    and on digit MLPs of 0.16 ms the copies alone cost a few % (benchmarks/results/unify.md)."""
    modules = [gm.get_submodule(n.target) for n in siblings]
    if _split_of(modules)[1] == 1:
        return [True] * len(siblings)

    def strided_ok(user: fx.Node) -> bool:
        if user.op != "call_module":
            return False
        module = gm.get_submodule(user.target)
        return type(module) in _READ_STRIDED and not getattr(module, "inplace", False)

    return [not node.users or not all(strided_ok(u) for u in node.users) for node in siblings]


def _split_of(modules: list[nn.Module]) -> tuple[list[int], int]:
    """How a wider layer's output splits back into ``modules``' outputs: their sizes, along which dim."""
    return [m.weight.shape[0] for m in modules], 1 if isinstance(modules[0], _CONVS) else -1


def widened_call(modules: list[nn.Module], dense: list[bool] | None = None
                 ) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """``modules``' outputs computed as the fused graph computes them: one wider layer, its output split,
    the slices ``dense`` says (``dense_pieces``; None: all) made dense (what fusion_timing.py times against
    the layers apart)."""
    wide = _wider(modules)
    sizes, dim = _split_of(modules)
    dense = [True] * len(modules) if dense is None else dense

    def call(x: torch.Tensor) -> list[torch.Tensor]:
        pieces = torch.split(wide(x), sizes, dim)
        return [p.contiguous() if d else p for p, d in zip(pieces, dense)]

    return call


def _wider(modules: list[nn.Module]) -> nn.Module:
    """One layer computing every module's outputs, concatenated along the output channels."""
    first = modules[0]
    out = sum(m.weight.shape[0] for m in modules)
    bias = any(m.bias is not None for m in modules)
    w = first.weight
    if isinstance(first, nn.Linear):
        wide = nn.Linear(first.in_features, out, bias=bias, device=w.device, dtype=w.dtype)
    else:
        wide = type(first)(first.in_channels, out, first.kernel_size, first.stride, first.padding, first.dilation,
                           1, bias, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        wide.weight.copy_(torch.cat([m.weight for m in modules]))
        if bias:
            wide.bias.copy_(torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.weight.shape[0])
                                       for m in modules]))
    return wide.train(first.training)


def _free_name(gm: fx.GraphModule, stem: str) -> str:
    i = 0
    while hasattr(gm, f"{stem}_{i}"):
        i += 1
    return f"{stem}_{i}"


def _refresh_shapes(gm: fx.GraphModule) -> None:
    """Shapes for the new nodes (save records the input shape; counting reads output shapes)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    metas = [n.meta.get("tensor_meta") for n in placeholders]
    if placeholders and all(hasattr(m, "shape") for m in metas):
        example = tuple(torch.zeros(m.shape, dtype=m.dtype, device=_device_of(gm)) for m in metas)
        propagate_shapes(gm, example)


def _device_of(gm: fx.GraphModule) -> torch.device:
    for p in gm.parameters():
        return p.device
    return torch.device("cpu")
