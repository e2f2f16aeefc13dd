"""Grouped convolutions: the same number of channels from every conv group, chosen by REAP.

Structure. A conv with ``groups=G`` (1 < G < channels) touches two channel groups:

* its *input* group (ResNeXt/RegNet: the 1x1 conv before it). The grouped conv is a consumer whose
  output block g reads only input block g, so its least-squares problem is block diagonal: one
  independent problem per conv group, with the Gram of that block's columns (plus the bias column)
  and the weights of that block's outputs. A removed channel of block g is re-solved from the other
  channels of block g only; other blocks do not move.
* its *output* group (the 1x1 conv after it; RegNetY's squeeze-and-excitation reads it too). Its
  consumers are ordinary dense layers: the usual problems, only the counts are constrained.

Either way ``groups`` stays valid only if every conv group keeps equally many channels
(``ChannelGroup.balanced``: one partition per grouped conv). Depthwise convs (groups == channels)
are not grouped here: the analysis treats them as pass-through (each channel runs through its own
filter and cannot be re-solved from the others), so their channels belong to the group around them
and are reconstructed at the dense consumers after them, as before.

Selection: **one joint greedy, constrained to equal counts round by round.** Removals come in rounds
of ``step`` = lcm of the partitions' sizes; in round r every conv group may lose at most r * step / G
channels, and the cheapest allowed channel (REAP's error after reconstruction, summed over all
consumers' problems) goes first. Why this form:

* on a grouped consumer (block-diagonal problems) removing a channel of block g leaves the scores of
  every other block unchanged, so the joint greedy makes exactly the choices of an independent REAP
  greedy per conv group with n/G removals each (tested);
* on the dense consumers of a grouped conv's outputs the blocks are coupled (what block g loses
  changes what block h's channels are worth); a per-conv-group greedy would ignore that, the joint
  greedy sees it;
* every prefix of ``step`` removals is balanced, so one pass gives a nested removal order and its
  error curve E(k) at every allowed count, which is what the scheduler needs; compress with a count
  takes the prefix of the same order. Per-step errors still add up to the total error.

The hooks elsewhere are small: ``solve_group`` hands grouped groups to :func:`solve_grouped`; the
reference path, the cached-input pipeline and the one-shot ``MaskedModel`` write weights back through
:func:`grouped_layer_weights`, :func:`write_grouped_full_width`, :func:`zero_grouped_columns` and
:class:`GroupedConsumer`; ``schedulable_groups`` and ``compress`` count in :func:`removal_step`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.fx as fx

from ..errors import MultinetError
from ..graph import ChannelGraph
from ..solve import ConsumerProblem, reap_greedy_multi
from ..solve.problem import SolverInputError, prepare_gram, removed_columns
from ..solve.reap import ReapResult, invert, protected
from ..solve.refit import ColumnRefit
from .consumer_weights import consumer_weight, layer_weight, weight_matrix, write_matrix
from .group_problems import (ConsumerLayout, GroupSolution, _magnitude, _merge_slots, _output_scale, group_problems,
                             on_cpu, relative_error, to_layer_weights, weights_for_selection)


# --- counts -----------------------------------------------------------------------------------

def removal_step(group) -> int | None:
    """Removals come in multiples of this (1 for a group without grouped convs); None when the
    conv-group partitions do not cover the group evenly (the group then stays whole)."""
    if not group.grouped_conv:
        return 1
    if not group.balanced:
        return None
    for blocks in group.balanced:
        sizes = {len(b) for b in blocks}
        covered = torch.unique(torch.cat(list(blocks))) if blocks else torch.zeros(0, dtype=torch.long)
        if len(sizes) != 1 or sizes == {0} or len(covered) != group.size:
            return None
    return math.lcm(*(len(blocks) for blocks in group.balanced))


def removal_count(group, ratio: float) -> int:
    """Channels to remove for ``ratio``: floor(ratio * size) keeping one channel, or for a grouped
    conv the nearest multiple of its step that keeps a channel in every conv group."""
    step = removal_step(group)
    if step == 1 or step is None:
        return min(math.floor(ratio * group.size + 1e-9), group.size - 1)
    rounded = step * round(ratio * group.size / step)
    return max(0, min(rounded, group.size - step))


def _block_of(partitions, n_channels: int) -> list[torch.Tensor]:
    """Per partition: each channel's conv group."""
    owners = []
    for blocks in partitions:
        owner = torch.full((n_channels,), -1, dtype=torch.long)
        for b, chans in enumerate(blocks):
            owner[chans] = b
        owners.append(owner)
    return owners


