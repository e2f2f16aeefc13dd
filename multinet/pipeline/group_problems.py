"""The least-squares problems one channel group poses to its consumers, built from a traced model.

Shared by sequential compression (statistics of the model compressed so far against the original)
and the scheduler (one-shot statistics of the original model). Every consumer's problem aims at the
*original* model's outputs; errors are normalised by each consumer's output energy so consumers of
different scale add up fairly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import MultinetError
from ..graph import ChannelGraph
from ..solve import ConsumerProblem, reap_greedy_multi, reconstruct_multi
from ..solve.pairs import unify_pairs
from ..solve.problem import prepare_gram, removed_columns
from ..solve.reap import invert
from ..solve.selection import lowest, magnitude_scores, random_channels
from .consumer_weights import (consumer_matrix, consumer_weight, has_bias_row, layer_weight, output_count, output_major,
                               transposed)


class ConsumerLayout(NamedTuple):
    """How a problem's weight goes back into its layer."""
    name: str
    shape: tuple[int, ...]  # the layer's weight shape
    has_bias: bool
    scale: torch.Tensor | None  # the BatchNorm output weighting the problem's weight carries
    transposed: bool = False  # a transposed conv (weight (in, out, *kernel); consumer_weights.output_major)

    @property
    def outputs(self) -> int:
        return self.shape[1] if self.transposed else self.shape[0]


def _output_scale(gm: fx.GraphModule, graph: ChannelGraph, name: str) -> torch.Tensor | None:
    """gamma/sigma of a BatchNorm that directly follows the consumer: errors count where they matter."""
    nodes = {n.name: n for n in gm.graph.nodes}
    node = nodes[graph.analysis.layers[name].nodes[0]]
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module":
        bn = gm.get_submodule(users[0].target)
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_var is not None:
            gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)
            return (gamma.abs() / torch.sqrt(bn.running_var + bn.eps)).double().cpu().clamp_min(1e-8)
    return None


def group_problems(current: ChannelGraph, original: ChannelGraph, group, stats, damp: float, surviving,
                   column_index=None):
    """One least-squares problem per consumer, aimed at the original model's outputs. ``column_index``
    maps a consumer's full-width input columns to the rows of statistics from which other groups'
    removed columns were taken out (the cached-input pipeline keeps the model at full width)."""
    problems, layout = [], []
    inverses = _SharedInverses(damp)
    for name in group.consumer_names:
        w_cur = consumer_weight(current.module, name)[0]
        has_bias = has_bias_row(current.module, name)
        s = stats[name]
        gram = s.gram
        cross = s.cross if s.cross is not None else s.gram  # one-shot: the model is its own reference
        outputs = surviving.get(name, torch.arange(output_count(original.module, name)))
        # (m_ref + 1) x d for the outputs still present, float64 on the CPU like the statistics (the ones
        # column is in every cross term, so the target always has its bias row: zero without a bias)
        target = consumer_matrix(original.module, name, bias_row=True, outputs=outputs)
        drift = _drift_columns(s.drift, outputs)
        # X^T Y_ref: accumulated as such (target_cross) or as X^T X_ref times the original weights
        rhs = s.target_cross.double()[:, outputs] if s.target_cross is not None else cross.double() @ target
        if not has_bias:
            gram, rhs = gram[:-1, :-1], rhs[:-1]
            drift = drift[:-1] if drift is not None else None
        # the full-column least-squares fit of the original outputs is the weight REAP starts from; the
        # solver starts from the same damped inverse (one factorisation, one damping rule)
        inverse = inverses.of(gram)
        scale = _output_scale(current.module, current, name)
        if scale is not None and len(scale) != rhs.shape[1]:
            scale = scale[outputs]  # a full-width model's BatchNorm still has the removed outputs
        if scale is not None:
            rhs = rhs * scale[None]
        if drift is not None:  # a stream writer also cancels the drift its stream carries (after any BatchNorm)
            rhs = rhs + drift
        weight = inverse @ rhs
        energy = float((weight * rhs).sum().clamp_min(1e-30))  # w^T G w, as G w = rhs up to the damping
        slots = [sl for sl in group.consumers if sl.consumer == name]
        channels, columns = _merge_slots(slots)
        if column_index is not None:
            columns = column_index[name][columns]
        problems.append(ConsumerProblem(gram, weight, channels, columns, 1.0 / energy, inverse))
        layout.append(ConsumerLayout(name, tuple(w_cur.shape), has_bias, scale, transposed(current.module, name)))
    return problems, layout


class _SharedInverses:
    """The damped inverse of each distinct Gram among a group's consumers: the readers of one tensor (a
    residual stream's blocks, q/k/v) have equal statistics, and one m^3 factorisation serves them all."""

    def __init__(self, damp: float):
        self.damp, self.seen = damp, []

    def of(self, gram: torch.Tensor) -> torch.Tensor:
        for known, inverse in self.seen:
            if known.shape == gram.shape and torch.equal(known, gram):
                return inverse
        inverse = invert(prepare_gram(gram, self.damp)[0], self.damp > 0)
        self.seen.append((gram, inverse))
        return inverse


