"""Scheduling under budgets: exact costs, budgets met, constraints honoured, the exhaustive search
checked against pruned models, the greedy against brute force, and clear errors."""
import itertools
import random

import pytest
import torch
import torch.nn as nn

import multinet
from multinet import Budget, BudgetError, MultinetError, Plan, count, data, prune, trace, zoo
from multinet.pipeline.group_problems import group_problems, to_layer_weights
from multinet.schedule import make_plan, prepare
from multinet.schedule.allocate import RememberedSavings, greedy
from multinet.schedule.costs import CostModel
from multinet.schedule.oneshot import output_error, run_outputs
from multinet.solve import reconstruct_multi


@pytest.fixture(scope="module")
def calib():
    return data.load("digits").train_x[:256]


pytestmark = pytest.mark.usefixtures("quiet_calibration")


def _random_removals(graph, rng):
    removed = {}
    for g in graph.prunable_groups:
        protect = {int(p[0]) for p in g.pieces} or {0}
        candidates = [c for c in range(g.size) if c not in protect]
        removed[g.id] = rng.sample(candidates, rng.randrange(0, len(candidates) + 1))
    return removed


@pytest.mark.parametrize("name", zoo.names())
def test_cost_model_matches_counting_pruned_models(name):
    graph = trace(zoo.create(name), zoo.example_input())
    model = CostModel(graph)
    full = count(graph.module)
    assert model.totals({}) == (full.flops, full.params)
    model.terms = [(m, t) for m, t in model.terms if t.needs is None]  # plain surgery adds no bias
    rng = random.Random(0)
    for _ in range(3):
        removed = _random_removals(graph, rng)
        keep = {g: [c for c in range(graph.group(g).size) if c not in set(r)] for g, r in removed.items()}
        real = count(prune(graph, keep), (zoo.example_input(),))
        assert model.totals(removed) == (real.flops, real.params)


