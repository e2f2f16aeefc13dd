"""Per-output weights in the schedule's objective, and the auto schedule's check of its own prediction."""
import pytest
import torch
import torch.nn as nn

import multinet
from multinet import data
from multinet.schedule import prepare
from multinet.schedule.budget import BudgetError
from multinet.schedule.scheduler import AUTO_TRUST, make_plan

pytestmark = pytest.mark.usefixtures("quiet_calibration")


class TwoHeads(nn.Module):
    """A shared trunk and two heads: the budget must be split between what each output needs."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU())
        self.a = nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10))
        self.b = nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        h = self.trunk(x)
        return self.a(h), self.b(h)


class Substitutes(nn.Module):
    """Two branches computing the same features: either alone can stand in for the other, so their
    groups' errors do not add (removing most of both loses what removing most of one does not)."""

    def __init__(self):
        super().__init__()
        self.left, self.right = nn.Linear(64, 24), nn.Linear(64, 24)
        with torch.no_grad():
            self.right.weight.copy_(self.left.weight.flip(0))
            self.right.bias.copy_(self.left.bias.flip(0))
        self.head = nn.Linear(48, 10)

    def forward(self, x):
        x = x.flatten(1)
        return self.head(torch.cat([torch.relu(self.left(x)), torch.relu(self.right(x))], 1))


@pytest.fixture(scope="module")
def calib():
    return data.load("digits").train_x[:512]


def _relative(out, ref) -> float:
    return float(((out - ref) ** 2).sum() / (ref ** 2).sum())


def test_weighting_an_output_moves_the_removals_away_from_it(calib):
    torch.manual_seed(0)
    model = TwoHeads().eval()
    with torch.no_grad():
        ref_a, ref_b = model(calib)
    errors = {}
    for weights in ((1, 30), (30, 1)):
        result = multinet.compress(model, calib, budget=multinet.Budget(flops=0.4, output_weights=weights))
        with torch.no_grad():
            out_a, out_b = result.model(calib)
        errors[weights] = (_relative(out_a, ref_a), _relative(out_b, ref_b))
        assert result.flops_after <= 0.4 * result.flops_before
    assert errors[(1, 30)][1] < errors[(30, 1)][1]  # b is kept better when it weighs more
    assert errors[(30, 1)][0] < errors[(1, 30)][0]  # and a likewise


def test_bad_output_weights_are_refused(calib):
    for weights in ((), (1, -1), (1, float("nan")), (1, "2")):
        with pytest.raises(BudgetError, match="output_weights"):
            multinet.Budget(flops=0.5, output_weights=weights)
    with pytest.raises(BudgetError, match="2 outputs"):
        multinet.compress(TwoHeads().eval(), calib, budget=multinet.Budget(flops=0.5, output_weights=(1, 2, 3)))


def test_the_auto_plans_prediction_is_checked_against_its_evaluation(calib):
    """Where groups do not add, the plan is re-searched on amplifications measured in its context, and
    the error it reports is the evaluated one: never an optimistic sum of groups taken alone."""
    torch.manual_seed(0)
    model = Substitutes().eval()
    graph = multinet.trace(model, calib[:1])
    ctx = prepare(graph, calib, multinet.Budget(flops=0.3))
    plan = make_plan(ctx, "auto")
    evaluated = ctx.errors([plan.removals()])[0]
    assert evaluated <= AUTO_TRUST * plan.predicted_error + 1e-12
    assert plan.predicted_cost <= plan.target
    # the additive prediction alone would have promised far less than it delivers
    from multinet.schedule import scheduler

    additive = scheduler._greedy(ctx, "auto", 0, plan.target, False)
    counts = scheduler.counts_at(additive, len(additive))
    assert ctx.errors([ctx.removals(counts)])[0] > AUTO_TRUST * additive[-1].error
    assert evaluated <= ctx.errors([ctx.removals(counts)])[0] + 1e-12  # and the kept plan is no worse


class _Regressor(torch.nn.Module):
    """One number per sample: a 1-D output (N,), as a regression head with ``squeeze(1)`` gives."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(64, 32), torch.nn.Linear(32, 16), torch.nn.Linear(16, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x.flatten(1)))))).squeeze(1)


def test_a_one_number_per_sample_output_is_scheduled_and_unified():
    """Final-output errors read every output as a matrix with a row per sample: a 1-D output used to fail
    there (flatten(1) of an N-vector)."""
    from multinet.schedule.oneshot import output_parts

    assert [p.shape for p in output_parts({"y": torch.randn(5), "loss": torch.tensor(1.0)})] == [(5, 1), (1, 1)]
    x = multinet.data.load("digits").train_x[:256]
    torch.manual_seed(0)
    model = _Regressor().eval()
    result = multinet.compress(model, x, budget=multinet.Budget(flops=0.3))
    assert result.flops_after <= 0.3 * result.flops_before and result.plan.measured_error < 0.2
    unified = multinet.unify({"a": model, "b": _Regressor().eval()}, x, budget=0.3)
    with torch.no_grad():
        assert unified.model(x[:4])["a"].shape == (4,)
