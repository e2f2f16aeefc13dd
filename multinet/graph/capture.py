"""Graph capture with torch.export, for models fx symbolic tracing cannot follow.

torch.export gives an ATen-level fx graph: layers are ``aten.linear``/``aten.conv2d``/
``aten.layer_norm``/``aten.embedding`` calls on parameter attributes. The channel analysis reads
those directly, but calibration, reconstruction, surgery and counting all speak in layers, so a
call whose weight belongs to nothing else is raised back into the module it came from (an
``nn.Linear`` named like the original one). Calls that share a weight stay functional.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging

from collections.abc import Mapping

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from ..errors import TraceError

_aten = torch.ops.aten


def export_graph(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """torch.export ``model`` in eval mode (batch dim dynamic where it can be) into a GraphModule."""
    was_training = model.training
    model.eval()
    try:
        program = _export(model, batch_of_two(example_inputs))
    finally:
        model.train(was_training)
    return from_exported(program)


def batch_of_two(inputs: tuple) -> tuple:
    """Examples with batch 1 repeated to 2: torch.export specialises a size-1 dimension to a constant,
    which would fix the exported batch at 1."""
    return tuple(x.expand(2, *x.shape[1:]).contiguous() if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == 1
                 else x for x in inputs)


@contextlib.contextmanager
def _quiet_torch_logs():
    """torch.export logs warnings and prints whole graphs when it gives up; the user gets multinet's
    one-line error instead (the loggers are silenced, and what is printed directly is swallowed)."""
    import torch.fx.experimental.symbolic_shapes  # noqa: F401  (creates the loggers to silence)

    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name == "torch" or name.startswith("torch.")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export(model: nn.Module, example_inputs: tuple):
    dynamic = tuple({0: torch.export.Dim.AUTO} if isinstance(t, torch.Tensor) and t.ndim else None
                    for t in example_inputs)
    kwargs = _without_cache(model)
    with _quiet_torch_logs():
        try:
            # a flat tuple, arguments then keyword arguments (constants: None)
            return torch.export.export(model, example_inputs, kwargs, dynamic_shapes=(*dynamic, *[None] * len(kwargs)))
        except Exception:
            pass
        try:
            return torch.export.export(model, example_inputs, kwargs)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TraceError(f"torch.export cannot capture {type(model).__name__}: {first}") from exc


def _without_cache(model: nn.Module) -> dict:
    """``use_cache=False`` for a forward that takes it: a decoder (Llama, GPT-2) otherwise returns its
    key/value cache, an object torch.export cannot return and compression has no use for."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in parameters else {}


def from_exported(program) -> fx.GraphModule:
    """An ExportedProgram's module with its guards dropped and its layers raised to modules."""
    return normalise(program.module(), copy_first=False)


def _plain(gm: fx.GraphModule) -> fx.GraphModule:
    """The same graph and weights in a plain GraphModule: an exported module refuses ``eval()``/``train()``
    and checks its inputs against the export-time ranges in a hook, neither of which compression can use."""
    if type(gm).__name__ == "GraphModule" and not gm._forward_pre_hooks:
        return gm
    return fx.GraphModule(gm, gm.graph)


def is_aten_graph(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)


