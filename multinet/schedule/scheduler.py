"""Schedules: which groups to shrink, by how much and in what order, to meet a global budget.

All three start from one calibration pass over the original model and one REAP solve per group
(its removal order and layer-wise error curve E_g(k)), and differ in how they trade groups:

* ``uniform``: the same fraction of every group (the baseline);
* ``exhaustive``: at each step, every group's next removals are applied to the (masked, one-shot
  reconstructed) model and the error at the *final outputs* is measured; the move with the least
  error per unit of budget saved wins. Exact but one forward pass per group per step;
* ``auto``: the final-output error of a move is predicted as the group's layer-wise error E_g
  times an amplification slope measured for every group at a few points along the way (see
  ``_auto``); the same greedy then runs on predictions, one channel at a time.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..calib import iterate_batches
from ..execute import Executor, resolve_executor
from ..graph import ChannelGraph, prune
from ..progress import Bar
from .allocate import Step, counts_at, greedy
from .budget import Budget, BudgetError, schedulable_groups
from .costs import CostModel, PrefixCosts
from .latency import latency_input, measure_ms
from .oneshot import GroupCurve, MaskedModel, evaluation_inputs, group_curve, one_shot_stats
from .plan import GroupPlan, Plan

SCHEDULES = ("auto", "exhaustive", "uniform")
AUTO_STAGES = 6  # auto re-measures each group's amplification this many times along the way
AUTO_LOOKAHEAD = 4
EXHAUSTIVE_STEPS = 16  # the exhaustive search moves a group by ~1/16 of its channels at a time


@dataclass
class Scheduling:
    """Everything a schedule needs, built once per model and reusable across budgets."""

    graph: ChannelGraph
    budget: Budget
    allowed: dict[int, list[int]]
    curves: dict[int, GroupCurve]
    costs: PrefixCosts
    masked: MaskedModel
    seconds: dict[str, float]
    original: tuple[float, float]

    def removals(self, counts: Mapping[int, int]) -> dict[int, list[int]]:
        return {g: self.curves[g].order[:k] for g, k in counts.items() if k}

    def cost(self, counts: Mapping[int, int], metric: int) -> float:
        return self.costs(counts)[metric]


def prepare(graph: ChannelGraph, data, budget: Budget, *, batch_size: int = 128, max_positions: int | None = 256,
            damp: float = 1e-6, device: str = "cpu", seed: int = 0, eval_samples: int = 1024) -> Scheduling:
    """Statistics, REAP curves, the cost model and the masked evaluator (shared by all schedules)."""
    budget.check_device()
    allowed = schedulable_groups(graph, budget)
    if not allowed:
        raise BudgetError("no channel group may be pruned under these constraints (ignored layers, min_channels, "
                          "round_to, residual_streams): nothing to schedule")
    seconds = {}
    start = time.perf_counter()
    stats = one_shot_stats(graph, list(allowed), data, batch_size, max_positions, device, seed)
    seconds["statistics"] = time.perf_counter() - start
    start = time.perf_counter()
    curves = {g: group_curve(graph, g, stats, options[-1], damp) for g, options in allowed.items()}
    seconds["curves"] = time.perf_counter() - start
    model = CostModel(graph)
    masked = MaskedModel(graph, stats, list(allowed), evaluation_inputs(data, batch_size, eval_samples), damp, device)
    return Scheduling(graph, budget, allowed, curves, model.along({g: c.order for g, c in curves.items()}), masked,
                      seconds, (model.flops_full, model.params_full))


def make_plan(ctx: Scheduling, schedule: str = "auto", executor: Executor | None = None, progress: bool = False,
              budget: Budget | None = None) -> Plan:
    """Per-group removals meeting ``budget`` (default: the one ``ctx`` was prepared for)."""
    if schedule not in SCHEDULES:
        raise BudgetError(f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    budget = budget or ctx.budget
    fixed = ("round_to", "ignore", "min_channels", "residual_streams", "device")
    if any(getattr(budget, k) != getattr(ctx.budget, k) for k in fixed):
        raise BudgetError(f"this budget's constraints ({', '.join(fixed)}) differ from those the scheduling was "
                          f"prepared for: call prepare() again")
    start = time.perf_counter()
    evaluations = ctx.masked.evaluations
    if budget.metric == "latency":
        counts, steps, target, original, cost = _latency_search(ctx, budget, schedule, executor, progress)
        predicted = None
    else:
        metric = 0 if budget.metric == "flops" else 1
        original = ctx.original[metric]
        target = (budget.flops if metric == 0 else budget.params) * original
        floor = ctx.cost({g: o[-1] for g, o in ctx.allowed.items()}, metric)
        if target < floor:
            raise BudgetError(f"{budget.metric} budget {target / original:.3f} is below {floor / original:.3f} of the "
                              f"original: what the layers that cannot be pruned (and the minimum channels) cost")
        counts, steps, predicted = _search(ctx, schedule, metric, target, executor, progress)
        cost = ctx.cost(counts, metric)
    if predicted is None:
        predicted = ctx.masked.error(ctx.removals(counts))
    seconds = dict(ctx.seconds, search=time.perf_counter() - start)
    groups = []
    for g, c in ctx.curves.items():
        k = counts.get(g, 0)
        group = ctx.graph.group(g)
        groups.append(GroupPlan(g, group.producers, group.size, c.order[:k], float(c.errors[k])))
    return Plan(schedule, budget.as_dict(), budget.metric, float(target), float(original), float(cost),
                float(predicted), groups, steps, seconds, ctx.masked.evaluations - evaluations)


def _search(ctx: Scheduling, schedule: str, metric: int, target: float, executor, progress: bool,
            ) -> tuple[dict[int, int], list[tuple[int, int]], float | None]:
    """(counts, moves, predicted final-output error or None when it must be measured)."""
    if schedule == "uniform":
        counts = _uniform(ctx, lambda c: ctx.cost(c, metric) <= target)
        return counts, [(g, k) for g, k in counts.items() if k], None
    path = _greedy(ctx, schedule, metric, target, executor, progress)
    return counts_at(path, len(path)), [(s.group, s.count) for s in path], (path[-1].error if path else 0.0)


def _greedy(ctx: Scheduling, schedule: str, metric: int, target: float, executor, progress: bool) -> list[Step]:
    start_cost = ctx.cost({}, metric)
    bar = Bar(progress, start_cost - target, f"{schedule} schedule")
    run = resolve_executor(executor)
    strides = {g: max(1, (len(o) - 1) // EXHAUSTIVE_STEPS) for g, o in ctx.allowed.items()}

    def saving(counts, g, k):
        return ctx.costs.change(counts, g, k)[metric]

    def report(cost):
        bar.update(start_cost - cost)

    try:
        if schedule == "exhaustive":
            def errors_of(counts, moves):
                return run.map(ctx.masked.error, [ctx.removals({**counts, g: k}) for g, k in moves])

            return greedy(ctx.allowed, saving, start_cost, target, errors_of, strides, False, progress=report)
        return _auto(ctx, saving, start_cost, target, strides, run, report)
    finally:
        bar.close()


def _auto(ctx: Scheduling, saving, start_cost: float, target: float, strides, run, report) -> list[Step]:
    """The greedy on predicted errors, in AUTO_STAGES stages of equal budget.

    At the start of a stage, each group's next chunk (1/16 of it) is applied to the current state
    and the final-output error measured: its ratio to the chunk's layer-wise REAP error is the
    group's amplification slope s_g for the stage, which captures how the groups already pruned
    change each other's effect. Within the stage, moving group g from k to k' is predicted to add
    s_g (E_g(k') - E_g(k)), and the greedy moves one channel at a time (looking ahead a few) on
    predictions alone: G + 1 forward passes per stage instead of G per step.
    """
    counts = {g: 0 for g in ctx.allowed}
    cost, error, path = start_cost, 0.0, []
    for stage in range(1, AUTO_STAGES + 1):
        level = start_cost - (start_cost - target) * stage / AUTO_STAGES
        if cost <= level:
            continue
        slopes = _slopes(ctx, counts, error, strides, run)
        anchor = dict(counts)

        def errors_of(state, moves, anchor=anchor, slopes=slopes, base=error):
            now = base + sum(slopes[g] * (ctx.curves[g].errors[k] - ctx.curves[g].errors[anchor[g]])
                             for g, k in state.items())
            return [now + slopes[g] * (ctx.curves[g].errors[k] - ctx.curves[g].errors[state[g]]) for g, k in moves]

        steps = greedy(ctx.allowed, saving, cost, level, errors_of, {g: AUTO_LOOKAHEAD for g in ctx.allowed}, True,
                       progress=report, start=counts, start_error=error)
        if not steps:
            break
        path += steps
        counts = {**counts, **counts_at(steps, len(steps))}
        cost = steps[-1].cost
        error = ctx.masked.error(ctx.removals(counts)) if cost > target else steps[-1].error
    return path


def _slopes(ctx: Scheduling, counts, error: float, strides, run) -> dict[int, float]:
    moves = {}
    for g, options in ctx.allowed.items():
        i = options.index(counts[g])
        if i + 1 < len(options):
            moves[g] = options[min(i + strides[g], len(options) - 1)]
    finals = run.map(ctx.masked.error, [ctx.removals({**counts, g: k}) for g, k in moves.items()])
    slopes = {}
    for (g, k), final in zip(moves.items(), finals):
        layer = ctx.curves[g].errors[k] - ctx.curves[g].errors[counts[g]]
        slopes[g] = max(final - error, 0.0) / layer if layer > 1e-15 else 0.0
    positive = [v for v in slopes.values() if v > 0]
    floor = 0.05 * float(np.median(positive)) if positive else 0.0  # noise must not make a group free
    return {g: max(slopes.get(g, 0.0), floor) for g in ctx.allowed}


def _uniform(ctx: Scheduling, fits, iterations: int = 40) -> dict[int, int]:
    """The smallest common fraction r (each group loses its largest allowed count <= r * size) that fits."""
    def counts(r: float) -> dict[int, int]:
        out = {}
        for g, options in ctx.allowed.items():
            limit = r * ctx.curves[g].size + 1e-9
            out[g] = max(k for k in options if k <= limit)
        return out

    lo, hi = 0.0, 1.0
    if fits(counts(lo)):
        return counts(lo)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(counts(mid)) else (mid, hi)
    return counts(hi)


def _latency_search(ctx: Scheduling, budget: Budget, schedule: str, executor, progress: bool):
    """Walk the FLOPs schedule (or the uniform fraction) until the measured latency fits.

    Latency does not decompose over layers, so the schedule is built for FLOPs down to the
    smallest model, and the point on that path is chosen by bisection on measured medians (aiming
    half a tolerance below the target so that a re-measurement of the result still fits).
    """
    graph = ctx.graph
    example = next(iter(iterate_batches(ctx.masked.inputs, budget.latency_batch)))
    x = latency_input(example.cpu(), budget.latency_batch)
    target = budget.latency_ms
    aim = target * (1 - budget.latency_tolerance / 2)

    def latency(counts) -> float:
        removals = ctx.removals(counts)
        keep = {g: [c for c in range(ctx.curves[g].size) if c not in set(r)] for g, r in removals.items()}
        model = prune(graph, keep) if keep else graph.module
        return measure_ms(model, x, budget.device)

    original = latency({})
    if original <= aim:
        return {}, [], target, original, original
    if schedule == "uniform":
        counts = _uniform(ctx, lambda c: latency(c) <= aim, iterations=8)
        steps = [(g, k) for g, k in counts.items() if k]
    else:
        path = _greedy(ctx, schedule, 0, ctx.cost({g: o[-1] for g, o in ctx.allowed.items()}, 0), executor, progress)
        lo, hi = 0, len(path)  # latency(path[:lo]) > aim; find the shortest prefix that fits
        if latency(counts_at(path, hi)) > aim:
            raise BudgetError(f"latency budget {target:.3f} ms cannot be met: the smallest model this schedule "
                              f"reaches takes {latency(counts_at(path, hi)):.3f} ms on {budget.device}")
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if latency(counts_at(path, mid)) <= aim else (mid, hi)
        counts = counts_at(path, hi)
        steps = [(s.group, s.count) for s in path[:hi]]
    if schedule == "uniform" and latency(counts) > aim:
        raise BudgetError(f"latency budget {target:.3f} ms cannot be met by uniform pruning on {budget.device}")
    return counts, steps, target, original, latency(counts)
