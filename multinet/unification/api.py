"""``multinet.unify``: several models on one input -> one network that computes what they share once."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
import torch.fx as fx

from ..calib import collect, consumer_specs, iterate_batches
from ..errors import MultinetError
from ..pipeline.compression import CompressResult, compress
from ..graph import count, trace
from ..schedule import Budget, Plan
from .bridges import Bridge, add_bridges, links_of
from .multinet import MultiNet, model_costs, named_models, surviving_links


@dataclass
class Match:
    """A removed channel of a later model and the earlier model's channel that best stands in for it."""

    model: str
    layer: str  # the layer that read the removed channel (it now reads the other model's channels)
    channel: int  # position in that layer's own input
    other_model: str
    other_layer: str  # whose input holds the stand-in channel; "(bias)" for a constant channel
    other_channel: int  # -1 for a constant channel
    alpha: float  # removed ≈ alpha * stand-in + beta, over the calibration data
    beta: float
    r2: float


@dataclass
class Unified:
    model: MultiNet  # forward(x) -> {model name: output}; its links are the bridges that survived
    names: list[str]
    bridges: list[Bridge]
    costs_before: dict[str, dict[str, int]]  # per model, "shared" and "total": flops and params
    costs_after: dict[str, dict[str, int]]
    plan: Plan | None
    matches: list[Match] = field(default_factory=list)
    channels: dict[str, int] = field(default_factory=dict)  # per model: channels of its groups before unification
    result: CompressResult | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        out = asdict(self)
        for key in ("model", "result"):
            out.pop(key)
        out["summary"] = self.summary()
        return out

    def summary(self) -> list[dict]:
        """Per model: FLOPs before -> after, channels of its groups (all of them, outputs included) before ->
        after, groups removed entirely, and how many of its channels another model stands in for."""
        rows = []
        groups = self.plan.groups if self.plan else []
        for name in self.names:
            mine = [g for g in groups if g.producers and all(p.startswith(f"{name}.") for p in g.producers)]
            before = self.channels.get(name, 0)
            rows.append(dict(
                model=name, flops_before=self.costs_before[name]["flops"], flops_after=self.costs_after[name]["flops"],
                channels_before=before, channels_after=before - sum(len(g.removed) for g in mine),
                groups_removed=sum(1 for g in mine if g.kept == 0),
                replaced_by_other_models=sum(1 for m in self.matches if m.model == name and m.other_channel >= 0),
            ))
        rows.append(dict(model="shared", flops_before=self.costs_before["shared"]["flops"],
                         flops_after=self.costs_after["shared"]["flops"]))
        return rows


def unify(models, calibration_data, budget: Budget | float = 0.5, schedule: str = "auto", example_inputs=None,
          batch_size: int = 128, **compress_options) -> Unified:
    """Merge models that read the same input into one MultiNet and compress it to ``budget``.

    ``models``: {name: model}, (name, model) pairs, or a list. ``budget``: a Budget, or a FLOPs
    fraction of all the models together. Each later model's layers may read earlier models'
    channels (bridges found from shapes); the schedule then decides, with REAP, which channels of
    every model to remove, and a later model's channels that earlier ones can stand in for go
    away entirely. ``compress_options`` are passed to :func:`multinet.compress`.
    """
    named = named_models(models)
    if not isinstance(budget, Budget):
        budget = Budget(flops=budget)
    example = example_inputs
    if example is None:
        example = next(iter(iterate_batches(calibration_data, batch_size)))[:1]
    net = MultiNet(named, example)
    bridged, bridges = add_bridges(net, example)
    result = compress(bridged, calibration_data, budget=_relative_to(budget, net.graph_module, bridged),
                      schedule=schedule, batch_size=batch_size, **compress_options)
    model = MultiNet.from_graph(result.model, list(named), surviving_links(links_of(bridges), result.model))
    matches = _matches(bridged, bridges, result.plan, calibration_data, example, batch_size)
    channels = {name: sum(g.size for g in trace(net.graph_module, example).groups
                          if g.producers and all(p.startswith(f"{name}.") for p in g.producers)) for name in named}
    return Unified(model, list(named), bridges, model_costs(net), model_costs(model, example), result.plan, matches,
                   channels, replace(result, model=model))


