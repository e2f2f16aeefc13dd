"""torch.fx tracing with the standard escape hatches and errors that point at the user's code."""
from __future__ import annotations

import contextlib
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import TensorMetadata
from torch.utils import _pytree as pytree

from ..errors import InputShapeError, TraceError
from . import attention

_TORCH_DIR = torch.__file__.rsplit("/", 1)[0]


class _Tracer(fx.Tracer):
    """fx tracer that also treats the user's chosen modules as leaves."""

    def __init__(self, leaf_modules: Iterable[type | str], autowrap_functions: Iterable[Callable]):
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        leaves = list(leaf_modules)
        self._leaf_types = tuple(t for t in leaves if isinstance(t, type))
        self._leaf_names = {t for t in leaves if isinstance(t, str)}
        self.attention_weights: list[fx.Node] = []  # averaged attention weights, erased when unused

    def call_module(self, m: torch.nn.Module, forward: Callable, args: tuple, kwargs: dict):
        """nn.MultiheadAttention (prepared by attention.prepare) is recorded as its q/k/v/out
        Linears and head reshapes, unless the user made it a leaf or the call uses masks."""
        if attention.supported_module(m) and hasattr(m, "q_proj"):
            qualname = self.path_of_module(m)
            if not (isinstance(m, self._leaf_types) or qualname in self._leaf_names):
                call = attention.bind_call(args, kwargs)
                if call is not None:
                    return attention.traced_attention(self, m, call)
        return super().call_module(m, forward, args, kwargs)

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if isinstance(m, self._leaf_types) or qualname in self._leaf_names:
            return True
        return super().is_leaf_module(m, qualname)


def symbolic_trace(
    model: torch.nn.Module,
    leaf_modules: Iterable[type | str] = (),
    autowrap_functions: Iterable[Callable] = (),
) -> fx.GraphModule:
    """Trace in eval mode (dropout and stochastic depth off) and restore the model's mode."""
    if isinstance(model, fx.GraphModule):
        return model
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    root = attention.prepare(model)
    try:
        tracer = _Tracer(leaf_modules, autowrap_functions)
        graph = tracer.trace(root)
    except Exception as exc:  # fx raises many types; all mean "cannot trace"
        raise TraceError(_explain_trace_failure(model, exc)) from exc
    finally:
        model.train(was_training)
    _drop_unused_attention_nodes(graph, tracer.attention_weights)
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


def _drop_unused_attention_nodes(graph: fx.Graph, weights: list[fx.Node]) -> None:
    """Averaged attention weights nobody reads (``attn(q, k, v)[0]``), and the packed in-projection
    the tracer touched while checking the module, would keep heads or parameters alive."""
    for node in reversed(weights):
        if not node.users:
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users and node.target.endswith((".in_proj_weight", ".in_proj_bias")):
            graph.erase_node(node)


def _explain_trace_failure(model: torch.nn.Module, exc: Exception) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    where = ""
    if frames:
        f = frames[-1]
        where = f" at {f.filename}:{f.lineno} `{(f.line or '').strip()}`"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"cannot trace {type(model).__name__}{where}: {first}. "
        "Mark the offending submodule as a leaf (leaf_modules=[...]) or wrap the function "
        "(autowrap_functions=[...])."
    )


def positional_inputs(model, example_inputs: Any) -> tuple:
    """Example inputs as the positional arguments of ``model``: a dict ({"input_ids": ..., ...}) is
    bound by the model's argument (or placeholder) names, a tensor or sequence is taken as it is."""
    from collections.abc import Mapping

    if isinstance(example_inputs, Mapping):
        from ..calib import batches  # calib builds on graph: imported when first needed

        return batches.model_args(model, example_inputs)
    return as_tuple(example_inputs)


def as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Sequence):
        return tuple(example_inputs)
    raise InputShapeError(f"example_inputs must be a tensor or a sequence of tensors, got {type(example_inputs).__name__}")


def tensor_metadata(t: torch.Tensor) -> TensorMetadata:
    """fx's record of a node's value (shape, dtype, strides), without the memory-format probe of fx's
    own ShapeProp: that probe goes through ``torch._check``, whose first call imports sympy (~0.4 s,
    several plain passes of a small model, in every fresh process); no pass here reads the format."""
    return TensorMetadata(t.shape, t.dtype, t.requires_grad, t.stride(), None, t.is_quantized, {})


class _ShapeProp(fx.Interpreter):
    """Records each node's output shape (``meta['tensor_meta']``, as fx's ShapeProp does) and
    reports the failing node in the user's terms instead of printing a traceback."""

    def run_node(self, n: fx.Node):
        try:
            result = super().run_node(n)
        except InputShapeError:
            raise
        except Exception as exc:
            what = n.target if n.op == "call_module" else getattr(n.target, "__name__", n.target)
            if n.op == "call_module":
                what = f"{what} ({type(self.module.get_submodule(n.target)).__name__})"
            raise InputShapeError(f"node `{n.name}` = {what}: {str(exc).strip().splitlines()[0]}") from exc
        leaves = pytree.tree_leaves(result)
        if any(isinstance(t, torch.Tensor) for t in leaves):
            n.meta["tensor_meta"] = pytree.tree_map(
                lambda t: tensor_metadata(t) if isinstance(t, torch.Tensor) else t, result)
        else:
            n.meta.pop("tensor_meta", None)
        return result


@contextlib.contextmanager
def evaluation_mode(module: nn.Module):
    """``module`` in eval mode for a pass that must change nothing (a BatchNorm in training mode would
    move its running statistics towards the pass's inputs); each submodule's own mode is restored."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes.items():
            m.training = mode


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Run the graph once on the example inputs, recording each node's output shape (in eval mode: the
    example, often zeros, must not move a training-mode BatchNorm's running statistics)."""
    n_placeholders = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    if len(example_inputs) != n_placeholders:
        raise InputShapeError(f"model takes {n_placeholders} input(s), got {len(example_inputs)} example input(s)")
    try:
        with torch.no_grad(), evaluation_mode(gm):
            prop = _ShapeProp(gm)
            prop.extra_traceback = False  # keep the message to one line
            prop.run(*example_inputs)
    except InputShapeError as exc:
        shapes = ", ".join(str(tuple(t.shape)) for t in example_inputs if isinstance(t, torch.Tensor))
        raise InputShapeError(f"example input(s) of shape {shapes} do not fit the model at {exc}") from exc