def _allowed(alive: torch.Tensor, step_index: int, step: int, owners, pieces) -> torch.Tensor:
    """Channels that may go at this step: alive, not the last of a split piece, and in a conv group
    of every partition that has not yet lost its share of the current round."""
    allowed = alive & ~protected(alive, pieces)
    rnd = step_index // step + 1
    for owner in owners:
        parts = int(owner.max()) + 1
        quota = rnd * step // parts
        lost = torch.bincount(owner[~alive], minlength=parts)
        allowed &= lost[owner] < quota
    return allowed


def _check(n_channels: int, n_remove: int, step: int) -> None:
    if n_remove % step or not 0 <= n_remove <= n_channels - step:
        raise SolverInputError(f"a grouped conv's group of {n_channels} channels loses multiples of {step} "
                               f"(the same number from every conv group, one kept in each), not {n_remove}")


def balanced_order(order: torch.Tensor, n_remove: int, partitions, pieces=()) -> list[int]:
    """The first ``n_remove`` channels of ``order`` (magnitude, random) that keep the counts balanced."""
    n = len(order)
    step = math.lcm(*(len(p) for p in partitions)) if partitions else 1
    _check(n, n_remove, step)
    owners = _block_of(partitions, n)
    alive = torch.ones(n, dtype=torch.bool)
    pieces = list(pieces)
    removed = []
    for i in range(n_remove):
        allowed = _allowed(alive, i, step, owners, pieces)
        c = next((int(c) for c in order.tolist() if allowed[c]), None)
        if c is None:
            raise SolverInputError("no channel keeps the conv groups balanced")
        alive[c] = False
        removed.append(c)
    return removed


# --- the greedy --------------------------------------------------------------------------------

def balanced_greedy(problems: list[ConsumerProblem], n_channels: int, n_remove: int, damp: float,
                    partitions, pieces=()) -> ReapResult:
    """REAP's inverse-form greedy (solve/reap.py) constrained to equal counts per conv group, round
    by round (module doc). With no partitions it makes the same choices as reap_greedy_multi."""
    step = math.lcm(*(len(p) for p in partitions)) if partitions else 1
    _check(n_channels, n_remove, step)
    device = problems[0].gram.device if problems else torch.device("cpu")
    owners = [o.to(device) for o in _block_of(partitions, n_channels)]
    pieces = [piece.to(device) for piece in pieces]
    return reap_greedy_multi(problems, n_channels, n_remove, damp, pieces,
                             may_go=lambda alive, i: _allowed(alive, i, step, owners, pieces),
                             why_stuck="no channel keeps the conv groups balanced")


# --- the problems ------------------------------------------------------------------------------

@dataclass
class ConvBlock:
    """Where a block problem's weight goes: conv group ``g`` of grouped consumer ``name``; ``rows``
    are its outputs' rows in the current layer's weight."""

    name: str
    g: int
    groups: int
    rows: torch.Tensor


@dataclass
class GroupedSolution(GroupSolution):
    blocks: list[ConvBlock | None] = None  # per problem: its conv group, or None for a dense consumer


def _conv_groups(graph: ChannelGraph, name: str) -> int:
    use = graph.analysis.layers.get(name)
    return use.conv_groups if use is not None else 1


def grouped_problems(current: ChannelGraph, original: ChannelGraph, group, stats, damp: float, surviving,
                     column_index=None):
    """``group_problems`` for a group that a grouped conv reads or writes: dense consumers as usual,
    a grouped consumer as one problem per conv group. Returns (problems, layout, blocks)."""
    grouped = [n for n in group.consumer_names if _conv_groups(original, n) > 1]
    dense = replace(group, consumers=[s for s in group.consumers if s.consumer not in grouped])
    problems, layout = (group_problems(current, original, dense, stats, damp, surviving, column_index)
                        if dense.consumers else ([], []))
    blocks: list[ConvBlock | None] = [None] * len(problems)
    for name in grouped:
        ps, ls, bs = _block_problems(current, original, group, name, stats[name], damp, surviving, column_index)
        problems += ps
        layout += ls
        blocks += bs
    return problems, layout, blocks