def _drift_columns(drift: torch.Tensor | None, outputs: torch.Tensor) -> torch.Tensor | None:
    """A writer's drift term X^T (r_ref - r) for the outputs it still has (all of them: the writers of a
    pruned stream get none, see graph.streams; a full-width model keeps their indices anyway)."""
    return None if drift is None else drift.double()[:, outputs]


def _merge_slots(slots):
    """A channel entering one consumer twice (cat([y, y])) occupies both column blocks."""
    per_channel: dict[int, list[torch.Tensor]] = {}
    for slot in slots:
        for c, cols in zip(slot.channels.tolist(), slot.column_blocks()):
            per_channel.setdefault(c, []).append(cols)
    channels = sorted(per_channel)
    return torch.tensor(channels), torch.stack([torch.cat(per_channel[c]) for c in channels])


def relative_error(problems, weights) -> float:
    total = 0.0
    for p, w in zip(problems, weights):
        delta = p.weight.double() - w.double()
        total += p.scale * float((delta * (p.gram @ delta)).sum())
    return total


def zero_removed(problem: ConsumerProblem, removed: list[int]) -> torch.Tensor:
    weight = problem.weight.clone()
    weight[removed_columns(problem, removed)] = 0
    return weight


def to_layer_weights(problems, weights, layout, removed) -> dict:
    out = {}
    for p, w, (name, shape, has_bias, scale, is_transposed) in zip(problems, weights, layout):
        if scale is not None:
            w = w / scale[None]
        drop = removed_columns(p, removed)
        if has_bias:
            drop[-1] = True
        kept = w[~drop]
        layer_w = layer_weight(kept, shape, is_transposed).float()
        out[name] = (layer_w, w[-1].float()) if has_bias else layer_w
    return out


@dataclass
class GroupSolution:
    removed: list[int]
    problems: list[ConsumerProblem]  # on the CPU
    weights: list[torch.Tensor] | None  # per problem, in its layout; None: the consumers keep their weights
    layout: list[tuple]  # (consumer, layer weight shape, has_bias, BatchNorm output scale) per problem
    error: float


def solve_group(current: ChannelGraph, original: ChannelGraph, group, n_remove: int, method: str, stats, damp: float,
                device: str, seed: int, surviving, preset=None, column_index=None) -> GroupSolution:
    """Select the group's removed channels (REAP, unify, magnitude, random or a preset) and re-solve its
    consumers from statistics, however they were gathered (full passes or cached inputs)."""
    if group.grouped_conv:  # equal counts per conv group, one problem per conv group (see grouped_conv.py)
        from .grouped_conv import solve_grouped
        return solve_grouped(current, original, group, n_remove, method, stats, damp, device, seed, surviving,
                             preset, column_index)
    if preset is not None:
        removed = preset
    elif method == "random":
        removed = random_channels(group.size, n_remove, seed, group.pieces)
    elif method in ("magnitude", "magnitude+ls"):
        removed = lowest(_magnitude(current, group), n_remove, group.pieces)
    else:
        removed = None
    problems, layout = group_problems(current, original, group, stats, damp, surviving, column_index)
    problems = [p.to(device) for p in problems]  # the solve runs on the run's device
    if method == "unify" and preset is None:
        if not all(entry.has_bias for entry in layout):
            raise MultinetError(f"unify needs a bias in every consumer of group {group.id} (a functional layer "
                                f"without one cannot absorb the affine offset); use method='reap'")
        removed, weights, _ = unify_pairs(problems, group.size, n_remove, group.pieces)
    elif removed is None:  # REAP selects, and reconstructs on the way
        result = reap_greedy_multi(problems, group.size, n_remove, damp, group.pieces)
        removed, weights = result.removed, result.weights
        error = float(result.errors.sum())  # the steps' errors add up to the total: no m x m x d product
    else:
        weights = weights_for_selection(method, problems, removed, damp)
    problems, weights = on_cpu(problems, weights)
    if method != "reap" or preset is not None:
        error = relative_error(problems, weights)
    if method in ("magnitude", "random"):
        return GroupSolution(removed, problems, None, layout, error)
    return GroupSolution(removed, problems, weights, layout, error)


def weights_for_selection(method: str, problems, removed: list[int], damp: float) -> list[torch.Tensor]:
    """Consumer weights for channels chosen by someone else (a plan, magnitude, random): re-solved
    by least squares for reap and magnitude+ls, the removed columns only zeroed otherwise."""
    if method in ("magnitude+ls", "reap"):
        return reconstruct_multi(problems, removed, damp)
    return [zero_removed(p, removed) for p in problems]


def on_cpu(problems, weights) -> tuple[list[ConsumerProblem], list[torch.Tensor]]:
    """Problems and weights back on the CPU, where surgery and the write-back run."""
    return [p.to("cpu") for p in problems], [w.cpu() for w in weights]


def _magnitude(graph: ChannelGraph, group) -> torch.Tensor:
    table = graph.analysis.table
    weights = {}
    for space, _ in group.members:
        sp = table.spaces[space]
        if sp.kind == "producer":
            weight = consumer_weight(graph.module, sp.owner)[0]  # its output rows first, whatever the layer
            weights[sp.owner] = output_major(weight, transposed(graph.module, sp.owner))
    sizes = {s: table.spaces[s].size for s, _ in group.members}
    owners = {s: table.spaces[s].owner for s, _ in group.members}
    return magnitude_scores(group, weights, sizes, owners)
