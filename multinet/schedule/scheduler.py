"""Schedules: which groups to shrink, by how much and in what order, to meet a global budget.

All three start from one calibration pass over the original model and one REAP solve per group
(its removal order and layer-wise error curve E_g(k)), and differ in how they trade groups:

* ``uniform``: the same fraction of every group (the baseline);
* ``exhaustive``: at each step, every group's next removals are applied to the (masked, one-shot
  reconstructed) model and the error at the *final outputs* is measured; the move with the least
  error per unit of budget saved wins. Exact but one forward pass per group per step;
* ``auto``: each group's error at the final outputs is predicted as its layer-wise REAP error
  E_g(k) times an amplification a_g(k) measured at four depths of that group alone (4 partial
  forward passes per group, each over as few evaluation samples as its estimate needs: from 32, doubled
  until its standard error is under 5 %, at most ``probe_samples``; measured once per prepared
  scheduling and reused for every budget), and the errors of groups are taken to add (see
  ``_predictor``); the same greedy then runs on predictions only, one channel at a time. The plan
  it ends with is then evaluated once (a probe: from 32 samples to a 5 % standard error); where the groups do not add
  (groups that stand in for each other: a MultiNet member's own channels and the other member's
  channels its bridges read), that evaluation is far above the prediction, and each group's
  amplification is measured again *in the context* of that plan (at its planned count, with every
  other group at its own: one partial pass per group without it, and one of the plan itself, on as few
  samples as a 20 % standard error allows, of the group's share or, where that is smaller, of the plan's
  error spread evenly over the groups) to rescale its curve, and the greedy re-run,
  up to ``AUTO_REPROBES`` times; the plan with the least evaluated error is kept.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..calib import iterate_batches
from ..options import RunOptions
from ..runtime.executors import Executor
from ..graph import ChannelGraph, prune
from ..pipeline.statistics_memory import fitting, statistics_limit
from ..runtime.progress import Bar
from .allocate import Step, counts_at, greedy, refill
from .budget import Budget, BudgetError, schedulable_groups
from .costs import CostModel, PrefixCosts
from .latency import latency_input, measure_ms
from .oneshot import (EvaluationOutputs, GroupCurve, MaskedModel, evaluation_inputs, group_curves, masked_error,
                      masked_sample_errors, masked_setup, one_shot_stats)
from .plan import GroupPlan, Plan

SCHEDULES = ("auto", "exhaustive", "uniform")
PROBES = (0.25, 0.5, 0.75, 1.0)  # depths (fractions of a group's removable channels) where auto measures amplification
PROBE_FIRST = 32  # evaluation samples a probe starts from (doubled while its estimate is not precise enough)
PROBE_PRECISION = 0.05  # ... enough: standard error of the mean under this fraction of the mean
# an in-context re-measurement is a group's share of a plan's error (a difference of two errors, far noisier
# than either) and only rescales that group's curve: a looser precision, or it runs on every probe sample
CONTEXT_PRECISION = 0.2
# ... to that precision of itself, or of this fraction of the plan's error spread evenly over its groups where
# that is larger (0: of itself only, however many samples that takes)
CONTEXT_FLOOR_SHARE = 1.0
AUTO_LOOKAHEAD = 4
AUTO_REPROBES = 2  # in-context re-measurements when a plan's evaluated error misses its prediction
AUTO_TRUST = 1.5  # ... by more than this factor
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
    executor: Executor | None = None  # where candidate evaluations run (in this process when None or local)
    remote_args: tuple | None = None  # what a worker needs to rebuild the masked evaluator
    evaluations: float = 0  # forward passes over all evaluation samples so far, wherever they ran
    probe_samples: int | None = None  # most evaluation samples an amplification probe runs on (None: all)
    amplifications: dict[int, list[tuple[int, float]]] | None = None  # auto's probes, once measured (see _predictor)

    def errors(self, states: list[dict]) -> list[float]:
        """Final-output errors of several removal states on every evaluation sample: here, or on the
        executor's worker pool. ``evaluations`` counts them in full passes."""
        self.evaluations += len(states)
        if self.remote_args is None:
            return self.masked.errors_from_prefix(states)
        return self.executor.map_with(masked_setup, self.remote_args, masked_error, states)

    def sample_errors(self, states: list[dict], start: int, stop: int, base: dict | None = None
                      ) -> list[torch.Tensor]:
        """Per-sample errors of several states on evaluation samples ``start .. stop-1`` (see
        MaskedModel.sample_errors; ``base``: the removals they share), counted in ``evaluations`` as that
        fraction of a pass each."""
        self.evaluations += len(states) * (stop - start) / max(self.masked.samples, 1)
        if self.remote_args is None:
            return self.masked.sample_errors(states, start, stop, base)
        return self.executor.map_with(masked_setup, self.remote_args, masked_sample_errors,
                                      [(s, start, stop, base) for s in states])

    def probe(self, pairs: Sequence[tuple[dict, dict | None]], precision: float = PROBE_PRECISION,
              base: dict | None = None, floor: float = 0.0) -> list[float]:
        """The final-output error of each pair's first state (minus its second's, sample by sample, where
        one is given) on as few evaluation samples as that number needs: PROBE_FIRST samples, then twice
        as many at a time (only the new ones run), until its standard error is below ``precision`` of
        its value or ``probe_samples`` (all when None) are spent. A probe is a ratio of two errors: on
        images with many outputs a few dozen samples pin it down, on tiny models it takes hundreds.
        A state that several pairs share runs once; ``base``: removals most states share (they run from
        where they differ from it). ``floor``: a value smaller than this needs no more than ``precision``
        of ``floor`` as its standard error (an absolute precision for values that matter only that much)."""
        total = self.masked.samples
        mixed = not self.masked.per_sample  # outputs that mix samples: measured on every sample at once
        limit = total if mixed else min(self.probe_samples or total, total)
        values = [torch.zeros(0, dtype=torch.float64) for _ in pairs]
        active, start, stop = list(range(len(pairs))), 0, limit if mixed else min(PROBE_FIRST, limit)
        while active:
            unique: dict[tuple, dict] = {}
            for i in active:
                for state in pairs[i]:
                    if state is not None:
                        unique.setdefault(_state_key(state), state)
            got = dict(zip(unique, self.sample_errors(list(unique.values()), start, stop, base)))
            for i in active:
                plus, minus = pairs[i]
                errors = got[_state_key(plus)].double()
                if minus is not None:
                    errors = errors - got[_state_key(minus)].double()
                values[i] = torch.cat([values[i], errors])
            if stop >= limit:
                break
            active = [i for i in active if not _precise(values[i], precision, floor)]
            start, stop = stop, min(2 * stop, limit)
        return [float(v.mean()) if len(v) else 0.0 for v in values]

    def removals(self, counts: Mapping[int, int]) -> dict[int, list[int]]:
        return {g: self.curves[g].order[:k] for g, k in counts.items() if k}

    def cost(self, counts: Mapping[int, int], metric: int) -> float:
        return self.costs(counts)[metric]


