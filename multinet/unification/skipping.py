"""One model compressed with skip links: whole layers go where that beats narrowing them
(``compress(..., skip_links=True)``).

Three structures at the same budget, and the one with the least final-output error on the evaluation
samples is kept:

1. the model narrowed group by group (what ``compress`` returns without skip links);
2. skip links: a layer reads an earlier tensor of the model that explains its input (least-squares
   R²), so the layers in between can be removed whole — unification's search with one member, which
   keeps the links only where they lower the error (see ``api._unified_parts``);
3. residual branches (only for a model that has them): a branch ``x + f(x)`` may lose all its channels
   and collapse into its skip connection (``Budget(residual_branches=True)``, graph/dropping.py).

The result is an ordinary :class:`CompressResult` whose model is a plain GraphModule with the model's
own layer names and output structure, not a one-member MultiNet.
"""
from __future__ import annotations

from dataclasses import replace

import torch.fx as fx
import torch.nn as nn

from ..calib import batches, first_sample
from ..errors import MultinetError
from ..graph import count, trace
from ..graph.dropping import bridged_layers, mark_bridged, residual_branch
from ..pipeline.compression import CompressResult, compress
from ..schedule import Budget, BudgetError, Plan
from ..schedule.oneshot import evaluation_inputs
from .api import over_budget, member_errors, member_outputs, unify
from .multinet import MultiNet

MEMBER = "model"  # the one member's name inside the search (stripped again from every layer name)


def compress_with_skip_links(model: nn.Module, calibration_data, budget: Budget, **options) -> CompressResult:
    """``model`` compressed to ``budget``, whole layers removed where that lowers its final-output
    error (``options``: the keywords of :func:`multinet.compress`, already checked there)."""
    if budget.metric == "latency":
        raise MultinetError("skip_links take a FLOPs or parameter budget: the search compares errors at the same "
                            "FLOPs or parameters, and a latency budget is measured on the compressed graph")
    schedule = options.pop("schedule", "auto")
    batch_size = options.pop("batch_size", 128)
    eval_samples = options.pop("eval_samples", 1024)
    settings = dict(schedule=schedule, batch_size=batch_size, eval_samples=eval_samples, **options)
    tracing = options.get("leaf_modules", ()), options.get("autowrap_functions", ())
    example = first_sample(calibration_data, batch_size)
    graph = trace(model, batches.model_args(model, example), *tracing)
    found: list[CompressResult] = []  # in order of preference on equal errors: the simplest first
    try:  # the layer names inside the search carry the member's prefix, and so must the ignore patterns
        unified = unify({MEMBER: model}, calibration_data, budget=_prefixed(budget), skip_links=True, **settings)
    except BudgetError:
        unified = None  # not even with skip links; residual branches may still reach it
    if unified is not None:
        if MEMBER in unified.separate:
            found.append(replace(unified.separate[MEMBER], skip_links=[]))
        if unified.chosen[MEMBER] == "unified":
            found.append(_as_model_result(unified, budget, count(graph.module)))
    if any(residual_branch(graph, g) for g in graph.prunable_groups):
        try:
            branches = compress(model, calibration_data, budget=replace(budget, residual_branches=True), **settings)
        except BudgetError:
            branches = None
        if branches is not None and not over_budget(branches.plan):
            found.append(branches)
    if not found:  # no structure reaches the budget: the plain compression says why
        return compress(model, calibration_data, budget=budget, **settings)
    if len(found) == 1:
        return found[0]
    # every structure measured on the same samples (read once: a shuffling loader differs each time)
    inputs = evaluation_inputs(calibration_data, batch_size, eval_samples)
    reference = member_outputs(MultiNet({MEMBER: model}, example, *tracing), inputs)
    errors = [member_errors(MultiNet({MEMBER: r.model}, example, *tracing), inputs, reference)[MEMBER] for r in found]
    return found[errors.index(min(errors))]


def _prefixed(budget: Budget) -> Budget:
    return replace(budget, ignore=tuple(f"{MEMBER}.{pattern}" for pattern in budget.ignore))


def _as_model_result(unified, budget: Budget, before) -> CompressResult:
    """The one-member MultiNet with its skip links as a compression result of the model itself
    (``before``: the model's own counts)."""
    net = unified.model
    gm = member_graph(net, MEMBER)
    after = count(gm)
    links = [(_strip(lk.layer), _strip(lk.source_layer)) for lk in net.links]
    reports = [replace(g, producers=[_strip(p) for p in g.producers]) for g in unified.result.groups]
    return CompressResult(gm, reports, before.flops, after.flops, before.params, after.params, "reap",
                          _as_model_plan(unified.plan, budget, before, after), unified.result.cost, skip_links=links)


def _as_model_plan(plan: Plan, budget: Budget, before, after) -> Plan:
    """The schedule of the graph with the skip links, stated against the model as given: its budget, its
    original cost and layer names (the target and costs are absolute, the same in both)."""
    original = getattr(before, plan.metric)
    groups = [replace(g, producers=[_strip(p) for p in g.producers]) for g in plan.groups]
    return replace(plan, budget=budget.as_dict(), original=original, groups=groups,
                   measured_cost=getattr(after, plan.metric))


def member_graph(net: MultiNet, name: str) -> fx.GraphModule:
    """One member of a MultiNet as a plain GraphModule: its layers under their own names (the
    ``name.`` prefix removed) and its own output structure instead of the {member: output} mapping.
    Layers another member owns are kept under their full names (a member may read them)."""
    source = net.graph_module
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    owned: dict[str, object] = {}
    prefix = f"{name}."
    for node in source.graph.nodes:
        if node.op == "output":
            graph.output(fx.node.map_arg(node.args[0][name], lambda n: env[n]))
            continue
        new = graph.node_copy(node, lambda n: env[n])
        if node.op in ("call_module", "get_attr"):
            new.target = node.target[len(prefix):] if node.target.startswith(prefix) else node.target
            owned[new.target] = _fetch(source, node.target)
        env[node] = new
    gm = fx.GraphModule(owned, graph, "GraphModule")
    gm.graph.eliminate_dead_code()  # other members' work that this member does not read
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.meta.update(source.meta)
    if bridged_layers(source):  # the layers that read a concatenation with another source: own names
        mark_bridged(gm, [n[len(prefix):] if n.startswith(prefix) else n for n in bridged_layers(source)])
    return gm


def _fetch(gm: fx.GraphModule, target: str):
    owner, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


def _strip(layer: str) -> str:
    return layer[len(MEMBER) + 1:] if layer.startswith(f"{MEMBER}.") else layer
