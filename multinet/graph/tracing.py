"""torch.fx tracing with the standard escape hatches and errors that point at the user's code."""
from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import InputShapeError, TraceError

_TORCH_DIR = torch.__file__.rsplit("/", 1)[0]


class _Tracer(fx.Tracer):
    """fx tracer that also treats the user's chosen modules as leaves."""

    def __init__(self, leaf_modules: Iterable[type | str], autowrap_functions: Iterable[Callable]):
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        leaves = list(leaf_modules)
        self._leaf_types = tuple(t for t in leaves if isinstance(t, type))
        self._leaf_names = {t for t in leaves if isinstance(t, str)}

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
    try:
        tracer = _Tracer(leaf_modules, autowrap_functions)
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types; all mean "cannot trace"
        raise TraceError(_explain_trace_failure(model, exc)) from exc
    finally:
        model.train(was_training)
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


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


def as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Sequence):
        return tuple(example_inputs)
    raise InputShapeError(f"example_inputs must be a tensor or a sequence of tensors, got {type(example_inputs).__name__}")


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Run the graph once on the example inputs, recording each node's output shape."""
    n_placeholders = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    if len(example_inputs) != n_placeholders:
        raise InputShapeError(f"model takes {n_placeholders} input(s), got {len(example_inputs)} example input(s)")
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as exc:
        cause = exc.__cause__ or exc
        node = _failing_node(exc)
        shapes = ", ".join(str(tuple(t.shape)) for t in example_inputs if isinstance(t, torch.Tensor))
        raise InputShapeError(
            f"example input(s) of shape {shapes} do not fit the model{node}: {str(cause).strip().splitlines()[0]}"
        ) from exc


def _failing_node(exc: Exception) -> str:
    msg = str(exc)
    if "node=" in msg:
        return " at node " + msg.split("node=", 1)[1].split(",", 1)[0].strip()
    return ""
