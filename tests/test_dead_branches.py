"""Budgets spent as surgery builds: a group that loses every channel takes the layers only it fed with it.

When another member's channels stand in for a whole group (MultiNet bridges, skip links), dead-code
elimination removes the layers that wrote it and every group only they read. The cost model counts
those as gone, and the schedule gives back any slack its last move left (``allocate.refill``).
"""
import pytest
import torch

import multinet
from multinet import data, zoo
from multinet.schedule.allocate import greedy, refill


pytestmark = pytest.mark.usefixtures("quiet_calibration")


def _curve_errors(curves):
    def errors_of(counts, moves):
        base = sum(curves[g][k] for g, k in counts.items())
        return [base - curves[g][counts[g]] + curves[g][k] for g, k in moves]
    return errors_of


def test_refill_gives_back_what_the_last_move_saved_beyond_the_budget():
    """Group 0's one move saves 75 (a branch going whole), groups 1 and 2 a unit per channel (convex
    curves). The greedy first takes the channels cheaper than the branch, then the branch, and lands
    below the target; refill gives channels back, most error per cost first, until the budget is spent
    (never past it): the same as the best split found exhaustively with the branch gone."""
    curves = {0: [0.0, 1.0], 1: [0.001 * k * k for k in range(31)], 2: [0.002 * k * k for k in range(31)]}
    allowed = {g: list(range(len(c))) for g, c in curves.items()}
    per_channel = {0: 75.0, 1: 1.0, 2: 1.0}

    def saving(counts, g, k):
        return per_channel[g] * (k - counts[g])

    errors_of = _curve_errors(curves)
    start, target = 160.0, 80.0
    path = greedy(allowed, saving, start, target, errors_of, {g: 1 for g in curves}, True)
    counts = {g: 0 for g in curves} | {s.group: s.count for s in path}
    assert path[-1].group == 0 and path[-1].cost < target - 1  # the branch went last, with budget to spare
    back = refill(allowed, saving, path[-1].cost, target, errors_of, {g: 1 for g in curves}, counts, path[-1].error)
    final = counts | {s.group: s.count for s in back}
    assert back and back[-1].cost == pytest.approx(target)
    assert all(s.cost <= target for s in back) and final[0] == 1
    best = min(curves[0][1] + curves[1][a] + curves[2][b] for a in range(31) for b in range(31)
               if 75 + a + b >= start - target)
    assert back[-1].error == pytest.approx(best)
    assert best < path[-1].error


def test_refill_changes_nothing_when_the_budget_is_met_exactly():
    curves = {0: [0.0, 1.0, 3.0], 1: [0.0, 2.0, 5.0]}
    allowed = {g: [0, 1, 2] for g in curves}
    back = refill(allowed, lambda c, g, k: float(k - c[g]), 4.0, 4.0, _curve_errors(curves), {0: 1, 1: 1},
                  {0: 1, 1: 1}, 3.0)
    assert back == []


def test_a_dead_branch_is_costed_as_gone_and_its_budget_spent_elsewhere():
    """VGG + MLP at 1 % of their FLOPs: the VGG digit classifier's head reads the MLP's hidden layer,
    its last conv group goes whole, and with it every conv before it (dead code). The plan's predicted
    cost is the pruned network's counted cost (it was 10x above it: the dead convs were costed as if
    they stayed), and the budget that frees is spent: the result sits at its target, not far below."""
    split = data.load("digits")
    models = {"vgg": zoo.create("vgg"), "mlp": zoo.create("mlp")}
    unified = multinet.unify(models, split.train_x[:512], budget=0.01, skip_links=False)
    plan = unified.result.plan
    assert unified.channels_after["vgg"][1] >= 2  # the VGG's conv groups went whole
    assert plan.measured_cost == pytest.approx(plan.predicted_cost)
    assert 0.9 * plan.target <= plan.measured_cost <= plan.target
    with torch.no_grad():
        out = unified.model(split.test_x)
    accuracy = float((out["vgg"].argmax(1) == split.test_y).float().mean())
    assert accuracy > 0.9  # 0.82 when the dead convs' cost was left unspent
