"""``multinet.trace``: model + example inputs -> ChannelGraph."""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable

import torch
import torch.fx as fx

from ..errors import TraceError
from . import capture as capture_mod
from .groups import ChannelGraph, build_groups
from .constant_masks import fold_constant_masks
from .packed_qkv import unpack_selected_qkv
from .tracing import as_tuple, positional_inputs, propagate_shapes, symbolic_trace

CAPTURES = ("auto", "fx", "export")


def trace(
    model: torch.nn.Module,
    example_inputs,
    leaf_modules: Iterable[type | str] = (),
    autowrap_functions: Iterable[Callable] = (),
    capture: str = "auto",
) -> ChannelGraph:
    """Capture ``model``'s graph, propagate shapes and find its channel groups.

    ``capture``: "fx" (torch.fx symbolic tracing), "export" (torch.export, an ATen graph) or
    "auto" (fx, then torch.export with a one-line warning when fx cannot trace the model).
    ``model`` may also be an ``ExportedProgram`` or an already captured ``GraphModule``.
    ``leaf_modules`` (classes or qualified names) are kept as opaque calls and
    ``autowrap_functions`` are recorded as single calls instead of being traced through: the
    standard fx escape hatches for code with data-dependent control flow. Opaque calls make the
    channels that reach them unprunable, never silently wrong.
    """
    inputs = positional_inputs(model, example_inputs)  # the model's arguments, defaults in gaps included
    gm = capture_graph(model, inputs, leaf_modules, autowrap_functions, capture)
    groups, analysis = build_groups(gm)
    if capture == "auto" and not leaf_modules and not autowrap_functions and _opaque_calls_block(model, gm, groups):
        exported = _exported_if_more_prunable(model, inputs, groups)
        if exported is not None:
            gm, groups, analysis = exported
    if not groups:
        raise TraceError(_nothing_found(gm, analysis.unknown_ops))
    return ChannelGraph(gm, graph_inputs(gm, inputs), groups, analysis)


def capture_graph(model: torch.nn.Module, example_inputs, leaf_modules: Iterable[type | str] = (),
                  autowrap_functions: Iterable[Callable] = (), capture: str = "auto") -> fx.GraphModule:
    """The model's graph with shapes, without the channel analysis: what saving a model needs (a
    model with nothing to prune can still be saved and loaded)."""
    if capture not in CAPTURES:
        raise TraceError(f"capture must be one of {', '.join(CAPTURES)}, not {capture!r}")
    inputs = as_tuple(example_inputs)
    gm = _capture(model, inputs, capture, leaf_modules, autowrap_functions)
    inputs = graph_inputs(gm, inputs)
    propagate_shapes(gm, inputs)
    if unpack_selected_qkv(gm) + fold_constant_masks(gm, inputs):  # new nodes: their shapes too
        propagate_shapes(gm, inputs)
    return gm


def graph_inputs(gm: fx.GraphModule, inputs: tuple) -> tuple:
    """The captured graph's own inputs: an argument left at its default None (filled in between two
    given ones) is no input of an exported graph, which takes only the tensors."""
    placeholders = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    given = tuple(x for x in inputs if x is not None)
    return given if len(inputs) != placeholders and len(given) == placeholders else inputs


def _capture(model, inputs: tuple, capture: str, leaf_modules, autowrap_functions) -> fx.GraphModule:
    graph_module = getattr(model, "graph_module", None) if isinstance(model, torch.nn.Module) else None
    if isinstance(graph_module, fx.GraphModule):  # a MultiNet (an ExportedProgram's graph_module is another thing): its graph (a new graph over the same layers,
        # as tracing it would give; its inputs may be several named tensors, which fx cannot trace through)
        gm = fx.GraphModule(graph_module, copy.deepcopy(graph_module.graph), graph_module.__class__.__name__)
        gm.meta.update(graph_module.meta)
        return gm
    if isinstance(model, torch.export.ExportedProgram):
        return capture_mod.from_exported(model)
    if isinstance(model, fx.GraphModule):
        return capture_mod.normalise(model) if capture_mod.is_aten_graph(model) else model
    if capture == "export":
        return capture_mod.export_graph(model, inputs)
    try:
        return symbolic_trace(model, leaf_modules, autowrap_functions)
    except TraceError as exc:
        if capture == "fx" or not isinstance(model, torch.nn.Module):
            raise
        try:
            gm = capture_mod.export_graph(model, inputs)
        except TraceError as export_exc:
            raise TraceError(f"{exc} torch.export failed too: {export_exc}") from export_exc
        # said once the capture worked: a failure is reported by the error alone, in one line
        warnings.warn(f"multinet: fx cannot trace {type(model).__name__}; captured it with torch.export instead "
                      f"({str(exc).split('. Mark')[0]})", stacklevel=3)
        return gm


def _prunable_channels(groups) -> int:
    return sum(g.size for g in groups if g.prunable)


def _opaque_calls_block(model, gm: fx.GraphModule, groups) -> bool:
    """fx symbolic tracing recorded a call the analysis cannot see into (a ``torch.fx.wrap``-ped
    function such as torchvision's ``shifted_window_attention``) and it made channels unprunable."""
    if not isinstance(model, torch.nn.Module) or isinstance(model, fx.GraphModule) or capture_mod.is_aten_graph(gm):
        return False
    if isinstance(getattr(model, "graph_module", None), fx.GraphModule):  # a MultiNet: its graph is the model
        return False
    return any("unsupported op" in r for g in groups if not g.prunable for r in g.reasons)


def _exported_if_more_prunable(model, inputs: tuple, fx_groups):
    """torch.export inlines such calls into ATen ops the analysis reads op by op; its graph is taken
    when it leaves more channels prunable (with a one-line notice), else the fx graph stays."""
    try:
        gm = capture_graph(model, inputs, capture="export")
        groups, analysis = build_groups(gm)
    except Exception:  # export is only a second try here: the fx result stands
        return None
    before, after = _prunable_channels(fx_groups), _prunable_channels(groups)
    if after <= before:
        return None
    opaque = sorted({r.split("`")[1] for g in fx_groups if not g.prunable for r in g.reasons
                     if r.startswith("unsupported op `")})
    warnings.warn(f"multinet: fx records {', '.join(opaque[:3])} in {type(model).__name__} as opaque calls; "
                  f"captured with torch.export instead ({after} prunable channels, {before} with fx)", stacklevel=3)
    return gm, groups, analysis


def _nothing_found(gm: fx.GraphModule, unknown: list[str]) -> str:
    """Zero channel groups: say why instead of returning an empty analysis."""
    name = type(gm).__name__
    if unknown:
        ops = ", ".join(f"`{op}`" for op in list(dict.fromkeys(unknown))[:5])
        return (f"no channel could be analysed in {name}: the graph has no layer the analysis understands "
                f"(unsupported ops: {ops})")
    return f"no channel groups in {name}: the graph has no Conv, Linear, embedding or other channel producer"