def test_masked_evaluation_equals_the_pruned_one_shot_model(calib):
    graph = trace(zoo.create("densenet"), calib[:1])
    budget = Budget(flops=0.5)
    ctx = prepare(graph, calib, budget, eval_samples=128)
    for gid in list(ctx.allowed)[:3]:
        removed = ctx.curves[gid].order[: ctx.curves[gid].max_remove // 2 + 1]
        problems, layout = group_problems(graph, graph, graph.group(gid), _stats(calib, graph, gid), 1e-6, {})
        weights = to_layer_weights(problems, reconstruct_multi(problems, removed, 1e-6), layout, removed)
        keep = [c for c in range(graph.group(gid).size) if c not in set(removed)]
        pruned = prune(graph, {gid: keep}, consumer_weights=weights)
        expected = output_error(run_outputs(pruned, ctx.masked.inputs), ctx.masked.reference)
        assert ctx.masked.error({gid: removed}) == pytest.approx(expected, rel=1e-6, abs=1e-12)


def _stats(calib, graph, gid):
    """Statistics computed the way prepare() computes them, for an independent reconstruction."""
    from multinet.schedule.oneshot import one_shot_stats

    return one_shot_stats(graph, [gid], calib, 128, 256, "cpu", 0)


def test_exhaustive_first_step_is_the_best_pruned_candidate(calib):
    """Each group's first move, applied by real surgery and scored at the outputs, ranks as the search chose."""
    graph = trace(zoo.create("mlp"), calib[:1])
    ctx = prepare(graph, calib, Budget(flops=0.9), eval_samples=256)
    plan = make_plan(ctx, "exhaustive")
    first_group = plan.steps[0][0]
    cost = CostModel(graph)
    lookahead = {g: max(1, (len(o) - 1) // 16) for g, o in ctx.allowed.items()}
    scores = {}
    for gid, options in ctx.allowed.items():
        k = options[min(lookahead[gid], len(options) - 1)]
        removed = ctx.curves[gid].order[:k]
        stats = _stats(calib, graph, gid)
        problems, layout = group_problems(graph, graph, graph.group(gid), stats, 1e-6, {})
        weights = to_layer_weights(problems, reconstruct_multi(problems, removed, 1e-6), layout, removed)
        keep = [c for c in range(graph.group(gid).size) if c not in set(removed)]
        pruned = prune(graph, {gid: keep}, consumer_weights=weights)
        err = output_error(run_outputs(pruned, ctx.masked.inputs), ctx.masked.reference)
        saved = cost.totals({})[0] - cost.totals({gid: removed})[0]
        scores[gid] = err / saved
    assert first_group == min(scores, key=scores.get)


def test_greedy_matches_brute_force_on_convex_separable_problems():
    rng = random.Random(3)
    for _ in range(20):
        sizes = {g: rng.randrange(2, 6) for g in range(3)}
        curves = {g: [0.0] for g in sizes}
        for g, n in sizes.items():
            step = 0.0
            for _ in range(n):
                step += rng.random()  # increasing increments: convex
                curves[g].append(curves[g][-1] + step)
        allowed = {g: list(range(n + 1)) for g, n in sizes.items()}
        total = sum(sizes.values())
        target = rng.randrange(0, total)  # cost = channels left

        def errors_of(counts, moves):
            base = sum(curves[g][k] for g, k in counts.items())
            return [base - curves[g][counts[g]] + curves[g][k] for g, k in moves]

        path = greedy(allowed, lambda counts, g, k: k - counts[g], total, target, errors_of,
                      {g: 1 for g in sizes}, True)
        got = sum(curves[s.group][s.count] for s in {s.group: s for s in path}.values())
        best = min(sum(curves[g][k] for g, k in zip(sizes, ks))
                   for ks in itertools.product(*(range(n + 1) for n in sizes.values())) if total - sum(ks) <= target)
        assert got == pytest.approx(best)


@pytest.mark.parametrize("metric,schedule", [("flops", "auto"), ("params", "auto"), ("flops", "uniform"),
                                             ("params", "exhaustive")])
def test_budget_is_met_exactly(calib, metric, schedule):
    name = "mlp" if schedule == "exhaustive" else "resnet"
    result = multinet.compress(zoo.create(name), calib, budget=Budget(**{metric: 0.5}), schedule=schedule)
    before, after = ((result.flops_before, result.flops_after) if metric == "flops"
                     else (result.params_before, result.params_after))
    assert after <= 0.5 * before
    assert result.plan.measured_cost == after == pytest.approx(result.plan.predicted_cost)
    if schedule != "uniform":  # one channel at a time: stops within a few channels of the target
        assert after >= 0.5 * before * 0.97


def test_constraints_round_to_ignore_min_channels(calib):
    graph = trace(zoo.create("vgg"), calib[:1])
    first = graph.prunable_groups[0]
    budget = Budget(flops=0.4, round_to=4, ignore=(first.producers[0],), min_channels=8)
    result = multinet.compress(zoo.create("vgg"), calib, budget=budget)
    assert first.id not in {g.group for g in result.plan.groups}  # ignored: never scheduled
    layer = first.producers[0]
    assert result.model.get_submodule(layer).out_channels == graph.module.get_submodule(layer).out_channels
    for g in result.plan.groups:
        assert g.kept == g.size or (g.kept % 4 == 0 and g.kept >= 8)
    assert result.flops_after <= 0.4 * result.flops_before


def test_residual_streams_can_be_left_whole(calib):
    from multinet.schedule.budget import is_residual_stream

    graph = trace(zoo.create("resnet"), calib[:1])
    streams = [g.id for g in graph.prunable_groups if is_residual_stream(graph, g)]
    assert streams  # the zoo ResNet has residual streams, and they are groups like any other
    ctx = prepare(graph, calib, Budget(flops=0.6, residual_streams=False))
    assert not set(streams) & set(ctx.allowed)
    plan = make_plan(ctx, "auto")
    assert plan.predicted_cost <= 0.6 * ctx.original[0]


def test_plan_saves_loads_and_reapplies_identically(calib, tmp_path):
    path = tmp_path / "plans" / "plan.json"
    first = multinet.compress(zoo.create("resnet"), calib, budget=Budget(flops=0.6), plan_path=path)
    plan = Plan.load(path)
    assert plan.removals() == first.plan.removals()
    again = multinet.compress(zoo.create("resnet"), calib, plan=plan)
    x = calib[:32]
    with torch.no_grad():
        assert torch.equal(first.model(x), again.model(x))
    with pytest.raises(MultinetError, match="another model"):
        multinet.compress(zoo.create("vgg"), calib, plan=plan)
    path.write_text("{not json")
    with pytest.raises(MultinetError, match="not a multinet plan"):
        Plan.load(path)


def _flops_latency(model, example, device="cpu", **_):
    """A deterministic stand-in for a clock: 1 ms per 100k multiply-accumulates plus 0.1 ms overhead.

    Real latency is measured by ``benchmarks/latency_budget.py``; a test must not read a clock."""
    return 0.1 + count(model, example_inputs=(example,)).flops / 1e5


def test_latency_search_finds_the_shortest_fitting_prefix(monkeypatch):
    import multinet.pipeline.compression as compress_module
    import multinet.schedule.scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "measure_ms", _flops_latency)
    monkeypatch.setattr(compress_module, "measure_ms", _flops_latency)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 192), nn.ReLU(), nn.Linear(192, 192), nn.ReLU(), nn.Linear(192, 10))
    x = torch.randn(512, 64)
    batch = 8
    original = _flops_latency(trace(model, x[:1]).module, x[:batch])
    budget = Budget(latency_ms=0.5 * original, latency_batch=batch, latency_tolerance=0.2)
    result = multinet.compress(model, x, budget=budget, eval_samples=256)
    plan = result.plan
    aim = budget.latency_ms * (1 - budget.latency_tolerance / 2)
    assert plan.metric == "latency" and plan.original == pytest.approx(original)
    assert plan.predicted_cost <= aim
    assert plan.measured_cost == pytest.approx(_flops_latency(result.model, x[:batch]))
    assert plan.measured_cost == pytest.approx(plan.predicted_cost)
    # the bisection stops at the first fitting point of the FLOPs path: the move before it would not
    # fit, so the result lies within one move's latency of the aim (a channel: at most 64+192 MACs a sample)
    last = {}
    widest = 1
    for group, removed in plan.steps:
        widest = max(widest, removed - last.get(group, 0))
        last[group] = removed
    assert aim - plan.predicted_cost < widest * batch * (64 + 192) / 1e5


