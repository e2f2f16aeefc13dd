"""Sequential compression from cached inputs: each segment of the graph runs about once per model.

Groups are compressed one at a time in graph order (group id), each on the statistics of the model
compressed so far against the original: the same least-squares problems as the full-pass reference
path (two whole-model passes per group), computed from activations cached at a frontier instead.

The model compressed so far is kept at full width while the frontier moves: a removed channel gets
zero weight in every consumer (pass-through ops still carry its value, but nothing reads it), so node
names, shapes and group ids never change and cached activations stay valid; its columns are taken
out of later problems, which are then exactly the problems of the physically pruned model. One
surgery at the end cuts every group.

For group g (consumers called at nodes first(g) .. last(g)) and the frontier at F:
  * both models run from F to last(g), the consumers' inputs feed the Gram and cross terms;
  * g is solved and its consumers' weights are written into the full-width model;
  * the frontier moves to the first consumer of the groups still to come; nodes before first(g) did
    not change, so only the compressed model's nodes from first(g) on run again.
A chain of layers therefore runs once per model; a residual stream, whose readers span a stage,
costs one extra run of that stage.
"""
from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
import torch.fx as fx
import torch.nn as nn

from ..calib import consumer_specs, iterate_batches
from ..calib import batches
from ..calib.frontier import GraphRunner
from ..calib.stats import ConsumerSpec, ConsumerStats, warn_few_rows
from ..errors import MultinetError
from ..graph import ChannelGraph, prune, trace
from ..graph.streams import residual_partners
from ..graph.surgery import kept_output_rows
from ..runtime.executors import LocalShards
from ..runtime.progress import Bar
from ..schedule.oneshot import first_samples, join_outputs
from ..solve.problem import removed_columns
from .consumer_weights import layer_layout, output_major, write_matrix
from .frontier_shard import FrontierShard, dense_target
from .group_problems import GroupSolution, solve_group
from .grouped_conv import GroupedSolution, write_grouped_full_width, zero_grouped_columns


@dataclass
class PipelineStats:
    """What a run cost, in nodes run per model (a whole forward pass = ``nodes`` each)."""

    nodes: int = 0
    compressed_nodes: int = 0
    original_nodes: int = 0
    spilled: int = 0
    seconds: dict[str, float] | None = None

    @property
    def passes(self) -> float:
        """Forward passes of one model over the calibration set the run amounted to (both models)."""
        return (self.compressed_nodes + self.original_nodes) / max(self.nodes, 1)


def track_outputs(graph: ChannelGraph, group, keep: list[int], surviving: dict[str, torch.Tensor]) -> None:
    """Which of each producer's original outputs are still there (consumers aim only at those)."""
    for owner, rows in kept_output_rows(graph, group.id, keep).items():
        surviving[owner] = surviving[owner][rows] if owner in surviving else rows


def dead_columns(graph: ChannelGraph, name: str, removed: Mapping[int, list[int]]) -> torch.Tensor:
    """Input columns of consumer ``name`` that earlier groups' removed channels occupy."""
    gone = []
    for gid, channels in removed.items():
        if not channels:
            continue
        lost = torch.as_tensor(channels, dtype=torch.long)
        for slot in graph.group(gid).consumers:
            if slot.consumer == name:
                blocks = slot.column_blocks()
                gone.append(blocks[torch.isin(slot.channels, lost)].flatten())
    return torch.unique(torch.cat(gone)) if gone else torch.zeros(0, dtype=torch.long)


def _compact(stats: ConsumerStats, dead: torch.Tensor) -> tuple[ConsumerStats, torch.Tensor]:
    """Statistics without the dead columns (the pruned model's problem), and full -> compact indices."""
    keep = torch.ones(stats.gram.shape[0], dtype=torch.bool)
    keep[dead] = False
    index = torch.cumsum(keep.long(), 0) - 1
    gram = stats.gram[keep][:, keep]
    cross = stats.cross[keep] if stats.cross is not None else None
    drift = stats.drift[keep] if stats.drift is not None else None
    if stats.delta_cross is not None:
        raise MultinetError("statistics must be resolved (ConsumerStats.resolved) before columns are taken out")
    target_cross = stats.target_cross[keep] if stats.target_cross is not None else None
    return ConsumerStats(gram, cross, stats.rows, drift, None, target_cross), index


def _problem_rows(keep_rows: torch.Tensor, problem_size: int) -> torch.Tensor:
    """Full-width row of each problem row: the kept input columns, then the bias row if it has one."""
    return keep_rows.nonzero().flatten()[:problem_size]