def prepare(graph: ChannelGraph, data, budget: Budget, options: RunOptions | None = None, **settings) -> Scheduling:
    """Statistics, REAP curves, the cost model and the masked evaluator (shared by all schedules).
    ``options`` (a RunOptions) or its fields as keywords (batch_size, max_positions, device, ...)."""
    opts = RunOptions.of(options, **settings)
    batch_size, max_positions, damp, device, seed, eval_samples, executor = (
        opts.batch_size, opts.max_positions, opts.damp, opts.device, opts.seed, opts.eval_samples, opts.executor)
    budget.check_device()
    allowed = schedulable_groups(graph, budget)
    fit = fitting(graph, allowed, statistics_limit(opts.frontier_memory), together=True)  # held at once
    allowed = {g: counts for g, counts in allowed.items() if g in fit}
    if not allowed:
        raise BudgetError("no channel group may be pruned under these constraints (ignored layers, min_channels, "
                          "round_to, residual_streams): nothing to schedule")
    model = CostModel(graph)
    check_reachable(model, budget, allowed)
    seconds = {}
    start = time.perf_counter()
    inputs = evaluation_inputs(data, batch_size, eval_samples)
    outputs = EvaluationOutputs(graph.module, inputs)  # the evaluator's reference, from the statistics pass
    stats = one_shot_stats(graph, list(allowed), data, batch_size, max_positions, device, seed, executor, outputs)
    seconds["statistics"] = time.perf_counter() - start
    masked = MaskedModel(graph, stats, list(allowed), inputs, damp, device, budget.output_weights, outputs.reference())
    local = executor is None or getattr(executor, "name", "local") == "local"
    start = time.perf_counter()
    # the curves' inverse Grams go to the evaluator where it runs here (workers build their own)
    curves = group_curves(graph, {g: options[-1] for g, options in allowed.items()}, stats, damp, executor,
                          device, masked if local else None)
    seconds["curves"] = time.perf_counter() - start
    remote = None
    if not local:
        from ..io import to_bytes

        remote = (to_bytes(graph.module), graph.example_inputs, stats, list(allowed), inputs, damp,
                  budget.output_weights, masked.reference)
    return Scheduling(graph, budget, allowed, curves, model.along({g: c.order for g, c in curves.items()}), masked,
                      seconds, (model.flops_full, model.params_full), executor, remote,
                      probe_samples=opts.probe_samples)