@pytest.mark.parametrize("kwargs,match", [
    (dict(flops=1.0), "must lie in"), (dict(flops=1.5), "must lie in"), (dict(params=0), "must lie in"),
    (dict(), "exactly one"), (dict(flops=0.5, params=0.5), "exactly one"), (dict(latency_ms=-1), "positive"),
    (dict(flops=0.5, round_to=0), "round_to"), (dict(flops=0.5, min_channels=-1), "min_channels"),
])
def test_malformed_budgets(kwargs, match):
    with pytest.raises(BudgetError, match=match):
        Budget(**kwargs)


def test_impossible_and_unusable_budgets(calib):
    model = zoo.create("resnet")
    with pytest.raises(BudgetError, match="below"):
        multinet.compress(model, calib, budget=Budget(flops=0.1, ignore=("stem*", "blocks.0*", "blocks.1*")))
    with pytest.raises(BudgetError, match="matches no layer"):
        multinet.compress(model, calib, budget=Budget(flops=0.5, ignore=("no_such_layer",)))
    with pytest.raises(BudgetError, match="unknown schedule"):
        multinet.compress(model, calib, budget=Budget(flops=0.5), schedule="fastest")
    with pytest.raises(MultinetError, match="one of ratio"):
        multinet.compress(model, calib, ratio=0.5, budget=Budget(flops=0.5))
    with pytest.raises(MultinetError, match="ratio= only"):
        multinet.compress(model, calib, budget=Budget(flops=0.5), method="magnitude")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_latency_budget_on_an_absent_device(calib):
    with pytest.raises(BudgetError, match="no CUDA device"):
        multinet.compress(zoo.create("mlp"), calib, budget=Budget(latency_ms=1.0, device="cuda"))


def test_remembered_savings_equal_fresh_ones(calib):
    """PrefixCosts.change remembers savings by the counts of the groups its terms depend on: the
    same answers as recomputing them, along random walks on a network whose groups interact."""
    graph = trace(zoo.create("densenet"), calib[:1])
    model = CostModel(graph)
    rng = random.Random(1)
    orders = {g.id: rng.sample(range(g.size), g.size - 1) for g in graph.prunable_groups}
    remembered = model.along(orders)
    counts = {g: 0 for g in orders}
    for _ in range(20):
        fresh = model.along(orders)
        for g in orders:  # every group's next move, as the greedy asks: most answers are remembered
            k = min(counts[g] + 1 + rng.randrange(3), len(orders[g]))
            assert remembered.change(counts, g, k) == fresh.change(counts, g, k)
            before, after = fresh(counts), fresh({**counts, g: k})
            assert remembered.change(counts, g, k) == pytest.approx((before[0] - after[0], before[1] - after[1]))
        g = rng.choice(list(orders))
        counts[g] = min(counts[g] + rng.randrange(1, 4), len(orders[g]))
    assert len(remembered._saved) < 20 * len(orders)