def compress_multinet(net: MultiNet, calibration_data, **options) -> CompressResult:
    """:func:`multinet.compress` for a MultiNet: compresses its graph, and the result's model is
    a MultiNet again (same members; links to layers that survived). The pipeline works on the
    unfused graph, where every member keeps its own layers and channel groups."""
    if not isinstance(net, MultiNet):
        raise MultinetError(f"compress_multinet takes a MultiNet, got {type(net).__name__}")
    if net.is_fused:
        raise MultinetError("this MultiNet is fused (for inference); compress the unfused one it came from")
    result = compress(net.graph_module, calibration_data, **options)
    return replace(result, model=net.with_graph(result.model))


def _relative_to(budget: Budget, net: fx.GraphModule, bridged: fx.GraphModule) -> Budget:
    """The budget is a fraction of the models as given; bridges widen layers (zero weights), so
    the same absolute cost is a smaller fraction of the bridged network."""
    if budget.metric == "latency":
        return budget
    before, after = count(net), count(bridged)
    key = budget.metric
    fraction = getattr(budget, key) * getattr(before, key) / getattr(after, key)
    return replace(budget, **{key: fraction})


def _matches(bridged: fx.GraphModule, bridges: list[Bridge], plan: Plan | None, data, example,
             batch_size: int) -> list[Match]:
    """For every channel a bridged layer lost, the earlier model's channel with the best affine fit."""
    if plan is None or not bridges:
        return []
    graph = trace(bridged, example)
    removed = plan.removals()
    lost: dict[str, list[tuple[int, int]]] = {}  # bridged layer -> [(position, column)] of its own lost inputs
    gone_sources: dict[str, set[int]] = {}  # bridged layer -> positions of earlier models' removed channels
    by_name = {b.consumer: b for b in bridges}
    for gid, channels in removed.items():
        for slot in graph.group(gid).consumers:
            if slot.consumer not in by_name:
                continue
            shared = sum(w for _, _, w in by_name[slot.consumer].sources)
            gone = torch.isin(slot.channels, torch.tensor(channels))
            centre = slot.columns_per_position * slot.block // 2
            for pos, cols in zip(slot.positions[gone].tolist(), slot.column_blocks()[gone]):
                if pos >= shared:
                    lost.setdefault(slot.consumer, []).append((pos, int(cols[centre])))
                else:  # the earlier model lost it too: it cannot stand in
                    gone_sources.setdefault(slot.consumer, set()).add(pos)
    if not lost:
        return []
    stats = collect(graph.module, consumer_specs(graph, list(lost)), data, batch_size=batch_size, max_positions=64)
    out = []
    for layer, items in lost.items():
        bridge = by_name[layer]
        g = stats[layer].gram
        n = g[-1, -1]
        mean = g[:-1, -1] / n
        cov = g[:-1, :-1] / n - mean[:, None] * mean[None, :]
        per_position = graph.analysis.layers[layer].columns_per_position
        starts = [0]
        for _, _, width in bridge.sources:
            starts.append(starts[-1] + width)
        shared = starts[-1]
        lost_cols = torch.tensor([col for _, col in items])
        # every lost channel against every earlier-model channel at once, at the same tap
        src_cols = torch.arange(shared)[None, :] * per_position + (lost_cols % per_position)[:, None]
        var_lost = cov[lost_cols, lost_cols]
        var_src = cov[src_cols, src_cols].clamp_min(1e-30)
        r2 = cov[lost_cols[:, None], src_cols] ** 2 / (var_lost.clamp_min(1e-30)[:, None] * var_src)
        r2[:, torch.isin(torch.arange(shared), torch.tensor(sorted(gone_sources.get(layer, ())), dtype=torch.long))] = -1
        best = torch.argmax(r2, 1)
        constant = var_lost <= 1e-12 * cov.diagonal().max().clamp_min(1e-30)  # the bias stands in
        for i, (pos, col) in enumerate(items):
            if constant[i]:
                out.append(Match(bridge.model, layer, pos - shared, bridge.model, "(bias)", -1, 0.0,
                                 float(mean[col]), 1.0))
                continue
            j = int(best[i])
            source = next(s for s in range(len(bridge.sources)) if starts[s] <= j < starts[s + 1])
            model, other_layer, _ = bridge.sources[source]
            alpha = float(cov[col, src_cols[i, j]] / var_src[i, j])
            out.append(Match(bridge.model, layer, pos - shared, model, other_layer, j - starts[source], alpha,
                             float(mean[col] - alpha * mean[src_cols[i, j]]), float(r2[i, j])))
    return out