def check_schedule(schedule: str) -> None:
    """Refuse an unknown schedule name (callers check it before calibrating, not after)."""
    if schedule not in SCHEDULES:
        raise BudgetError(f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")


def check_reachable(model: CostModel, budget: Budget, allowed: Mapping[int, list[int]]) -> None:
    """Refuse a FLOPs or parameter budget that even the smallest allowed model exceeds, from the traced
    graph alone: before the calibration (seconds to minutes) that scheduling would otherwise spend.
    Latency budgets need measurements and are checked by the search."""
    if budget.metric == "latency":
        return
    metric = 0 if budget.metric == "flops" else 1
    original = (model.flops_full, model.params_full)[metric]
    floor = model.smallest({g: options[-1] for g, options in allowed.items()})[metric]
    _refuse_below(budget, original, floor)


def _refuse_below(budget: Budget, original: float, floor: float) -> None:
    target = (budget.flops if budget.metric == "flops" else budget.params) * original
    if target < floor:
        raise BudgetError(f"{budget.metric} budget {target:,.0f} ({target / original:.3f} of the network) is below "
                          f"{floor:,.0f} ({floor / original:.3f}): what the layers that cannot be pruned (and the "
                          f"minimum channels) cost")


def make_plan(ctx: Scheduling, schedule: str = "auto", progress: bool = False, budget: Budget | None = None,
              fill: bool = False) -> Plan:
    """Per-group removals meeting ``budget`` (default: the one ``ctx`` was prepared for); candidate
    evaluations run where ``prepare`` was told to run jobs. ``fill`` (uniform schedule, FLOPs or
    parameters): the budget the common fraction leaves unspent given back (``_filled``)."""
    check_schedule(schedule)
    budget = budget or ctx.budget
    fixed = ("round_to", "ignore", "min_channels", "residual_streams", "device")
    if any(getattr(budget, k) != getattr(ctx.budget, k) for k in fixed):
        raise BudgetError(f"this budget's constraints ({', '.join(fixed)}) differ from those the scheduling was "
                          f"prepared for: call prepare() again")
    start = time.perf_counter()
    evaluations = ctx.evaluations
    if budget.metric == "latency":
        counts, steps, target, original, cost = _latency_search(ctx, budget, schedule, progress)
        predicted = None
    else:
        metric = 0 if budget.metric == "flops" else 1
        original = ctx.original[metric]
        target = (budget.flops if metric == 0 else budget.params) * original
        _refuse_below(budget, original, ctx.cost({g: o[-1] for g, o in ctx.allowed.items()}, metric))
        counts, steps, predicted = _search(ctx, schedule, metric, target, progress, fill)
        cost = ctx.cost(counts, metric)
    if predicted is None:
        predicted = ctx.errors([ctx.removals(counts)])[0]
    elif schedule == "auto":
        counts, steps, predicted = _checked_auto(ctx, metric, target, counts, steps, predicted, progress)
        cost = ctx.cost(counts, metric)
    seconds = dict(ctx.seconds, search=time.perf_counter() - start)
    groups = []
    for g, c in ctx.curves.items():
        k = counts.get(g, 0)
        group = ctx.graph.group(g)
        groups.append(GroupPlan(g, group.producers, group.size, c.order[:k], float(c.errors[k])))
    return Plan(schedule, budget.as_dict(), budget.metric, float(target), float(original), float(cost),
                float(predicted), groups, steps, seconds, ctx.evaluations - evaluations)


def _search(ctx: Scheduling, schedule: str, metric: int, target: float, progress: bool, fill: bool = False,
            ) -> tuple[dict[int, int], list[tuple[int, int]], float | None]:
    """(counts, moves, predicted final-output error or None when it must be measured)."""
    if schedule == "uniform":
        counts = _uniform(ctx, lambda c: ctx.cost(c, metric) <= target)
        if fill:
            counts = _filled(ctx, metric, target, counts)
        return counts, [(g, k) for g, k in counts.items() if k], None
    path = _greedy(ctx, schedule, metric, target, progress)
    return counts_at(path, len(path)), [(s.group, s.count) for s in path], (path[-1].error if path else 0.0)


def _greedy(ctx: Scheduling, schedule: str, metric: int, target: float, progress: bool,
            predict: dict[int, Callable[[int], float]] | None = None) -> list[Step]:
    start_cost = ctx.cost({}, metric)
    bar = Bar(progress, start_cost - target, f"{schedule} schedule")
    strides = {g: max(1, (len(o) - 1) // EXHAUSTIVE_STEPS) for g, o in ctx.allowed.items()}

    saving = _saving(ctx, metric)

    def report(cost):
        bar.update(min(start_cost - cost, start_cost - target))  # the last step may save more than needed

    try:
        if schedule == "exhaustive":
            def errors_of(counts, moves):
                return ctx.errors([ctx.removals({**counts, g: k}) for g, k in moves])

            return greedy(ctx.allowed, saving, start_cost, target, errors_of, strides, False, progress=report)
        return _auto(ctx, saving, start_cost, target, report, predict)
    finally:
        bar.close()


def _checked_auto(ctx: Scheduling, metric: int, target: float, counts, steps, predicted: float, progress: bool):
    """The auto plan's error evaluated once; where it misses the additive prediction by more than
    AUTO_TRUST, amplifications re-measured in the context of the plan and the greedy run again (see the
    module doc). Returns the plan with the least evaluated error, and that error as its prediction.

    An evaluation is a probe (as few samples as a 5 % standard error needs, at most ``probe_samples``),
    not a pass over every evaluation sample: it only decides between a factor-AUTO_TRUST miss and a hit
    and between two or three plans, and on a real calibration set (1,024 samples) the full passes were
    a third of the schedule's cost."""
    evaluated = _evaluated(ctx, counts)
    best = (evaluated, counts, steps)
    for _ in range(AUTO_REPROBES):
        if evaluated <= AUTO_TRUST * predicted + 1e-12:
            break
        path = _greedy(ctx, "auto", metric, target, progress, _predictor(ctx, context=counts, plan_error=evaluated))
        counts, steps = counts_at(path, len(path)), [(s.group, s.count) for s in path]
        predicted = path[-1].error if path else 0.0
        evaluated = _evaluated(ctx, counts)
        if evaluated < best[0]:
            best = (evaluated, counts, steps)
    evaluated, counts, steps = best
    return counts, steps, evaluated


def _evaluated(ctx: Scheduling, counts: Mapping[int, int]) -> float:
    """A plan's final-output error, from as few evaluation samples as PROBE_PRECISION needs."""
    return ctx.probe([(ctx.removals(counts), None)])[0]


def _auto(ctx: Scheduling, saving, start_cost: float, target: float, report,
          predict: dict[int, Callable[[int], float]] | None = None) -> list[Step]:
    """The greedy on predicted errors: moving group g from k to k' adds D_g(k') - D_g(k); then the
    slack its last move left, if any, given back (``refill``)."""
    errors_of = _additive(predict or _predictor(ctx))
    lookahead = {g: AUTO_LOOKAHEAD for g in ctx.allowed}
    path = greedy(ctx.allowed, saving, start_cost, target, errors_of, lookahead, True, progress=report)
    if not path:
        return path
    return path + refill(ctx.allowed, saving, path[-1].cost, target, errors_of, lookahead, counts_at(path, len(path)),
                         path[-1].error)


@dataclass
class _Saving:
    """saving(counts, g, k) for the allocators: the cost (FLOPs or parameters) a move of group g to k saves;
    with what a move's saving depends on (``neighbours``, ``sizes``: allocate.RememberedSavings)."""

    costs: PrefixCosts
    metric: int

    def __call__(self, counts: Mapping[int, int], g: int, k: int) -> float:
        return self.costs.change(counts, g, k)[self.metric]

    def neighbours(self, g: int) -> tuple[int, ...]:
        return self.costs.neighbours(g)

    @property
    def sizes(self) -> Mapping[int, int]:
        return self.costs.model.sizes


def _saving(ctx: Scheduling, metric: int) -> _Saving:
    return _Saving(ctx.costs, metric)


def _additive(predict: dict[int, Callable[[int], float]]):
    """errors_of(counts, moves) for the allocators: the plan's error as the sum of its groups' D_g(k),
    each move changing one term."""
    def errors_of(counts, moves):
        now = sum(predict[g](k) for g, k in counts.items())
        return [now - predict[g](counts[g]) + predict[g](k) for g, k in moves]
    return errors_of


def _filled(ctx: Scheduling, metric: int, target: float, counts: dict[int, int]) -> dict[int, int]:
    """The uniform plan with the budget its common fraction leaves unspent given back, channels going
    where the additive prediction (auto's probes) gains most per unit of cost (``refill``).

    The common fraction moves in jumps (every group's count is rounded down to an allowed one), so
    the cheapest fraction that fits can land well under the budget: the zoo DenseNet at 2 % of its
    FLOPs kept 1.0 %. Refilled it keeps 2.0 % and measures a lower error after sequential
    reconstruction (0.644 against 0.711; the same at five other small-budget points)."""
    predict = _predictor(ctx)

    path = refill(ctx.allowed, _saving(ctx, metric), ctx.cost(counts, metric), target, _additive(predict),
                  {g: AUTO_LOOKAHEAD for g in ctx.allowed}, counts, sum(predict[g](k) for g, k in counts.items()))
    return {**counts, **{step.group: step.count for step in path}}


def _predictor(ctx: Scheduling, context: Mapping[int, int] | None = None, plan_error: float = 0.0
               ) -> dict[int, Callable[[int], float]]:
    """Per group, k -> D_g(k), its predicted error at the final outputs when it alone loses k channels.

    D_g(k) = E_g(k) * a_g(k): the layer-wise REAP error times an amplification a_g measured (one
    masked forward pass each, on as many evaluation samples as ``Scheduling.probe`` finds it needs) at
    PROBES depths of the group and interpolated linearly in k. Groups are assumed to add: sequential reconstruction re-solves every consumer
    towards the original outputs, so one group's error is not amplified through the next group's
    pruned layers. These probes do not depend on the budget: they are measured once per Scheduling.

    With ``context`` (counts per group) the amplification is measured again at one depth per group,
    its count in the context (or its first probe depth), with every other group at its count: the error
    the group adds over the context without it, divided by its layer-wise error. That ratio rescales
    the group's curve of amplifications (a pass per group without it, the plan's own pass shared).
    A group's share is measured to CONTEXT_PRECISION of itself, or of the plan's error (``plan_error``,
    evaluated) spread evenly over the groups where its share is smaller: a share far below the average
    moves the plan little whatever its exact value, and pinning it down to 20 % of itself took most of
    the in-context samples (a difference of two errors, each far larger than it).
    """
    if ctx.amplifications is None:
        depths = {}
        for g, options in ctx.allowed.items():
            depths[g] = sorted({options[max(1, round(p * (len(options) - 1)))] for p in PROBES})
        ctx.amplifications = _measured(ctx, depths)
    curves = {g: _interpolated(ctx.curves[g].errors, points) for g, points in ctx.amplifications.items()}
    if context is None:
        return curves
    at = {g: context.get(g) or ctx.amplifications[g][0][0] for g in ctx.amplifications}
    local = _measured(ctx, {g: [k] for g, k in at.items()}, context, CONTEXT_FLOOR_SHARE * plan_error / max(len(at), 1))
    predict = {}
    for g, curve in curves.items():
        (k, ratio), = local[g]
        before = curve(k) / max(ctx.curves[g].errors[k], 1e-300)
        predict[g] = _scaled(curve, ratio / before if before > 1e-15 else 1.0)
    return predict


def _measured(ctx: Scheduling, depths: Mapping[int, Sequence[int]], context: Mapping[int, int] | None = None,
              floor: float = 0.0) -> dict[int, list[tuple[int, float]]]:
    """Per group, (k, final-output error / layer-wise error) at each of its ``depths``; in ``context``,
    the final-output error the group adds over the context without it (measured to CONTEXT_PRECISION of
    itself or of ``floor``, the larger)."""
    jobs = [(g, k) for g in depths for k in depths[g]]
    if context is None:
        pairs = [({g: ctx.curves[g].order[:k]}, None) for g, k in jobs]
    else:
        others = {g: {**ctx.removals(context), g: []} for g in depths}
        pairs = [({**others[g], g: ctx.curves[g].order[:k]}, others[g]) for g, k in jobs]
    if context is None:
        finals = ctx.probe(pairs)
    else:  # every state is the plan with one group changed: each runs from that group's first consumer on
        finals = ctx.probe(pairs, CONTEXT_PRECISION, base=ctx.removals(context), floor=floor)
    finals = [max(f, 0.0) for f in finals]
    measured: dict[int, list[tuple[int, float]]] = {}
    for (g, k), final in zip(jobs, finals):
        layer = ctx.curves[g].errors[k]
        measured.setdefault(g, []).append((k, final / layer if layer > 1e-15 else 0.0))
    return measured


def _precise(values: torch.Tensor, precision: float = PROBE_PRECISION, floor: float = 0.0) -> bool:
    """The mean of ``values`` is known to ``precision`` (standard error relative to the mean, or to
    ``floor`` where the mean is smaller), or is nil."""
    mean = float(values.mean())
    spread = float(values.std()) / len(values) ** 0.5 if len(values) > 1 else float("inf")
    return spread <= precision * max(abs(mean), floor) or abs(mean) <= 1e-15 and spread <= 1e-15


def _state_key(state: Mapping[int, Sequence[int]]) -> tuple:
    return tuple(sorted((g, tuple(r)) for g, r in state.items() if len(r)))


def _scaled(curve: Callable[[int], float], factor: float) -> Callable[[int], float]:
    return lambda k: factor * curve(k)


def _interpolated(errors: np.ndarray, points: list[tuple[int, float]]) -> Callable[[int], float]:
    """k -> errors[k] times the amplification interpolated linearly between the measured ``points``,
    tabulated for every k at once: the allocators ask for it hundreds of thousands of times (ResNet-50's
    37 groups: 0.9 M calls, each a scalar np.interp, 3 s of a 33 s search); the same values."""
    ks = np.array([k for k, _ in points], dtype=float)
    ratios = np.array([r for _, r in points])
    table = (np.asarray(errors, dtype=float) * np.interp(np.arange(len(errors), dtype=float), ks, ratios)).tolist()

    def predict(k: int) -> float:
        return table[k]
    return predict


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


def _latency_search(ctx: Scheduling, budget: Budget, schedule: str, progress: bool):
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
        keep = {g: sorted(set(range(ctx.curves[g].size)) - set(r)) for g, r in removals.items()}
        model = prune(graph, keep) if keep else graph.module
        return measure_ms(model, x, budget.device)

    original = latency({})
    if original <= aim:
        return {}, [], target, original, original
    if schedule == "uniform":
        counts = _uniform(ctx, lambda c: latency(c) <= aim, iterations=8)
        steps = [(g, k) for g, k in counts.items() if k]
    else:
        path = _greedy(ctx, schedule, 0, ctx.cost({g: o[-1] for g, o in ctx.allowed.items()}, 0), progress)
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
