"""The masked evaluator's prefix reuse: errors of many removal states from one frontier equal the
errors of full passes (the scheduler's probes run only what a state can change)."""
import pytest
import torch

from multinet import Budget, data, trace, zoo
from multinet.schedule.scheduler import prepare


@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
def test_errors_from_a_shared_prefix_equal_full_passes(name):
    x = data.load("digits").train_x[:256]
    ctx = prepare(trace(zoo.create(name), x[:1]), x, Budget(flops=0.5), batch_size=64, max_positions=16,
                  eval_samples=128)
    gen = torch.Generator().manual_seed(0)
    groups = sorted(ctx.curves)
    states = [{}]
    for g in groups[::2]:  # one group at a time, at a random depth of its curve, plus pairs
        k = int(torch.randint(1, ctx.curves[g].max_remove + 1, (1,), generator=gen))
        states.append({g: ctx.curves[g].order[:k]})
    states.append({groups[0]: ctx.curves[groups[0]].order[:1], groups[-1]: ctx.curves[groups[-1]].order[:2]})
    fast = ctx.masked.errors_from_prefix(states)
    full = [ctx.masked.error(s) for s in states]
    assert fast[0] == pytest.approx(0.0, abs=1e-12)
    assert fast == pytest.approx(full, rel=1e-6, abs=1e-12)
    assert len(set(ctx.masked.first_change.values())) > 1  # the groups really start at different nodes


def test_per_sample_errors_average_to_the_error_and_slice_any_range():
    """The auto schedule's probes run on a few evaluation samples at a time: per-sample errors whose mean
    over all samples is the final-output error, and whose values on a range of samples do not depend on
    which other samples were run (batches cut at both ends)."""
    x = data.load("digits").train_x[:256]
    ctx = prepare(trace(zoo.create("resnet"), x[:1]), x, Budget(flops=0.5), batch_size=48, max_positions=16,
                  eval_samples=128)
    states = [{}] + [{g: ctx.curves[g].order[:2]} for g in sorted(ctx.curves)[:3]]
    whole = ctx.masked.sample_errors(states, 0, 128)
    assert [len(e) for e in whole] == [128] * len(states)
    assert [float(e.mean()) for e in whole] == pytest.approx(ctx.masked.errors_from_prefix(states), rel=1e-9)
    assert float(whole[0].abs().max()) == 0.0
    part = ctx.masked.sample_errors(states, 40, 100)  # starts and ends inside a batch of 48
    for a, b in zip(part, whole):
        torch.testing.assert_close(a, b[40:100], rtol=1e-9, atol=1e-15)
    # states that vary one plan (the in-context re-probes) run from the plan's frontier: the same errors
    groups = sorted(ctx.curves)
    plan = {g: ctx.curves[g].order[:3] for g in groups}
    varied = [plan, {**plan, groups[0]: []}, {**plan, groups[-1]: []}, {**plan, groups[2]: ctx.curves[groups[2]].order[:5]}]
    from_plan = ctx.masked.sample_errors(varied, 0, 128, base=plan)
    from_original = ctx.masked.sample_errors(varied, 0, 128)
    for a, b in zip(from_plan, from_original):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
    assert float(from_plan[0].mean()) == pytest.approx(ctx.masked.error(plan), rel=1e-6)


