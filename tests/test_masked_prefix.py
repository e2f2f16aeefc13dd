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


def test_errors_on_the_first_samples_equal_an_evaluator_built_on_them_alone():
    """The auto schedule's probes run on a subset (probe_samples): the same errors as an evaluator
    whose evaluation set is that subset."""
    x = data.load("digits").train_x[:256]
    graph = trace(zoo.create("resnet"), x[:1])
    ctx = prepare(graph, x, Budget(flops=0.5), batch_size=48, max_positions=16, eval_samples=128)
    small = prepare(graph, x, Budget(flops=0.5), batch_size=48, max_positions=16, eval_samples=72)
    states = [{g: ctx.curves[g].order[:2]} for g in sorted(ctx.curves)[:3]]
    on_subset = ctx.masked.errors_from_prefix(states, samples=72)
    assert on_subset == pytest.approx(small.masked.errors_from_prefix(states), rel=1e-6, abs=1e-12)
    assert on_subset != pytest.approx(ctx.masked.errors_from_prefix(states), rel=1e-3)  # a real subset
    assert [ctx.masked.error(s, 72) for s in states] == pytest.approx(on_subset, rel=1e-6, abs=1e-12)


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
    # the plan's error is measured on every evaluation sample either way, and a subset's probes stay close
    assert plans[64].predicted_error <= 1.5 * plans[None].predicted_error