@pytest.mark.parametrize("name", ["densenet", "resnet"])
def test_savings_remembered_between_allocator_steps_equal_fresh_ones(calib, name):
    """The allocators keep a move's saving until a group it depends on moves (RememberedSavings): along
    random walks whose moves also empty groups and refill them (every remembered value is dropped then),
    each answer equals a fresh cost model's, exactly, and most answers come from memory."""
    graph = trace(zoo.create(name), calib[:1])
    model = CostModel(graph)
    rng = random.Random(3)
    orders = {g.id: rng.sample(range(g.size), g.size) for g in graph.prunable_groups}
    costs = model.along(orders)
    asked = []

    def saving(counts, g, k):
        if k < model.sizes[g] and counts[g] < model.sizes[g]:  # a move that may be remembered
            asked.append((g, k))
        return costs.change(counts, g, k)[0]

    remembered = RememberedSavings(saving, costs.neighbours, model.sizes)
    counts, answers = {g: 0 for g in orders}, 0
    for step in range(40):
        fresh = model.along(orders)
        for g in orders:
            size = len(orders[g])
            for k in sorted({min(counts[g] + 1, size), min(counts[g] + 2, size), size}):
                answers += k < size and counts[g] < size  # the moves that may be remembered
                assert remembered(counts, g, k) == fresh.change(counts, g, k)[0]
        g = rng.choice(list(orders))
        size = len(orders[g])
        k = size if step % 7 == 6 else (rng.randrange(size) if counts[g] == size else min(counts[g] + 1, size - 1))
        remembered.moved(g, counts[g], k)
        counts[g] = k
    assert len(asked) < 0.7 * answers  # the rest came from memory


@pytest.mark.parametrize("name", ["densenet", "resnet"])
def test_savings_of_groups_going_whole_equal_whole_network_differences(calib, name):
    """A group that goes whole (or comes back) takes with it every group only its writers read (dead
    code): its saving is computed from the terms of the groups that died or revived, and equals the
    difference of the whole network's costs, along random walks that empty groups and refill them."""
    graph = trace(zoo.create(name), calib[:1])
    model = CostModel(graph)
    rng = random.Random(2)
    orders = {g.id: rng.sample(range(g.size), g.size) for g in graph.prunable_groups}
    costs = model.along(orders)
    counts = {g: 0 for g in orders}
    died = 0
    for _ in range(25):
        for g in orders:
            size = len(orders[g])
            for k in {size, rng.randrange(size), max(0, counts[g] - 1)}:
                before, after = costs(counts), costs({**counts, g: k})
                died += len(costs._dead({**counts, g: k})) > len(costs._dead(counts)) + (k == size)
                assert costs.change(counts, g, k) == pytest.approx((before[0] - after[0], before[1] - after[1]),
                                                                   rel=1e-9, abs=1e-6)
        g = rng.choice(list(orders))
        counts[g] = rng.choice([len(orders[g]), rng.randrange(len(orders[g]) + 1)])
    assert died  # some moves killed other groups with them: the case this checks


def test_the_search_reuses_the_curves_inverse_grams(calib, monkeypatch):
    """The masked evaluator is handed the inverses the REAP curves factored on the same statistics: the
    search factors no consumer again, and the plan is the one it makes when it factors its own."""
    from multinet.schedule import oneshot

    factored = []
    invert = oneshot.invert
    monkeypatch.setattr(oneshot, "invert", lambda *a, **k: factored.append(1) or invert(*a, **k))
    graph = trace(zoo.create("resnet"), zoo.example_input())
    budget = Budget(flops=0.5)
    shared = make_plan(prepare(graph, calib, budget, max_positions=16), "auto")
    assert not factored
    monkeypatch.setattr(oneshot.MaskedModel, "adopt_inverses", lambda self, problems, names: None)
    alone = make_plan(prepare(graph, calib, budget, max_positions=16), "auto")
    assert factored  # without them the evaluator factors its own
    assert shared.removals() == alone.removals() and shared.steps == alone.steps
    assert shared.predicted_error == alone.predicted_error


def test_deep_removals_are_refit_from_the_kept_columns(calib, monkeypatch):
    """The masked evaluator refits a consumer that loses most of its columns from the kept ones (cheaper
    than downdating): the outputs equal the downdated re-solve's."""
    from multinet.solve.refit import ColumnRefit

    graph = trace(zoo.create("vgg"), zoo.example_input())
    ctx = prepare(graph, calib, Budget(flops=0.5), max_positions=16)
    deep = {g: c.order[: int(0.9 * len(c.order))] for g, c in ctx.curves.items()}
    used = []
    kept_form = ColumnRefit._kept_form
    monkeypatch.setattr(ColumnRefit, "_kept_form", lambda self, *a: used.append(1) or kept_form(self, *a))
    refit = ctx.masked.error(deep)
    assert used
    monkeypatch.setattr(ColumnRefit, "_kept_form_cheaper", lambda self, s: False)
    ctx.masked._loaded = {name: () for name in ctx.masked.consumers}  # forget what is loaded
    assert ctx.masked.error(deep) == pytest.approx(refit, rel=1e-9)