def test_a_probe_stops_when_its_estimate_is_precise_and_goes_on_where_it_is_not():
    from multinet.schedule import scheduler

    x = data.load("digits").train_x[:512]
    ctx = prepare(trace(zoo.create("resnet"), x[:1]), x, Budget(flops=0.5), batch_size=64, max_positions=16,
                  eval_samples=512, probe_samples=None)
    g = sorted(ctx.curves)[1]
    states = [{g: ctx.curves[g].order[:k]} for k in (1, ctx.curves[g].max_remove // 2)]
    exact = ctx.masked.errors_from_prefix(states)
    before = ctx.evaluations
    estimates = ctx.probe([(s, None) for s in states] + [({}, None)])
    spent = ctx.evaluations - before
    assert estimates[-1] == 0.0
    for estimate, truth in zip(estimates, exact):
        assert estimate == pytest.approx(truth, rel=0.35)  # 10 % standard error: well inside 3.5 of them
    assert spent < 3 * 1.0  # three probes, none of them run on all 512 samples...
    # ... and each on at least the samples its own precision asked for
    per_sample = ctx.masked.sample_errors(states, 0, 512)
    first = [scheduler._precise(e[:scheduler.PROBE_FIRST].double()) for e in per_sample]
    assert spent >= (3 * scheduler.PROBE_FIRST + sum(not f for f in first) * scheduler.PROBE_FIRST) / 512 - 1e-9
    # a pair: the first state's error over the second's, sample by sample
    paired = ctx.probe([(states[1], states[0])])[0]
    assert paired == pytest.approx(exact[1] - exact[0], rel=0.35)


def test_auto_probes_on_a_subset_cost_a_fraction_of_the_evaluations():
    from multinet.schedule import make_plan

    x = data.load("digits").train_x[:256]
    graph = trace(zoo.create("resnet"), x[:1])
    plans = {}
    for probes in (None, 64):
        ctx = prepare(graph, x, Budget(flops=0.5), batch_size=64, max_positions=16, eval_samples=256,
                      probe_samples=probes)
        plans[probes] = make_plan(ctx, "auto")
    assert plans[64].evaluations < 0.5 * plans[None].evaluations
    assert plans[64].predicted_cost <= plans[64].target and plans[None].predicted_cost <= plans[None].target
    # the plan's error is itself probed (at most probe_samples), and a subset's probes stay close
    assert plans[64].predicted_error <= 1.5 * plans[None].predicted_error


def test_the_auto_plan_is_checked_on_a_probe_not_on_every_evaluation_sample(monkeypatch):
    """The check of the plan against its prediction runs on as few samples as a 5 % standard error needs:
    on a real calibration set, full passes over 1,024 evaluation samples were a third of the schedule."""
    from multinet.schedule import make_plan
    from multinet.schedule.scheduler import Scheduling

    x = data.load("digits").train_x[:512]
    ctx = prepare(trace(zoo.create("resnet"), x[:1]), x, Budget(flops=0.5), batch_size=64, max_positions=16,
                  eval_samples=512, probe_samples=None)

    def no_full_pass(self, states):
        raise AssertionError("auto evaluated a plan on every evaluation sample")

    monkeypatch.setattr(Scheduling, "errors", no_full_pass)
    plan = make_plan(ctx, "auto")
    monkeypatch.undo()
    full = ctx.masked.errors_from_prefix([plan.removals()])[0]
    assert plan.predicted_error == pytest.approx(full, rel=0.35)  # a 5 % standard error, 7 of them


def test_a_share_far_below_the_floor_stops_at_the_floor_s_precision():
    """In-context re-probes measure a group's share of a plan (a difference of two errors): a share far
    below the plan's average group share is measured to 20 % of that average, not of itself."""
    from multinet.schedule import scheduler

    x = data.load("digits").train_x[:512]
    ctx = prepare(trace(zoo.create("resnet"), x[:1]), x, Budget(flops=0.5), batch_size=64, max_positions=16,
                  eval_samples=512, probe_samples=None)
    groups = sorted(ctx.curves)
    plan = {g: ctx.curves[g].order[:ctx.curves[g].max_remove // 2] for g in groups}
    g = groups[1]
    pair = [({**plan, g: ctx.curves[g].order[:1]}, {**plan, g: []})]  # one channel more than nothing: a tiny share
    plan_error = ctx.masked.errors_from_prefix([plan])[0]
    spent = {}
    for floor in (0.0, plan_error):
        before = ctx.evaluations
        estimate = ctx.probe(pair, scheduler.CONTEXT_PRECISION, floor=floor)[0]
        spent[floor] = ctx.evaluations - before
        assert abs(estimate) < plan_error
    assert spent[plan_error] < 0.5 * spent[0.0]
    per_sample = ctx.masked.sample_errors([pair[0][0], pair[0][1]], 0, 512)
    difference = (per_sample[0] - per_sample[1]).double()
    assert not scheduler._precise(difference, scheduler.CONTEXT_PRECISION)  # on its own it never got precise
    assert scheduler._precise(difference, scheduler.CONTEXT_PRECISION, plan_error)
