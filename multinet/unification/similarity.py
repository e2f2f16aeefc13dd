"""Which other member's tensor best explains a layer's input: least-squares R² from calibration data.

A link lets member B's layer read a tensor of member A, so that B's own input channels can be
reconstructed from A's and removed. Whether that can work is a property of the data, not of the
layers' positions: for B's layer input X_t and A's tensor X_s (rows = samples × positions on the
same spatial grid, columns = channels, both centred), the fraction of X_t's variance a linear
map of X_s explains is R² = tr(C_ts C_ss⁻¹ C_st) / tr(C_tt). All members run on the same batch in
one MultiNet pass, so these are Grams of the concatenated activations. A source on a finer grid
(an earlier stride or pooling) is brought to the target's grid by average pooling when the sizes
divide; other spatial mismatches are not linked.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..calib import batches, iterate_batches
from ..graph import ChannelGraph

_WIDENABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_POOLS = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@dataclass(frozen=True)
class Candidate:
    """Member ``model``'s layer ``layer`` could read the input of member ``source``'s layer
    ``source_layer`` (average-pooled by ``pool`` first when given); ``r2`` is how much of the
    layer's own input that explains."""

    model: str
    layer: str
    source: str
    source_layer: str
    pool: tuple[int, ...] | None
    r2: float


def canonical_order(models: dict[str, nn.Module]) -> list[str]:
    """Members sorted by a digest of their class and weights (names break ties), so the search
    sees the same network whatever order the user lists the models in."""
    def digest(model: nn.Module) -> str:
        h = hashlib.sha256(type(model).__name__.encode())
        for key, value in model.state_dict().items():
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    return sorted(models, key=lambda name: (digest(models[name]), name))


def linkable_layers(graph: ChannelGraph, gm: fx.GraphModule, member: str) -> tuple[dict[str, fx.Node], dict[str, str]]:
    """The member's layers that may read another member's channels ({layer: its call}) and, for its
    other weighted layers, why not."""
    prunable_inputs = {name for g in graph.prunable_groups for name in g.consumer_names}
    calls = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    ok, why = {}, {}
    for name, use in graph.analysis.layers.items():
        if not name.startswith(f"{member}."):
            continue
        reason = _not_linkable(gm, calls.get(name), use, name in prunable_inputs)
        if reason:
            why[name] = reason
        else:
            ok[name] = calls[name]
    return ok, why


def _not_linkable(gm: fx.GraphModule, call: fx.Node | None, use, prunable: bool) -> str | None:
    if call is None:
        return "functional layer (its weight is an attribute, not a module that can be widened)"
    module = gm.get_submodule(call.target)
    if not isinstance(module, _WIDENABLE):
        return f"{type(module).__name__} cannot be widened"
    if len(use.nodes) != 1:
        return f"called {len(use.nodes)} times: widening would widen every call"
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups != 1:
        return "grouped convolution"
    if use.in_segments is None or not prunable:
        return "its input is not a prunable channel group (e.g. the network input)"
    return None


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["tensor_meta"].shape)


def channels_last(gm: fx.GraphModule, layer: str) -> bool:
    """A Linear reads its channels on the last dim (N, ..., C), a conv on dim 1 (N, C, *S)."""
    return isinstance(gm.get_submodule(layer), nn.Linear)