def write_full_width(gm: fx.GraphModule, solution: GroupSolution, keep_rows: dict[str, torch.Tensor],
                     surviving: Mapping[str, torch.Tensor]) -> None:
    """Consumers' re-solved weights into the full-width model: removed columns read zero weight."""
    if isinstance(solution, GroupedSolution):  # a grouped conv's weights go back per conv group
        return write_grouped_full_width(gm, solution, keep_rows, surviving, write_full_width)
    for p, w, entry in zip(solution.problems, solution.weights, solution.layout):
        name, has_bias, scale = entry.name, entry.has_bias, entry.scale
        if scale is not None:
            w = w / scale[None]
        full = torch.zeros(keep_rows[name].numel(), w.shape[1], dtype=w.dtype)  # the bias row is always last
        full[_problem_rows(keep_rows[name], len(w))] = w
        write_matrix(gm, name, full if has_bias else full[:-1], has_bias,
                     surviving.get(name, torch.arange(entry.outputs)))


def zero_columns(gm: fx.GraphModule, solution: GroupSolution, keep_rows: dict[str, torch.Tensor]) -> None:
    """Selection without reconstruction: the consumers only stop reading the removed channels."""
    if isinstance(solution, GroupedSolution):
        return zero_grouped_columns(gm, solution, keep_rows, zero_columns)
    for p, entry in zip(solution.problems, solution.layout):
        gone = _problem_rows(keep_rows[entry.name], p.gram.shape[0])[removed_columns(p, solution.removed)]
        module = _module(gm, entry.name)
        weight = module.weight if module is not None else gm.get_parameter(entry.name)
        as_conv = output_major(weight.detach(), entry.transposed)
        flat = as_conv.flatten(1).clone()
        flat[:, gone.to(weight.device)] = 0
        weight.data = layer_layout(flat.reshape(as_conv.shape), entry.transposed).contiguous()


def consumer_tensors(gm: fx.GraphModule, names) -> dict[str, torch.Tensor]:
    """The consumers' weights (and biases) by parameter name: all a shard needs after a solve."""
    out = {}
    for name in names:
        module = _module(gm, name)
        if module is None:
            out[name] = gm.get_parameter(name).detach().cpu()
            continue
        out[f"{name}.weight"] = module.weight.detach().cpu()
        if getattr(module, "bias", None) is not None:
            out[f"{name}.bias"] = module.bias.detach().cpu()
    return out


def _module(gm: fx.GraphModule, name: str) -> nn.Module | None:
    try:
        module = gm.get_submodule(name)
    except AttributeError:
        return None
    return module if isinstance(module, nn.Module) and hasattr(module, "weight") else None


def _short_names(names: list[str], limit: int = 3) -> str:
    """The consumers being calibrated, for a progress line: the first few, then a count."""
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit})" if len(names) > limit else "")


def _make_shard(model, batches, first_batch, **options) -> FrontierShard:
    return FrontierShard(model, batches, first_batch, **options)


def _tree_sum(parts: list[dict[str, tuple]]) -> dict[str, ConsumerStats]:
    """Add the shards' partial statistics pairwise (a tree: rounding grows with log2 of the shards)."""
    level = [{name: ConsumerStats(*t) for name, t in part.items()} for part in parts]
    while len(level) > 1:
        merged = []
        for left, right in zip(level[::2], level[1::2]):
            for name, s in right.items():
                if name in left:
                    left[name].add(s)
                else:
                    left[name] = s
            merged.append(left)
        if len(level) % 2:
            merged.append(level[-1])
        level = merged
    return level[0] if level else {}


