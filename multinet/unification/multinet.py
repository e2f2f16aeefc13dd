"""MultiNet: several models that read the same input, as one GraphModule with one output per model.

Each model is traced on its own, then its nodes are copied into one graph whose single
placeholder feeds every model; submodules live under the model's name (``a.conv1``), so groups,
surgery and counting work on the merged network exactly as on one model. Nothing is shared yet:
the outputs equal running the models one by one, bit for bit. Sharing is what unification adds.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import InputShapeError, MultinetError, TraceError
from ..graph import count, trace
from ..graph.tracing import as_tuple, propagate_shapes

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def named_models(models) -> dict[str, nn.Module]:
    """{name: model} from a dict, a list of (name, model) pairs, or a list of models (m0, m1, ...)."""
    if isinstance(models, Mapping):
        pairs = list(models.items())
    else:
        models = list(models)
        pairs = [m if isinstance(m, tuple) else (f"m{i}", m) for i, m in enumerate(models)]
    if len(pairs) < 1:
        raise MultinetError("a MultiNet needs at least one model")
    names = [n for n, _ in pairs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise MultinetError(f"duplicate model names: {', '.join(dup)}; every model needs its own name")
    for name, model in pairs:
        if not isinstance(name, str) or not _NAME.match(name):
            raise MultinetError(f"model name {name!r} must be a Python identifier (letters, digits, _)")
        if not isinstance(model, nn.Module):
            raise MultinetError(f"model {name!r} is a {type(model).__name__}, not a torch.nn.Module")
    return dict(pairs)


def _check_outputs(name: str, gm: fx.GraphModule) -> None:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    bad = []

    def visit(a):
        if isinstance(a, fx.Node) and "tensor_meta" not in a.meta:
            bad.append(a.name)
        return a

    fx.node.map_arg(out.args[0], visit)
    leaves = torch.utils._pytree.tree_leaves(out.args[0])
    if bad or any(not isinstance(v, fx.Node) for v in leaves):
        raise MultinetError(f"model {name!r} returns something other than tensors (a tensor, or a tuple/list/dict "
                            f"of tensors): its outputs must be tensors to be merged and compared")


def MultiNet(models, example_inputs, leaf_modules=(), autowrap_functions=()) -> fx.GraphModule:
    """One GraphModule running every model on the same input; forward returns {name: output}.

    ``models``: a dict {name: model}, a list of (name, model) pairs, or a list of models (named
    m0, m1, ...). ``example_inputs``: one input every model accepts.
    """
    models = named_models(models)
    inputs = as_tuple(example_inputs)
    if len(inputs) != 1:
        raise MultinetError("a MultiNet has one input shared by all models; give one example tensor")
    root = nn.Module()
    graph = fx.Graph()
    x = graph.placeholder("x")
    outputs = {}
    for name, model in models.items():
        try:
            gm = trace(model, inputs, leaf_modules, autowrap_functions).module
        except InputShapeError as exc:
            raise MultinetError(f"model {name!r} does not accept the shared input: {exc}") from None
        except TraceError as exc:
            raise MultinetError(f"model {name!r}: {exc}") from None
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise MultinetError(f"model {name!r} takes {len(placeholders)} inputs; a MultiNet's models take one")
        _check_outputs(name, gm)
        root.add_module(name, gm)
        env: dict[fx.Node, fx.Node] = {}
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                env[node] = x
            elif node.op == "output":
                outputs[name] = fx.node.map_arg(node.args[0], lambda n: env[n])
            else:
                new = graph.node_copy(node, lambda n: env[n])
                if node.op in ("call_module", "get_attr"):
                    new.target = f"{name}.{node.target}"
                env[node] = new
    graph.output(outputs)
    net = fx.GraphModule(root, graph, "MultiNet")
    net.meta["multinet_models"] = list(models)
    propagate_shapes(net, inputs)
    return net


def model_names(net: fx.GraphModule) -> list[str]:
    names = net.meta.get("multinet_models")
    if names is None:
        raise MultinetError("not a MultiNet: build one with multinet.MultiNet([...], example_inputs)")
    return list(names)


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def model_costs(net: fx.GraphModule, example_inputs=None) -> dict[str, dict[str, int]]:
    """FLOPs (MACs) and params each model needs, and what is shared by several models.

    A layer belongs to every model whose output depends on it; ``shared`` holds the layers more
    than one model depends on; ``total`` is the whole network (each layer counted once).
    """
    names = model_names(net)
    counts = count(net, as_tuple(example_inputs) if example_inputs is not None else None)
    out_node = next(n for n in net.graph.nodes if n.op == "output")
    users: dict[str, set[str]] = {}
    for name in names:
        for node in _ancestors_of_output(out_node, name):
            key = node.target if node.op == "call_module" else node.name
            users.setdefault(key, set()).add(name)
    per = {name: {"flops": 0, "params": 0} for name in names} | {"shared": {"flops": 0, "params": 0}}
    for layer in counts.layers:
        owners = users.get(layer.name, set())
        for name in owners:
            per[name]["flops"] += layer.flops
            per[name]["params"] += layer.params
        if len(owners) > 1:
            per["shared"]["flops"] += layer.flops
            per["shared"]["params"] += layer.params
    per["total"] = {"flops": counts.flops, "params": counts.params}
    return per


def _ancestors_of_output(out_node: fx.Node, name: str) -> set[fx.Node]:
    outputs = out_node.args[0]
    roots: list[fx.Node] = []
    fx.node.map_arg(outputs[name], lambda n: roots.append(n) or n)
    found = set(roots)
    for r in roots:
        found |= _ancestors(r)
    return found