def resampling(source: tuple[int, ...], target: tuple[int, ...], last: bool = False) -> tuple[int, ...] | None | bool:
    """None: same grid; a pooling kernel that brings ``source`` to ``target``'s grid; False: no cheap way.
    ``last``: channels on the last dim (Linear over tokens): the grid is every other dim, never pooled."""
    if len(source) != len(target):
        return False
    if last:
        return None if source[:-1] == target[:-1] else False
    if source[2:] == target[2:]:
        return None
    if len(source) - 2 not in _POOLS or any(s % t or s < t for s, t in zip(source[2:], target[2:])):
        return False
    return tuple(s // t for s, t in zip(source[2:], target[2:]))


def pooled(x: torch.Tensor, pool: tuple[int, ...] | None) -> torch.Tensor:
    return x if pool is None else _POOLS[x.dim() - 2](x, pool)


def skip_conflicts(graph: ChannelGraph) -> set[tuple[str, str]]:
    """(layer, source layer) pairs of one member that a skip link must not join: the source layer's
    input is in a channel group the layer already reads (a residual stream: nothing could be removed)
    or writes (the layer would read its own output channels: cutting them would change its input and
    its output at once)."""
    reads: dict[str, set[int]] = {}
    writes: dict[str, set[int]] = {}
    for g in graph.groups:
        for name in g.consumer_names:
            reads.setdefault(name, set()).add(g.id)
        for name in g.producers:
            writes.setdefault(name, set()).add(g.id)
    return {(layer, source) for layer in reads for source in reads
            if reads[source] & (reads[layer] | writes.get(layer, set()))}


def score_candidates(gm: fx.GraphModule, targets: dict[str, list[str]], data, batch_size: int = 128,
                     samples: int = 512, damp: float = 1e-3, conflicts: set[tuple[str, str]] | None = None
                     ) -> list[Candidate]:
    """R² of every (target layer, source layer input) pair that a resampling can align.

    ``targets``: per member, its linkable layers. Sources are the inputs of every member's
    linkable layers: another member's, and, when ``conflicts`` is given (skip links), the member's
    own *earlier* tensors: reading one, a layer can stand in for the whole layer between them (REAP may
    then remove that layer's channels entirely). ``conflicts``: the pairs never skip-linked
    (:func:`skip_conflicts`). One pass of the network over the first ``samples`` calibration samples."""
    calls = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    layers = {layer: member for member, names in targets.items() for layer in names}
    wanted = {calls[layer].args[0].name for layer in layers}
    values = _capture(gm, wanted, data, batch_size, samples)
    out = []
    for layer, member in layers.items():
        xt = values[calls[layer].args[0].name]
        last = channels_last(gm, layer)
        earlier = ancestors(calls[layer].args[0]) if conflicts is not None else set()
        for source_layer, source in layers.items():
            if source == member and (calls[source_layer].args[0] not in earlier
                                     or (layer, source_layer) in conflicts):
                continue  # a skip link reads an earlier tensor of a group the layer neither reads nor writes
            if channels_last(gm, source_layer) != last:
                continue  # a Linear's tokens and a conv's pixels are not the same rows
            xs = values[calls[source_layer].args[0].name]
            pool = resampling(tuple(xs.shape), tuple(xt.shape), last)
            if pool is not False:
                out.append(Candidate(member, layer, source, source_layer, pool,
                                     held_out_r2(_rows(xt, None, last), _rows(xs, pool, last), damp)))
    return out


def ancestors(node: fx.Node) -> set[fx.Node]:
    """Every node ``node`` depends on (itself excluded)."""
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _capture(gm: fx.GraphModule, wanted: set[str], data, batch_size: int, samples: int) -> dict[str, torch.Tensor]:
    """The values of the named nodes over the first ``samples`` inputs (concatenated over batches)."""
    got: dict[str, list[torch.Tensor]] = {name: [] for name in wanted}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n.name in got:
                got[n.name].append(value.detach())
            return value

    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    seen = 0
    with torch.no_grad():
        for batch in iterate_batches(data, batch_size):
            batch = batches.take(batch, 0, samples - seen)
            Recorder(gm).run(*batches.as_args(batches.to_device(batch, device), batches.input_names(gm)))
            seen += batches.size(batch)
            if seen >= samples:
                break
    return {name: torch.cat(parts).cpu() for name, parts in got.items()}


def _rows(x: torch.Tensor, pool, last: bool = False) -> torch.Tensor:
    """(N, C, *S) -> (N·|S|, C), or (N, ..., C) -> (N·..., C) for channels last; float64, rows
    grouped by sample."""
    if last:
        return x.reshape(-1, x.shape[-1]).double()
    x = pooled(x, pool)
    return x.movedim(1, -1).reshape(-1, x.shape[1]).double()


def held_out_r2(target: torch.Tensor, source: torch.Tensor, damp: float) -> float:
    """R² of a ridge least-squares fit of ``target`` from ``source``, fitted on the first half of the
    rows (samples) and measured on the second: a wide source explains few samples perfectly, so an
    in-sample R² would prefer width over similarity."""
    half = len(target) // 2
    mean_t, mean_s = target[:half].mean(0), source[:half].mean(0)
    ft, fs = target[:half] - mean_t, source[:half] - mean_s
    gram = fs.T @ fs
    gram.diagonal().add_(damp * float(gram.diagonal().mean().clamp_min(1e-30)))
    w = torch.linalg.solve(gram, fs.T @ ft)
    test = target[half:] - target[half:].mean(0)
    residual = target[half:] - mean_t - (source[half:] - mean_s) @ w
    total = float((test ** 2).sum())
    return 1.0 - float((residual ** 2).sum()) / total if total > 0 else 0.0
