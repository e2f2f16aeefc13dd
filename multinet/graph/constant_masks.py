"""An fx pass: tensors a graph builds from nothing (attention masks) become buffers.

torch.export keeps code such as Swin's shifted-window mask as it runs: ``x.new_zeros(H, W)``,
region labels written in place into slices of it (``fill_``), comparisons and ``masked_fill``.
Its value depends on no input value (``new_zeros`` takes only the dtype and device of its
argument; the shapes are fixed at capture), yet it is rebuilt at every call, with in-place ops a
model file does not allow. Here each such subgraph is evaluated once on the example inputs and
replaced by a buffer holding its value: the same outputs, nothing rebuilt per call, and a graph
of pure tensor functions. Only subgraphs that start at such a fresh tensor are folded; parameters
and anything derived from an input stay as they are (pruning slices them).
"""
from __future__ import annotations

import torch
import torch.fx as fx

_aten = torch.ops.aten
_FRESH = {_aten.new_zeros.default, _aten.new_ones.default, _aten.new_full.default, _aten.new_empty.default}


def _inputs(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) or a)
    return found


def _constant_nodes(gm: fx.GraphModule) -> tuple[set[fx.Node], set[fx.Node]]:
    """(nodes whose value depends on no input value or parameter, the fresh tensors among them)."""
    params = {name for name, _ in gm.named_parameters()}
    const: set[fx.Node] = set()
    fresh: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in params and "lifted_tensor" in str(node.target):
            const.add(node)
        elif node.op != "call_function":
            continue
        elif node.target in _FRESH:
            const.add(node)
            fresh.add(node)
        elif isinstance(node.target, torch._ops.OpOverload) and _inputs(node) \
                and all(i in const for i in _inputs(node)):
            const.add(node)  # pure, or an in-place write into a constant (fill_ of a slice of new_zeros)
    return const, fresh


def _reaches_fresh(node: fx.Node, fresh: set[fx.Node], const: set[fx.Node]) -> bool:
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in fresh:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(i for i in _inputs(n) if i in const)
    return False


def fold_constant_masks(gm: fx.GraphModule, example_inputs: tuple) -> int:
    """Replace every fresh-tensor subgraph by a buffer of its value; returns how many were folded."""
    const, fresh = _constant_nodes(gm)
    if not fresh:
        return 0
    frontier = [n for n in gm.graph.nodes if n in const and n.op == "call_function"
                and any(u not in const for u in n.users) and _reaches_fresh(n, fresh, const)]
    if not frontier:
        return 0
    values: dict[fx.Node, torch.Tensor] = {}

    class _Keep(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in frontier_set:
                values[n] = out.detach().clone() if isinstance(out, torch.Tensor) else out
            return out

    frontier_set = set(frontier)
    with torch.no_grad():
        _Keep(gm).run(*example_inputs)
    folded = 0
    for i, node in enumerate(frontier):
        value = values.get(node)
        if not isinstance(value, torch.Tensor):
            continue
        name = f"_folded_constant_{i}"
        while hasattr(gm, name):
            name += "_"
        gm.register_buffer(name, value)
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(name)
        node.replace_all_uses_with(attr, delete_user_cb=lambda user: user not in const)
        folded += 1
    if folded:
        _erase_unused(gm, const)
        gm.graph.lint()
        gm.recompile()
    return folded


def _erase_unused(gm: fx.GraphModule, const: set[fx.Node]) -> None:
    """Remove constant nodes nothing outside the constant subgraphs reads any more (in-place writes
    included, which dead-code elimination keeps)."""
    alive: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node not in const:
            alive.update(i for i in _inputs(node) if i in const)
    stack = list(alive)
    while stack:  # a constant kept alive keeps its inputs and the writes into them
        n = stack.pop()
        for i in _inputs(n):
            if i in const and i not in alive:
                alive.add(i)
                stack.append(i)
    dropped = set()
    for node in reversed(list(gm.graph.nodes)):
        if node in const and node not in alive:
            if node.op == "get_attr":
                dropped.add(node.target)
            gm.graph.erase_node(node)
    still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in dropped - still_read:  # a captured constant nothing reads: not part of the model's state
        owner, _, attr = target.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        if attr in module._buffers:
            del module._buffers[attr]
        elif hasattr(module, attr):
            delattr(module, attr)