def _block_problems(current: ChannelGraph, original: ChannelGraph, group, name: str, s, damp: float, surviving,
                    column_index):
    module = current.module.get_submodule(name)
    w_cur = module.weight
    w_ref, b_ref, _ = consumer_weight(original.module, name)
    groups = module.groups
    gram = s.gram
    if s.cross is None and s.target_cross is not None:
        raise MultinetError(f"grouped conv `{name}` needs the full cross term, not one taken through its weights")
    cross = s.cross if s.cross is not None else s.gram
    m = gram.shape[0]
    if column_index is not None and not torch.equal(column_index[name], torch.arange(len(column_index[name]))):
        raise MultinetError(f"grouped conv `{name}` reads channels another group already removed")
    if cross.shape != gram.shape or (m - 1) % groups:
        raise MultinetError(f"statistics of grouped conv `{name}` do not match its {groups} conv groups")
    width = (m - 1) // groups  # input columns per conv group (in_channels / groups * kh * kw)
    outputs = surviving.get(name, torch.arange(w_ref.shape[0]))
    out_per = w_ref.shape[0] // groups
    full_width = w_cur.shape[0] != len(outputs)  # the cached-input pipeline keeps removed outputs
    reference = weight_matrix(w_ref, b_ref)  # (width + 1) x out: every conv group's columns over its outputs
    scale = _output_scale(current.module, current, name)
    if scale is not None and len(scale) != len(outputs):
        scale = scale[outputs]
    slots = [sl for sl in group.consumers if sl.consumer == name]
    channels, columns = _merge_slots(slots)  # full im2col columns of the layer's input
    owner = columns // width
    if not (owner == owner[:, :1]).all():
        raise MultinetError(f"a channel of group {group.id} enters two conv groups of `{name}`")
    owner = owner[:, 0]
    problems, layout, blocks, energy = [], [], [], 0.0
    for g in range(groups):
        idx = torch.cat([torch.arange(g * width, (g + 1) * width), torch.tensor([m - 1])])
        gram_g, cross_g = gram[idx][:, idx], cross[idx][:, idx]
        in_g = (outputs // out_per) == g
        out_g = outputs[in_g]
        target = reference[:, out_g]
        rhs = cross_g.double() @ target
        scale_g = scale[in_g] if scale is not None else None
        if scale_g is not None:
            rhs = rhs * scale_g[None]
        weight = invert(prepare_gram(gram_g, damp)[0], damp > 0) @ rhs  # the full-column fit of the original
        energy += float((weight * rhs).sum())
        mine = owner == g
        problems.append(ConsumerProblem(gram_g, weight, channels[mine], columns[mine] - g * width))
        layout.append(ConsumerLayout(name, tuple(w_cur.shape), True, scale_g))
        blocks.append(ConvBlock(name, g, groups, out_g if full_width else in_g.nonzero().flatten()))
    for p in problems:  # the consumer's errors as a fraction of its whole output energy, like a dense one's
        p.scale = 1.0 / max(energy, 1e-30)
    return problems, layout, blocks


# --- the solve -----------------------------------------------------------------------------------

def solve_grouped(current: ChannelGraph, original: ChannelGraph, group, n_remove: int, method: str, stats,
                  damp: float, device: str, seed: int, surviving, preset=None, column_index=None) -> GroupedSolution:
    """``solve_group`` for a group that a grouped conv reads or writes (see the module doc)."""
    step = removal_step(group)
    if step is None:
        raise MultinetError(f"group {group.id}: its conv groups do not split it evenly; it cannot be pruned")
    partitions = group.balanced
    if preset is not None:
        removed = list(preset)
        if not group.is_balanced(sorted(set(range(group.size)) - set(removed))):
            raise MultinetError(f"group {group.id}: removing {sorted(removed)} leaves its conv groups unequal")
    elif method == "random":
        order = torch.randperm(group.size, generator=torch.Generator().manual_seed(seed))
        removed = balanced_order(order, n_remove, partitions, group.pieces)
    elif method in ("magnitude", "magnitude+ls"):
        removed = balanced_order(torch.argsort(_magnitude(current, group), stable=True), n_remove, partitions,
                                 group.pieces)
    elif method == "unify":
        raise MultinetError(f"unify cannot pair channels across the conv groups of group {group.id} yet; "
                            f"use method='reap'")
    else:
        removed = None
    problems, layout, blocks = grouped_problems(current, original, group, stats, damp, surviving, column_index)
    problems = [p.to(device) for p in problems]
    if removed is None:
        result = balanced_greedy(problems, group.size, n_remove, damp, partitions, group.pieces)
        removed, weights = result.removed, result.weights
    else:
        weights = weights_for_selection(method, problems, removed, damp)
    problems, weights = on_cpu(problems, weights)
    error = relative_error(problems, weights)
    keep_weights = method not in ("magnitude", "random")
    return GroupedSolution(removed, problems, weights if keep_weights else None, layout, error, blocks)


def _dense_part(solution: GroupedSolution) -> GroupSolution:
    pick = [i for i, b in enumerate(solution.blocks) if b is None]
    return GroupSolution(solution.removed, [solution.problems[i] for i in pick],
                         None if solution.weights is None else [solution.weights[i] for i in pick],
                         [solution.layout[i] for i in pick], solution.error)


def _grouped_parts(solution: GroupedSolution):
    """Per grouped consumer: [(problem, weight, layout, block)] over its conv groups."""
    out: dict[str, list] = {}
    for i, b in enumerate(solution.blocks):
        if b is not None:
            w = solution.weights[i] if solution.weights is not None else None
            out.setdefault(b.name, []).append((solution.problems[i], w, solution.layout[i], b))
    return out


def grouped_layer_weights(solution: GroupedSolution) -> dict:
    """The reference path's consumer weights in the pruned shapes: dense layers as usual, a grouped
    conv's conv groups side by side (output block g reads the kept channels of input block g)."""
    dense = _dense_part(solution)
    out = to_layer_weights(dense.problems, dense.weights, dense.layout, solution.removed) if dense.problems else {}
    for name, parts in _grouped_parts(solution).items():
        shape = parts[0][2][1]
        kept_per = None
        weight = bias = None
        for p, w, (_, _, _, scale, _), b in parts:
            if scale is not None:
                w = w / scale[None]
            drop = removed_columns(p, solution.removed)
            drop[-1] = True
            kept = w[~drop]
            per = kept.shape[0] // math.prod(shape[2:])
            if kept_per is not None and per != kept_per:
                raise MultinetError(f"`{name}`: conv groups keep unequal channel counts")
            kept_per = per
            if weight is None:
                weight = torch.zeros(shape[0], per, *shape[2:], dtype=torch.float32)
                bias = torch.zeros(shape[0], dtype=torch.float32)
            weight[b.rows] = layer_weight(kept, shape).float()
            bias[b.rows] = w[-1].float()
        out[name] = (weight, bias)
    return out


def write_grouped_full_width(gm: fx.GraphModule, solution: GroupedSolution, keep_rows, surviving, write_dense) -> None:
    """The cached-input pipeline's write-back: removed columns of a grouped conv read zero weight."""
    dense = _dense_part(solution)
    if dense.problems:
        write_dense(gm, dense, keep_rows, surviving)
    for name, parts in _grouped_parts(solution).items():
        for _, w, (_, _, _, scale, _), b in parts:  # each conv group's outputs read its own block of columns
            write_matrix(gm, name, w / scale[None] if scale is not None else w, True, b.rows)


def zero_grouped_columns(gm: fx.GraphModule, solution: GroupedSolution, keep_rows, zero_dense) -> None:
    """Selection without reconstruction: each conv group stops reading its removed channels."""
    dense = _dense_part(solution)
    if dense.problems:
        zero_dense(gm, dense, keep_rows)
    for name, parts in _grouped_parts(solution).items():
        module = gm.get_submodule(name)
        flat = module.weight.detach().flatten(1).clone()
        out_per = flat.shape[0] // module.groups
        for p, _, _, b in parts:
            gone = removed_columns(p, solution.removed)[:-1].nonzero().flatten().to(flat.device)
            rows = torch.arange(b.g * out_per, (b.g + 1) * out_per, device=flat.device)
            flat[rows[:, None], gone[None, :]] = 0
        module.weight.data = flat.reshape(module.weight.shape)


# --- one-shot: the masked evaluator and the scheduler's curves ------------------------------------

class GroupedConsumer:
    """``MaskedModel``'s view of a grouped conv consumer: its weight in the layer's own layout
    ((in/groups)*kh*kw + bias) x out, re-solved per conv group from that block of the statistics."""

    def __init__(self, graph: ChannelGraph, name: str, stats, wanted: set[int], damp: float):
        module = graph.module.get_submodule(name)
        self.name, self.shape, self.has_bias = name, tuple(module.weight.shape), True
        self.weight = weight_matrix(module.weight, module.bias)  # its own layout: (in/groups)*kh*kw + bias rows
        self.slots = [(g.id, sl.channels, sl.column_blocks()) for g in graph.groups if g.id in wanted
                      for sl in g.consumers if sl.consumer == name]
        self.groups = module.groups
        self.width = self.weight.shape[0] - 1
        self.out_per = self.shape[0] // self.groups
        m = stats.gram.shape[0]
        self.damp = damp
        self.block_grams = []  # per conv group: its block of the statistics, with the ones column
        for g in range(self.groups):
            idx = torch.cat([torch.arange(g * self.width, (g + 1) * self.width), torch.tensor([m - 1])])
            self.block_grams.append(stats.gram[idx][:, idx])
        self.refits: list[ColumnRefit] | None = None  # made on the first re-solve

    def _outputs(self, g: int) -> slice:
        return slice(g * self.out_per, (g + 1) * self.out_per)

    def _local(self, cols: torch.Tensor, g: int) -> torch.Tensor:
        mine = cols[(cols >= g * self.width) & (cols < (g + 1) * self.width)]
        return mine - g * self.width

    def _refits(self) -> list[ColumnRefit]:
        """Each conv group's re-solve, from the full-column fit of its original outputs."""
        if self.refits is None:
            self.refits = []
            for g, gram in enumerate(self.block_grams):
                w = self.weight[:, self._outputs(g)]
                inverse = invert(prepare_gram(gram, self.damp)[0], self.damp > 0)
                fit = inverse @ (gram.double() @ w)
                self.refits.append(ColumnRefit(gram, fit, self.damp, inverse, restore=w))
        return self.refits

    def solved(self, cols: torch.Tensor) -> torch.Tensor:
        """Every conv group re-solved without the removed full-width columns ``cols``."""
        w = self.weight.clone()
        for g in range(self.groups):
            local = self._local(cols, g)
            if len(local):
                w[:, self._outputs(g)] = self._refits()[g].without(local)
        return w

    def zeroed(self, cols: torch.Tensor) -> torch.Tensor:
        w = self.weight.clone()
        for g in range(self.groups):
            w[self._local(cols, g), self._outputs(g)] = 0
        return w


def curve_job(graph: ChannelGraph, group, stats, damp: float, n_remove: int, device: str) -> dict:
    """The scheduler's job for a grouped conv's group: its balanced removal order and error curve."""
    problems, _, _ = grouped_problems(graph, graph, group, stats, damp, {})
    return dict(problems=[(p.gram, p.weight, p.channels, p.columns, p.scale) for p in problems], size=group.size,
                n_remove=n_remove, damp=damp, pieces=list(group.pieces), partitions=list(group.balanced),
                device=device)


def solve_curve_job(job: dict) -> tuple[list[int], np.ndarray]:
    device = job.get("device", "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        device = "cpu"
    problems = [ConsumerProblem(*p).to(device) for p in job["problems"]]
    result = balanced_greedy(problems, job["size"], job["n_remove"], job["damp"], job["partitions"], job["pieces"])
    return list(result.removed), result.errors.numpy()