class SequentialPipeline:
    """The cached-input run over one model: frontier shards, statistics, solves, and the final surgery.

    The calibration batches are split over ``executor``'s workers (one shard in-process, the
    default); each shard runs the segments over its batches and returns partial sums, which are
    added here; the solve runs here and only the consumers' new weights go back to the shards."""

    def __init__(self, original: ChannelGraph, data, *, batch_size: int, max_positions: int | None, damp: float,
                 device: str, seed: int, memory_limit: int | str | None = "auto", store_dtype: torch.dtype | None = None,
                 spill_dir=None, progress: bool = False, executor=None, compensate_residuals: bool = True):
        self.original = original
        self.compensate = compensate_residuals
        self.work = copy.deepcopy(original.module).to(device).eval()
        self.graph = replace(original, module=self.work)  # the original's analysis over the full-width model
        self.cur = GraphRunner(self.work)  # node positions; the shards run the nodes
        self.damp, self.device, self.seed = damp, device, seed
        self.progress = progress
        all_batches = list(iterate_batches(data, batch_size))
        self.n_batches = len(all_batches)
        self.local = executor is None or getattr(executor, "name", "local") == "local"
        options = dict(max_positions=max_positions, device=device, memory_limit=memory_limit,
                       store_dtype=store_dtype, spill_dir=spill_dir)
        if self.local:
            self.shards = LocalShards([FrontierShard(original.module, all_batches, 0, work=self.work, **options)])
        else:  # the calibration data crosses to the workers once, the model once, as checked model bytes
            from ..io import to_bytes

            n = max(1, min(executor.workers, len(all_batches)))
            bounds = [round(i * len(all_batches) / n) for i in range(n + 1)]
            model = to_bytes(original.module)
            self.shards = executor.shards(functools.partial(_make_shard, shards=n, **options),
                                          [(model, all_batches[lo:hi], lo) for lo, hi in zip(bounds, bounds[1:])])
        self.cost = PipelineStats(nodes=self.cur.end, seconds={"forward": 0.0, "statistics": 0.0, "solve": 0.0,
                                                               "surgery": 0.0})
        self.samples = sum(batches.size(b) for b in all_batches)
        self._reads_ahead: dict[int, tuple[list[ConsumerSpec], int]] = {}
        self._batches = all_batches if self.local else None  # in-process: the shard's own list, no copy

    def resume_from(self, work: fx.GraphModule) -> None:
        """Continue a killed run: its full-width model after the last finished group; the frontier
        starts again from the inputs."""
        self.work = work.to(self.device).eval()
        self.graph = replace(self.original, module=self.work)
        self.cur = GraphRunner(self.work)
        self.shards.call("restart", {k: v.detach().cpu() for k, v in self.work.named_parameters()})

    def final_outputs(self, evaluation: list) -> list[torch.Tensor] | None:
        """The compressed model's outputs on the ``evaluation`` batches, concatenated per output as
        ``run_outputs`` gives them, taken from the frontier once it has reached the end of the model (the
        full-width model: the pruned one's outputs up to rounding); None when it has not, or when those
        batches are not the first calibration samples (a shuffling loader reads differently each time)."""
        if self._batches is None:  # on Ray the driver does not keep the batches to check them against
            return None
        samples = sum(batches.size(b) for b in evaluation)
        if not batches.same_batches(first_samples(self._batches, samples), evaluation):
            return None
        parts = self.shards.call("final_outputs")
        if not parts or any(p is None for p in parts):
            return None
        columns = join_outputs([batch for shard in parts for batch in shard])
        # an output may have several rows per sample (``h.reshape(-1, C)``): the first samples' rows
        total = sum(batches.size(b) for b in self._batches)
        if any(len(c) % total or (len(c) != total and samples != total) for c in columns):
            return None  # not a row per sample, and only some samples wanted: the result gets a pass of its own
        return [c[:samples * (len(c) // total)] for c in columns]

    def close(self) -> None:
        reports = self.shards.call("report")
        self.cost.compressed_nodes = sum(r["node_batches"]["compressed"] for r in reports) / max(self.n_batches, 1)
        self.cost.original_nodes = sum(r["node_batches"]["original"] for r in reports) / max(self.n_batches, 1)
        for phase in ("forward", "statistics"):  # shards run side by side: the slowest one's time
            self.cost.seconds[phase] = max(r["seconds"][phase] for r in reports)
        self.cost.spilled = sum(r["spilled"] for r in reports)
        self.shards.call("close")
        self.shards.close()

    # --- one group -------------------------------------------------------------------------

    def span(self, group) -> tuple[int, int]:
        specs = consumer_specs(self.original, group.consumer_names)
        positions = [self.cur.position[n] for s in specs for n in s.nodes]
        return min(positions), max(positions)

    def statistics(self, group, seed: int, next_cut: int, bar: Bar | None = None, pending: list[str] = (),
                   solved: list[str] = (), later: list[int] = ()) -> tuple[dict[str, ConsumerStats], int]:
        """Gram and cross terms of the group's consumers from the frontier, summed over the shards;
        leaves both frontiers at the furthest point that the group's solve cannot change. Returns the
        stats and that point. ``bar`` hears which consumers are being calibrated, how far and how fast.
        ``pending`` / ``solved``: the consumers still to be re-solved / re-solved before; the residual-stream
        writers among the group's consumers get their drift term where these allow (streams.stream_partners).
        ``later``: the groups still to come, whose consumers' original inputs (and streams) the original
        model's frontier keeps as it passes them."""
        first, last = self.span(group)
        cut = min(first, next_cut)  # the compressed model is valid up to g's first consumer
        streams = (residual_partners(self.original, group.consumer_names, pending, solved) if self.compensate
                   else {})
        specs = consumer_specs(self.original, group.consumer_names, streams)
        last = max([last] + [self.cur.position[n] for n in streams.values()])  # the streams' values are read too
        what = _short_names([s.name for s in specs])
        began = time.perf_counter()
        on_batch = None
        if bar is not None:
            if self.local:
                def on_batch(done: int, samples: int) -> None:
                    rate = samples / max(time.perf_counter() - began, 1e-9)
                    bar.note(f"group {group.id}: calibrating {what}, batch {done}/{self.n_batches}, "
                             f"{rate:,.0f} samples/s")
            bar.note(f"group {group.id}: calibrating {what}"
                     + ("" if self.local else f" on {len(self.shards.actors)} workers"))
        parts = self.shards.call("statistics", specs, cut, last, next_cut, seed, on_batch, self._ahead(later))
        stats = _tree_sum(parts)
        if bar is not None and not self.local:
            bar.note(f"group {group.id}: calibrated {what}, "
                     f"{self.samples / max(time.perf_counter() - began, 1e-9):,.0f} samples/s")
        missing = [s.name for s in specs if s.name not in stats]
        if missing:
            raise MultinetError(f"consumers never ran on the calibration data: {missing}")
        warn_few_rows(stats)
        return stats, cut

    def advance(self, cut: int, next_cut: int) -> None:
        self.shards.call("advance", cut, next_cut)

    def _ahead(self, later: list[int]) -> list[tuple[list[ConsumerSpec], int]]:
        """(consumer specs, seed) of the ``later`` groups: what they may read from the original model.
        Every stream a writer among them could be compensated against is announced (partners without
        the pending/solved rules, which only ever drop some)."""
        for gid in later:
            if gid not in self._reads_ahead:
                names = self.original.group(gid).consumer_names
                streams = residual_partners(self.original, names, (), ()) if self.compensate else {}
                self._reads_ahead[gid] = (consumer_specs(self.original, names, streams), self.seed + gid)
        return [self._reads_ahead[gid] for gid in later]


    # --- the whole run ---------------------------------------------------------------------

    def run(self, requests: Mapping[int, int | list[int]], method: str, removed_so_far: dict[int, list[int]],
            surviving: dict[str, torch.Tensor], on_group: Callable[[int, GroupSolution, float], None]
            ) -> dict[int, list[int]]:
        """Compress every requested group; ``on_group(gid, solution, seconds)`` after each one."""
        order = [g for g in sorted(requests) if requests[g] and g not in removed_so_far]
        firsts = {g: self.span(self.original.group(g))[0] for g in order}
        removed = dict(removed_so_far)
        bar = Bar(self.progress, len(order), f"{method}: groups")
        try:
            for i, gid in enumerate(order):
                start_group = time.perf_counter()
                group = self.original.group(gid)
                request = requests[gid]
                next_cut = min((firsts[h] for h in order[i + 1:]), default=self.cur.end)
                pending = [name for h in order[i:] for name in self.original.group(h).consumer_names]
                solved = [name for h in removed for name in self.original.group(h).consumer_names]
                later = order[i + 1:]
                stats, cut = self.statistics(group, self.seed + gid, next_cut, bar, pending, solved, later)
                bar.note(f"group {gid}: solving ({request if isinstance(request, int) else len(request)} of "
                         f"{group.size} channels)")
                start = time.perf_counter()
                keep_rows, index_of = {}, {}
                for name in list(stats):
                    dead = dead_columns(self.original, name, removed)
                    target = dense_target(self.original.module, name) if stats[name].delta_cross is not None else None
                    stats[name], index_of[name] = _compact(stats[name].resolved(target) if target is not None
                                                           else stats[name], dead)
                    keep_rows[name] = torch.ones(len(index_of[name]), dtype=torch.bool)
                    keep_rows[name][dead] = False
                solution = self._solve(group, request, method, stats, surviving, index_of)
                removed[gid] = sorted(solution.removed)
                if solution.weights is not None:
                    write_full_width(self.work, solution, keep_rows, surviving)
                else:
                    zero_columns(self.work, solution, keep_rows)
                self.shards.call("load", consumer_tensors(self.work, group.consumer_names))
                track_outputs(self.original, group, sorted(set(range(group.size)) - set(solution.removed)),
                              surviving)
                self.cost.seconds["solve"] += time.perf_counter() - start
                self.advance(cut, next_cut)
                on_group(gid, solution, time.perf_counter() - start_group)
                bar.advance()
        finally:
            bar.close()
        return removed


    def _solve(self, group, request, method: str, stats, surviving, index_of) -> GroupSolution:
        n_remove = request if isinstance(request, int) else len(request)
        preset = None if isinstance(request, int) else list(request)
        return solve_group(self.graph, self.original, group, n_remove, method, stats, self.damp, self.device,
                           self.seed + group.id, surviving, preset, column_index=index_of)

    def finish(self, removed: Mapping[int, list[int]], example) -> fx.GraphModule:
        """One surgery for every group: the full-width model with its removed channels cut."""
        start = time.perf_counter()
        keep = {g: sorted(set(range(self.original.group(g).size)) - set(r)) for g, r in removed.items() if r}
        graph = trace(self.work, example)
        pruned = prune(graph, keep) if keep else graph.module
        self.cost.seconds["surgery"] += time.perf_counter() - start
        return pruned
