"""FLOPs and parameters of a pruned model, predicted from the removal sets without pruning it.

Surgery slices every parameter along the segments the channel analysis recorded, so a tensor's
surviving size is its full size times, per sliced dimension, the fraction of positions kept. A
Conv/Linear layer's MACs are proportional to its weight's size (positions x weight numel), so the
same fractions give its FLOPs. The scheduler evaluates this thousands of times; building a pruned
model for each would cost a trace each time.

A group that loses every channel (possible where MultiNet bridges or skip links let other channels
stand in for it) leaves the layers that wrote it computing for nothing: surgery's dead-code
elimination removes them, and with them every group that only such layers read. The cost model
follows the same chain (``dead``), so a plan is costed as the network surgery will build.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch.fx as fx

from ..graph import ChannelGraph, count
from ..graph.edits import GroupedInput, SliceTensor
from ..graph.op_tables import weight_output_dim


WEIGHTLESS = ("attention", "matmul")  # counted layers (graph/counting.py) whose cost no weight slice gives


@dataclass
class _Range:
    group: int
    lo: int  # group channel indices [lo, hi)
    hi: int
    block: int


@dataclass
class _Dim:
    total: int
    fixed: int  # positions no prunable group can remove
    ranges: list[_Range]


@dataclass
class _Term:
    full: float
    dims: list[_Dim]
    needs: list[int] | None = None  # only counted once one of these groups is pruned (a gained bias)


class CostModel:
    """Exact FLOPs (MACs) and parameter counts for any per-group removal sets."""

    def __init__(self, graph: ChannelGraph):
        gm = graph.module
        self.groups = {g.id: g for g in graph.groups}
        self._space = {s: (g.id, off) for g in graph.groups if g.prunable for s, off in g.members}
        slices: dict[str, list[SliceTensor]] = {}
        for edit in graph.analysis.edits:
            if isinstance(edit, SliceTensor):
                slices.setdefault(edit.attr, []).append(edit)
            elif isinstance(edit, GroupedInput):  # a grouped conv's input: every conv group keeps the same share
                slices.setdefault(edit.attr, []).append(SliceTensor(edit.attr, 1, edit.segments))
        params = dict(gm.named_parameters())
        counts = count(gm)
        self.flops_full, self.params_full = counts.flops, counts.params
        self.flops_terms: list[_Term] = []
        fixed_flops = counts.flops
        axes = graph.analysis.node_axes or {}
        for layer in counts.layers:
            weight = _weight_name(gm, layer.name)
            if layer.flops and weight in slices:
                self.flops_terms.append(_Term(layer.flops, self._dims(slices[weight])))
                fixed_flops -= layer.flops
            elif layer.flops and layer.kind in WEIGHTLESS and layer.name in axes:
                # attention and batched matmuls: their channel axis is a batch dim (the heads; a tracked
                # contracted dim makes the group unprunable), so their MACs shrink with the kept heads
                axis = axes[layer.name]
                self.flops_terms.append(_Term(layer.flops, self._dims([SliceTensor("", axis.dim, axis.segments)])))
                fixed_flops -= layer.flops
        self.params_terms: list[_Term] = []
        fixed_params = counts.params
        for name, p in params.items():
            if name in slices:
                self.params_terms.append(_Term(p.numel(), self._dims(slices[name])))
                fixed_params -= p.numel()
        self.params_terms += self._gained_biases(graph, slices)
        self.fixed_flops, self.fixed_params = fixed_flops, fixed_params
        self.terms = [(0, t) for t in self.flops_terms] + [(1, t) for t in self.params_terms]
        # the groups each term reads (its ranges' and the gained bias's): its size depends on their counts alone
        self.term_groups = [tuple(sorted({r.group for d in t.dims for r in d.ranges} | set(t.needs or ())))
                            for _, t in self.terms]
        self.terms_of: dict[int, list[int]] = {}  # group -> indices of the terms it changes
        for i, groups in enumerate(self.term_groups):
            for gid in groups:
                self.terms_of.setdefault(gid, []).append(i)
        self.sizes = {g.id: g.size for g in graph.groups}
        self._readers = {g.id: list(g.consumer_names) for g in graph.groups if g.prunable and g.consumers}
        self._writes: dict[str, set[int]] = {}  # layer -> the groups it writes
        for g in graph.groups:
            for layer in g.producers:
                self._writes.setdefault(layer, set()).add(g.id)
        self._dead: dict[frozenset, frozenset] = {}

    def dead(self, gone: Iterable[int]) -> frozenset[int]:
        """The groups ``gone`` (every channel removed) and those nothing live reads any more, as
        dead-code elimination finds them: a layer lives when it writes a group that lives (or one no
        removal can kill: unprunable, unread, the outputs), and a group lives when a live layer reads
        it. Liveness spreads back from the outputs, so a residual stage whose stream is gone dies with
        its blocks although each block reads the stream the next one writes."""
        gone = frozenset(gone)
        if not gone:
            return gone
        if gone not in self._dead:
            mortal = set(self._readers) - gone
            live_layers = {layer for layer, writes in self._writes.items() if writes - mortal - gone}
            live, changed = set(), True
            while changed:
                changed = False
                for g in mortal - live:
                    if any(r not in self._writes or r in live_layers for r in self._readers[g]):
                        live.add(g)
                        live_layers.update(self.groups[g].producers)
                        changed = True
            self._dead[gone] = frozenset(gone | (mortal - live))
        return self._dead[gone]

    def _dims(self, edits: list[SliceTensor]) -> list[_Dim]:
        dims = []
        for edit in {e.dim: e for e in edits}.values():
            fixed, ranges, total = 0, [], 0
            for seg in edit.segments:
                total += seg.width
                owner = self._space.get(seg.space)
                if owner is None:
                    fixed += seg.width
                else:
                    gid, off = owner
                    ranges.append(_Range(gid, off + seg.start, off + seg.start + seg.length, seg.block))
            dims.append(_Dim(total, fixed, ranges))
        return dims

    def _gained_biases(self, graph: ChannelGraph, slices) -> list[_Term]:
        """Reconstruction gives bias-free Conv/Linear consumers a bias (it absorbs mean shifts)."""
        terms = []
        feeding: dict[str, list[int]] = {}
        for g in graph.groups:
            if g.prunable:
                for name in g.consumer_names:
                    feeding.setdefault(name, []).append(g.id)
        modules = dict(graph.module.named_modules())
        for name, gids in feeding.items():
            module = modules.get(name)
            if module is None or getattr(module, "bias", 0) is not None or f"{name}.weight" not in slices:
                continue
            dim = weight_output_dim(module)
            out = [d for d in self._dims([e for e in slices[f"{name}.weight"] if e.dim == dim])]
            full = module.weight.shape[dim]
            terms.append(_Term(full, out or [_Dim(full, full, [])], needs=gids))
        return terms

    @staticmethod
    def term_size(t: _Term, removed_in: Callable[[int, int, int], int], pruned: set[int]) -> float:
        if t.needs is not None and not pruned.intersection(t.needs):
            return 0.0
        frac = 1.0
        for d in t.dims:
            kept = d.fixed + sum(r.block * (r.hi - r.lo - removed_in(r.group, r.lo, r.hi)) for r in d.ranges)
            frac *= kept / d.total
        return t.full * frac

    def evaluate(self, removed_in: Callable[[int, int, int], int], pruned: set[int]) -> tuple[float, float]:
        """(flops, params) given ``removed_in(group, lo, hi)``: how many removed channels lie in [lo, hi)
        (``pruned``: the groups that lose any), dead groups (see ``dead``) counted as gone."""
        dead = self.dead(g for g in pruned if removed_in(g, 0, self.sizes[g]) >= self.sizes[g])
        if dead:
            removed_in, pruned = _all_of(dead, removed_in), set(pruned) | dead
        return self._evaluate(removed_in, pruned)

    def _evaluate(self, removed_in: Callable[[int, int, int], int], pruned: set[int]) -> tuple[float, float]:
        out = [self.fixed_flops, self.fixed_params]
        for metric, t in self.terms:
            out[metric] += self.term_size(t, removed_in, pruned)
        return out[0], out[1]

    def totals(self, removed: Mapping[int, Sequence[int]]) -> tuple[float, float]:
        """(flops, params) once the channels ``removed[group]`` are gone."""
        sets = {g: np.asarray(sorted(r), dtype=np.int64) for g, r in removed.items()}

        def removed_in(g, lo, hi):
            arr = sets.get(g)
            if arr is None:
                return 0
            return int(np.searchsorted(arr, hi) - np.searchsorted(arr, lo))

        return self.evaluate(removed_in, {g for g, r in sets.items() if len(r)})

    def smallest(self, counts: Mapping[int, int]) -> tuple[float, float]:
        """A lower bound on (flops, params) once each group loses ``counts[group]`` channels, whichever
        they are: every range is taken to lose as many as it can. Exact when a group's channels all
        cost the same (one range per dimension), so a budget can be refused before calibration."""
        def removed_in(g, lo, hi):
            return min(hi - lo, counts.get(g, 0))

        return self.evaluate(removed_in, {g for g, k in counts.items() if k})

    def along(self, orders: Mapping[int, Sequence[int]]) -> "PrefixCosts":
        """Costs when each group loses the first k channels of its removal order."""
        return PrefixCosts(self, orders)


TERMS_REMEMBERED = 1 << 20  # term sizes PrefixCosts keeps (about 100 MB at most) before it starts afresh


class PrefixCosts:
    """Costs of prefix removals, with per-range prefix counts precomputed (O(1) per range)."""

    def __init__(self, model: CostModel, orders: Mapping[int, Sequence[int]]):
        self.model = model
        self.orders = {g: np.asarray(list(o), dtype=np.int64) for g, o in orders.items()}
        # the groups whose order reaches every channel: only they can go whole (and kill others with them)
        self._wholes = [g for g, o in self.orders.items() if len(o) >= model.sizes[g]]
        self._cum: dict[tuple[int, int, int], np.ndarray] = {}
        self._near: dict[int, tuple[int, ...]] = {}
        self._saved: dict[tuple, tuple[float, float]] = {}
        self._sizes: dict[tuple, float] = {}

    def _prefix(self, g: int, lo: int, hi: int) -> np.ndarray:
        key = (g, lo, hi)
        if key not in self._cum:
            order = self.orders.get(g, np.zeros(0, dtype=np.int64))
            inside = (order >= lo) & (order < hi)
            self._cum[key] = np.concatenate([[0], np.cumsum(inside)])
        return self._cum[key]

    def _removed_in(self, counts: Mapping[int, int], dead: frozenset = frozenset()):
        def removed_in(g, lo, hi):
            k = counts.get(g, 0)
            return int(self._prefix(g, lo, hi)[k]) if k else 0
        return _all_of(dead, removed_in) if dead else removed_in

    def _dead(self, counts: Mapping[int, int]) -> frozenset[int]:
        sizes = self.model.sizes
        return self.model.dead(g for g in self._wholes if counts.get(g, 0) >= sizes[g])

    def __call__(self, counts: Mapping[int, int]) -> tuple[float, float]:
        return self.model.evaluate(self._removed_in(counts), {g for g, k in counts.items() if k})

    def neighbours(self, gid: int) -> tuple[int, ...]:
        """The groups (``gid`` among them) whose counts the terms ``gid`` touches depend on."""
        if gid not in self._near:
            near = {gid}
            for i in self.model.terms_of.get(gid, ()):
                near.update(self.model.term_groups[i])
            self._near[gid] = tuple(sorted(near))
        return self._near[gid]

    def change(self, counts: Mapping[int, int], gid: int, k: int) -> tuple[float, float]:
        """(flops, params) saved when group ``gid`` goes from counts[gid] to k removals: only the
        terms that group touches are re-evaluated, and only when a group they depend on has moved
        since (the greedy asks again for every other group's moves after each step)."""
        size = self.model.sizes[gid]
        dead = self._dead(counts)
        if counts.get(gid, 0) >= size or k >= size:
            # the group dies or revives, and so may others anywhere (``dead``): the terms that change are
            # those of the groups whose removals differ, the group and every one that died or revived with it
            new = {**counts, gid: k}
            dead_after = self._dead(new)
            return self._change(counts, new, {gid} | (dead ^ dead_after), dead, dead_after)
        key = (gid, k, tuple(counts.get(g, 0) for g in self.neighbours(gid)), dead)
        saved = self._saved.get(key)
        if saved is None:
            saved = self._saved[key] = self._change(counts, {**counts, gid: k}, {gid}, dead, dead)
        return saved

    def _change(self, counts: Mapping[int, int], new: Mapping[int, int], moved: set[int], dead: frozenset,
                dead_after: frozenset) -> tuple[float, float]:
        """The cost saved going from ``counts`` to ``new``, from the terms of the ``moved`` groups alone
        (every other term reads the same removals and the same pruned groups before and after)."""
        saved = [0.0, 0.0]
        for i in sorted({i for g in moved for i in self.model.terms_of.get(g, ())}):
            saved[self.model.terms[i][0]] += self._term(i, counts, dead) - self._term(i, new, dead_after)
        return saved[0], saved[1]

    def _term(self, i: int, counts: Mapping[int, int], dead: frozenset) -> float:
        """Term ``i``'s size, remembered by the counts of the groups it reads (-1: dead): the greedy asks
        for the same terms at the same counts for every candidate move of every group."""
        key = (i, tuple(-1 if g in dead else counts.get(g, 0) for g in self.model.term_groups[i]))
        size = self._sizes.get(key)
        if size is None:
            if len(self._sizes) >= TERMS_REMEMBERED:
                self._sizes.clear()
            pruned = {g for g in self.model.term_groups[i] if g in dead or counts.get(g, 0)}
            size = self._sizes[key] = self.model.term_size(self.model.terms[i][1], self._removed_in(counts, dead), pruned)
        return size


def _all_of(groups: frozenset, removed_in: Callable[[int, int, int], int]) -> Callable[[int, int, int], int]:
    """``removed_in`` with every channel of ``groups`` removed."""
    return lambda g, lo, hi: hi - lo if g in groups else removed_in(g, lo, hi)


def _weight_name(gm: fx.GraphModule, layer: str) -> str:
    """The parameter holding a counted layer's weight: ``name.weight`` or a functional get_attr."""
    try:
        gm.get_submodule(layer)
        return f"{layer}.weight"
    except AttributeError:
        node = next((n for n in gm.graph.nodes if n.name == layer), None)
        if node is not None and len(node.args) > 1 and getattr(node.args[1], "op", None) == "get_attr":
            return node.args[1].target
        return ""