def normalise(gm: fx.GraphModule, copy_first: bool = True) -> fx.GraphModule:
    """An ATen graph without input guards and with layers as modules (a copy unless told)."""
    gm = _plain(copy.deepcopy(gm) if copy_first else gm)
    for node in list(gm.graph.nodes):
        if not node.users and (node.op == "call_module" and node.target.startswith("_guards")
                               or node.op == "call_function" and node.target in _INPUT_CHECKS):
            gm.graph.erase_node(node)
        elif node.op == "call_function" and node.target in _DUNDER_OPS:
            node.target = _DUNDER_OPS[node.target]  # same op; a model file names no dunders
        elif node.op == "call_function" and node.target in _IN_PLACE and isinstance(node.args[0], fx.Node) \
                and len(node.args[0].users) == 1:
            node.target = _IN_PLACE[node.target]  # nothing else reads the input: the same values, no mutation
    _plain_inputs_outputs(gm)
    _fold_patched_parameters(gm)
    uses = _attr_uses(gm)
    for node in list(gm.graph.nodes):
        lift = _LIFTS.get(node.target) if node.op == "call_function" else None
        if lift is not None:
            lift(gm, node, uses)
    _one_name_per_parameter(gm)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    _drop_unread_buffers(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def _one_name_per_parameter(gm: fx.GraphModule) -> None:
    """A parameter held under two names (tied embeddings: Gemma's exported graph keeps
    ``model.embed_tokens.weight`` and reads it as ``lm_head.weight``) is read under its first name,
    so that pruning cuts the one tensor every reader sees and a model file holds it once (the alias's
    container, now unread, is dropped with the unused submodules)."""
    first: dict[int, str] = {}
    alias: dict[str, str] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        canonical = first.setdefault(id(p), name)
        if canonical != name:
            alias[name] = canonical
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in alias:
            node.target = alias[node.target]


def _drop_unread_buffers(gm: fx.GraphModule) -> None:
    """Buffers the exported graph never reads (Llama's ``rotary_emb.original_inv_freq``, kept by the
    model for re-scaling) are no state of the captured graph: a model file holds what the graph reads."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for name, _ in list(gm.named_buffers()):
        owner, _, attr = name.rpartition(".")
        if name in read or any(owner == c or owner.startswith(f"{c}.") for c in called):
            continue
        del (gm.get_submodule(owner) if owner else gm)._buffers[attr]


_INPUT_CHECKS = (_aten._assert_tensor_metadata.default, _aten._assert_scalar.default,
                 _aten.sym_constrain_range_for_size.default)  # export-time input checks, like the guards


_IN_PLACE = {_aten.relu_.default: _aten.relu.default, _aten.silu_.default: _aten.silu.default,
             _aten.sigmoid_.default: _aten.sigmoid.default, _aten.hardtanh_.default: _aten.hardtanh.default}


_DUNDER_OPS = {_aten.__and__.Tensor: _aten.bitwise_and.Tensor, _aten.__or__.Tensor: _aten.bitwise_or.Tensor}


def _plain_inputs_outputs(gm: fx.GraphModule) -> None:
    """Positional tensors in, plain containers out: the exported pytree wrapping (a ``ModelOutput``
    class, input specs) becomes a dict or tuple of the same tensors, which any caller and a model
    file can hold without the model's own classes."""
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is None:
        return
    output = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = output.args[0]
    leaves = list(leaves) if isinstance(leaves, (tuple, list)) else [leaves]
    structure = pytree.tree_unflatten(leaves, info.out_spec) if info.out_spec is not None else tuple(leaves)
    gm.graph._codegen = fx.graph.CodeGen()
    output.args = (_containers(structure),)
    for node in list(gm.graph.nodes):  # a constant argument export was given (use_cache=False, None): no input
        if node.op == "placeholder" and not node.users and "val" in node.meta \
                and (node.meta["val"] is None or isinstance(node.meta["val"], (bool, int, float, str))):
            gm.graph.erase_node(node)


def _containers(value):
    """Mappings as dicts and sequences as tuples, recursively (fx nodes stay)."""
    if isinstance(value, Mapping):
        return {k: _containers(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return tuple(_containers(v) for v in value)
    return value


_SLICES = (_aten.slice.Tensor, _aten.select.int)


def _fold_patched_parameters(gm: fx.GraphModule) -> None:
    """A layer's weight or bias that the code copies and patches in place before each call (Swin V2:
    ``bias = qkv.bias.clone(); bias[C:2C].zero_()``) becomes a parameter holding the patched values,
    so the call reads a plain parameter and is raised into a layer like any other. Only a copy of
    one parameter read nowhere else, written through slices with values known at capture, is folded."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not _aten.clone.default or not node.args:
            continue
        param = node.args[0]
        if not (isinstance(param, fx.Node) and param.op == "get_attr" and len(param.users) == 1):
            continue
        owner_path, _, attr = param.target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if attr not in owner._parameters:
            continue
        readers = [u for u in node.users if u.target not in _SLICES]
        writes = [(s, w) for s in node.users if s.target in _SLICES for w in s.users]
        if len(readers) != 1 or readers[0].target not in _LIFTS or not writes:
            continue
        if any(len(s.users) != 1 or w.users or not isinstance(w.target, torch._ops.OpOverload)
               or not w.target._schema.is_mutable or s.args[0] is not node
               or any(isinstance(a, fx.Node) for a in (*s.args[1:], *w.args[1:])) for s, w in writes):
            continue
        value = owner._parameters[attr].detach().clone()
        for s, w in writes:  # in graph order, as the code ran them
            w.target(s.target(value, *s.args[1:]), *w.args[1:])
        original = owner._parameters[attr]
        owner._parameters[attr] = nn.Parameter(value, requires_grad=original.requires_grad)  # a new tensor
        readers[0].replace_input_with(node, param)
        for s, w in writes:
            gm.graph.erase_node(w)
            gm.graph.erase_node(s)
        gm.graph.erase_node(node)


def _attr_uses(gm: fx.GraphModule) -> dict[str, int]:
    """How many call nodes read each attribute: a weight read twice is shared and stays functional."""
    uses: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            uses[node.target] = uses.get(node.target, 0) + len(node.users)
    return uses


def _owner(gm: fx.GraphModule, node: fx.Node, weight, bias, uses) -> str | None:
    """The module path holding exactly ``weight`` (and ``bias``), if nothing else reads them."""
    params = [p for p in (weight, bias) if p is not None]
    if not all(isinstance(p, fx.Node) and p.op == "get_attr" and uses.get(p.target) == 1 for p in params):
        return None
    path, _, attr = weight.target.rpartition(".")
    if not path or attr != "weight" or (bias is not None and bias.target != f"{path}.bias"):
        return None
    owner = gm.get_submodule(path)
    own = {n for n, _ in owner.named_parameters(recurse=False)} | {n for n, _ in owner.named_buffers(recurse=False)}
    if list(owner.children()) or own != {p.target.rpartition(".")[2] for p in params}:
        return None
    return path


def _replace(gm: fx.GraphModule, node: fx.Node, path: str, module: nn.Module, inputs: tuple) -> None:
    owner = gm.get_submodule(path)
    module.to(next(owner.parameters()).device)
    for name, param in owner.named_parameters(recurse=False):
        setattr(module, name, param)  # the same tensors: nothing is copied
    parent, _, leaf = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, module)
    with gm.graph.inserting_before(node):
        call = gm.graph.call_module(path, inputs)
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)


def _arg(node: fx.Node, i: int, default=None):
    return node.args[i] if len(node.args) > i else default


def _lift_linear(gm, node, uses) -> None:
    weight, bias = node.args[1], _arg(node, 2)
    path = _owner(gm, node, weight, bias, uses)
    if path is not None:
        out, inp = gm.get_submodule(path).weight.shape
        _replace(gm, node, path, nn.Linear(inp, out, bias=bias is not None), (node.args[0],))


def _lift_addmm(gm, node, uses) -> None:
    """``addmm(bias, x, weight)`` with weight (in, out): Hugging Face's ``Conv1D`` (GPT-2), a Linear with
    its weight stored transposed. Raised into an ``nn.Linear`` holding the transposed weight."""
    if node.kwargs or len(node.args) != 3:
        return  # beta/alpha scaling: stays functional
    bias, x, weight = node.args
    path = _owner(gm, node, weight, bias, uses)
    if path is None:
        return
    owner = gm.get_submodule(path)
    inp, out = owner.weight.shape
    if owner.bias.shape != (out,):
        return
    owner._parameters["weight"] = nn.Parameter(owner.weight.detach().t().contiguous(),
                                               requires_grad=owner.weight.requires_grad)
    _replace(gm, node, path, nn.Linear(inp, out), (x,))


def _lift_conv(gm, node, uses) -> None:
    weight, bias = node.args[1], _arg(node, 2)
    path = _owner(gm, node, weight, bias, uses)
    if path is None:
        return
    w = gm.get_submodule(path).weight
    nd = w.ndim - 2
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
    stride, padding, dilation, groups = (_arg(node, 3, 1), _arg(node, 4, 0), _arg(node, 5, 1), _arg(node, 6, 1))
    if not all(isinstance(v, (int, list, tuple, str)) for v in (stride, padding, dilation)):
        return
    module = cls(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=stride, padding=padding,
                 dilation=dilation, groups=groups, bias=bias is not None)
    _replace(gm, node, path, module, (node.args[0],))


def _lift_layer_norm(gm, node, uses) -> None:
    weight, bias = _arg(node, 2), _arg(node, 3)
    if weight is None:
        return
    path = _owner(gm, node, weight, bias, uses)
    if path is not None:
        module = nn.LayerNorm(list(node.args[1]), eps=_arg(node, 4, 1e-5), bias=bias is not None)
        _replace(gm, node, path, module, (node.args[0],))


def _lift_embedding(gm, node, uses) -> None:
    weight = node.args[0]
    path = _owner(gm, node, weight, None, uses)
    if path is not None:
        num, dim = gm.get_submodule(path).weight.shape
        padding = _arg(node, 2, -1)
        _replace(gm, node, path, nn.Embedding(num, dim, padding_idx=None if padding < 0 else padding),
                 (node.args[1],))


_LIFTS = {
    _aten.linear.default: _lift_linear,
    _aten.addmm.default: _lift_addmm,
    _aten.conv1d.default: _lift_conv,
    _aten.conv2d.default: _lift_conv,
    _aten.conv3d.default: _lift_conv,
    _aten.layer_norm.default: _lift_layer_norm,
    _aten.embedding.default: _lift_embedding,
}
