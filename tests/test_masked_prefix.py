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
