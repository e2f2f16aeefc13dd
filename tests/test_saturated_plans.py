"""Where the scheduled plan's predicted error is too large to rank plans by, compress applies the
uniform plan too and keeps the one whose applied model has the least final-output error."""
import importlib
import warnings

import pytest
import torch

import multinet
from multinet import Budget, MultinetError, Plan, data, zoo
from multinet.runtime.checkpoint import RunState
from multinet.schedule import make_plan, prepare

compression = importlib.import_module("multinet.pipeline.compression")
pytestmark = pytest.mark.usefixtures("quiet_calibration")
SETTINGS = dict(max_positions=16, eval_samples=256)


@pytest.fixture(scope="module")
def calib():
    return data.load("digits").train_x[:256]


def _compress(monkeypatch, calib, threshold: float, budget: float | None, **kwargs):
    monkeypatch.setattr(compression, "SATURATED_ERROR", threshold)
    budget = None if budget is None else Budget(flops=budget)
    return multinet.compress(zoo.create("resnet"), calib, budget=budget, **SETTINGS, **kwargs)


def _outputs(result, calib):
    with torch.no_grad():
        return result.model(calib[:64])


def _filled_uniform(calib, budget: float) -> Plan:
    """The uniform plan with its unspent budget given back, made as compress makes the one it compares."""
    graph = multinet.trace(zoo.create("resnet"), calib[:1])
    return make_plan(prepare(graph, calib, Budget(flops=budget), **SETTINGS), "uniform", fill=True)


@pytest.mark.parametrize("budget", [0.04, 0.3])
def test_the_kept_plan_is_the_one_with_the_least_measured_error(monkeypatch, calib, budget):
    alone = _compress(monkeypatch, calib, float("inf"), budget)  # the scheduled plan alone
    uniform = _compress(monkeypatch, calib, float("inf"), None, plan=_filled_uniform(calib, budget))
    compared = _compress(monkeypatch, calib, 0.0, budget)
    assert alone.plan.compared == {} and uniform.plan.compared == {}
    assert compared.plan.compared == pytest.approx({"auto": alone.plan.measured_error,
                                                    "uniform": uniform.plan.measured_error}, rel=1e-6)
    winner = min((alone, uniform), key=lambda r: r.plan.measured_error)
    assert compared.plan.schedule == winner.plan.schedule
    assert compared.plan.measured_error == pytest.approx(winner.plan.measured_error, rel=1e-6)
    assert compared.plan.removals() == winner.plan.removals()
    torch.testing.assert_close(_outputs(compared, calib), _outputs(winner, calib))
    assert compared.flops_after == winner.flops_after


def test_both_winners_occur_on_the_zoo_resnet(monkeypatch, calib):
    """The comparison is not decorative: at 4 % of FLOPs the uniform plan applies better, at 30 % auto's
    (measured here: 28.5 against 0.59, and 0.0105 against 0.0139)."""
    winners = {b: _compress(monkeypatch, calib, 0.0, b).plan.schedule for b in (0.04, 0.3)}
    assert winners == {0.04: "uniform", 0.3: "auto"}


def test_the_uniform_plan_compared_spends_the_budget_its_common_fraction_leaves(calib):
    """Filled, the uniform plan costs more (never over the budget), keeps channels only where the plain
    one removes them, and is predicted to lose less; at 2 % of the ResNet's FLOPs the plain one leaves
    slack (the common fraction moves in jumps), and applied it measures a lower error (here 0.80 against 1.19)."""
    graph = multinet.trace(zoo.create("resnet"), calib[:1])
    ctx = prepare(graph, calib, Budget(flops=0.02), **SETTINGS)
    plain, filled = make_plan(ctx, "uniform"), make_plan(ctx, "uniform", fill=True)
    assert plain.predicted_cost < filled.predicted_cost <= filled.target
    removed = {g.group: len(g.removed) for g in plain.groups}
    assert all(len(g.removed) <= removed[g.group] for g in filled.groups)
    applied = {name: multinet.compress(zoo.create("resnet"), calib, plan=p, **SETTINGS).plan.measured_error
               for name, p in (("plain", plain), ("filled", filled))}
    assert applied["filled"] < applied["plain"]


def test_when_plans_are_compared():
    plan = Plan("auto", {}, "flops", 1.0, 2.0, 1.0, 0.6, [], [])
    assert compression._compares_uniform(plan, "sequential")
    assert compression._compares_uniform(plan, "reference")
    assert not compression._compares_uniform(plan, "oneshot")  # applies what the scheduler measured
    for changed in (dict(schedule="uniform"), dict(metric="latency"), dict(predicted_error=0.49)):
        assert not compression._compares_uniform(Plan(**{**plan.__dict__, **changed}), "sequential")


def test_one_shot_runs_are_not_compared(monkeypatch, calib):
    result = _compress(monkeypatch, calib, 0.0, 0.04, mode="oneshot")
    assert result.plan.compared == {} and result.plan.schedule == "auto"


def test_the_kept_plan_is_saved_with_what_it_was_compared_with(monkeypatch, calib, tmp_path):
    result = _compress(monkeypatch, calib, 0.0, 0.04, plan_path=tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded.compared == result.plan.compared and set(loaded.compared) == {"auto", "uniform"}
    assert loaded.removals() == result.plan.removals()


def test_a_compared_run_killed_in_its_second_application_resumes(monkeypatch, calib, tmp_path):
    fresh = _compress(monkeypatch, calib, 0.0, 0.04)
    record = RunState.record

    def record_then_fail(self, *args, **kwargs):
        record(self, *args, **kwargs)
        if self.dir.name == compression.UNIFORM_RUN and len(args[2]) == 2:
            raise KeyboardInterrupt  # killed after the uniform plan's second group

    monkeypatch.setattr(RunState, "record", record_then_fail)
    with pytest.raises(KeyboardInterrupt):
        _compress(monkeypatch, calib, 0.0, 0.04, run_dir=tmp_path / "run")
    monkeypatch.setattr(RunState, "record", record)
    assert (tmp_path / "run" / "plan.json").exists() and (tmp_path / "run" / "uniform" / "plan.json").exists()

    solves = []
    sequential = importlib.import_module("multinet.pipeline.sequential")
    solve_group = sequential.solve_group
    monkeypatch.setattr(sequential, "solve_group", lambda *a, **k: solves.append(a[2].id) or solve_group(*a, **k))
    monkeypatch.setattr(compression, "prepare", _never)  # the plans are loaded, not scheduled again
    resumed = _compress(monkeypatch, calib, 0.0, 0.04, run_dir=tmp_path / "run")
    uniform_groups = len(Plan.load(tmp_path / "run" / "uniform" / "plan.json").removals())
    assert len(solves) == uniform_groups - 2  # the first plan finished, the uniform one resumed
    assert resumed.plan.compared == pytest.approx(fresh.plan.compared, rel=1e-6)
    torch.testing.assert_close(_outputs(resumed, calib), _outputs(fresh, calib))


def _never(*args, **kwargs):
    raise AssertionError("scheduled again")


def test_the_cli_reports_the_comparison(monkeypatch, capsys):
    monkeypatch.setattr(compression, "SATURATED_ERROR", 0.0)
    from multinet.cli import main

    assert main(["compress", "zoo:resnet", "--flops", "0.04", "--calibration", "256", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "auto and uniform plans were both applied" in out and "plan kept" in out


def test_a_scenario_report_says_which_plans_were_compared():
    from multinet.scenario.report import markdown

    plan = dict(schedule="uniform", metric="flops", target=4.0, original=100.0, predicted_error=0.96,
                measured_error=0.65, compared={"auto": 0.82, "uniform": 0.65})
    report = dict(scenario="s", steps=[dict(kind="compress", seconds=1.0, models={"m": dict(plan=plan, groups=[])})])
    text = markdown(report)
    assert "applied and measured auto 0.82000, uniform 0.65000; the uniform plan kept" in text


def test_a_plan_over_its_target_is_not_kept_however_low_its_error(monkeypatch, calib):
    measure = compression._measure

    def uniform_overshoots(plan, *args, **kwargs):
        measure(plan, *args, **kwargs)
        if plan.schedule == "uniform":
            plan.measured_cost = plan.target + 1  # as surgery keeping a channel the cost model let go

    monkeypatch.setattr(compression, "_measure", uniform_overshoots)
    result = _compress(monkeypatch, calib, 0.0, 0.04)  # uniform measures far lower here (see above)
    assert result.plan.schedule == "auto" and set(result.plan.compared) == {"auto", "uniform"}
    assert result.plan.compared["uniform"] < result.plan.compared["auto"]


def test_only_the_kept_applications_warnings_are_shown(monkeypatch, calib):
    applied = compression._applied

    def warning(original, plan, *args):
        warnings.warn(f"applying the {plan.schedule} plan")
        return applied(original, plan, *args)

    monkeypatch.setattr(compression, "_applied", warning)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _compress(monkeypatch, calib, 0.0, 0.04)
    shown = [str(w.message) for w in caught if str(w.message).startswith("applying")]
    assert shown == [f"applying the {result.plan.schedule} plan"] and result.plan.schedule == "uniform"


def test_the_time_of_the_plan_not_kept_is_counted(monkeypatch, calib):
    result = _compress(monkeypatch, calib, 0.0, 0.04)
    assert result.plan.seconds["other plans"] > 0
    assert result.seconds >= sum(result.plan.seconds.values())


def test_a_plan_applied_again_reports_no_comparison(monkeypatch, calib, tmp_path):
    first = _compress(monkeypatch, calib, 0.0, 0.04, plan_path=tmp_path / "plan.json")
    assert first.plan.compared
    again = multinet.compress(zoo.create("resnet"), calib, plan=Plan.load(tmp_path / "plan.json"), **SETTINGS)
    assert again.plan.compared == {}
    torch.testing.assert_close(_outputs(again, calib), _outputs(first, calib))


def test_plan_path_may_not_be_the_run_directorys_own_plan(monkeypatch, calib, tmp_path):
    with pytest.raises(MultinetError, match="run directory's own plan"):
        _compress(monkeypatch, calib, 0.0, 0.04, run_dir=tmp_path / "run", plan_path=tmp_path / "run" / "plan.json")


def test_plans_another_run_left_in_a_run_directory_are_refused(monkeypatch, calib, tmp_path):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stopped after scheduling, before the first group

    applied = compression._applied
    monkeypatch.setattr(compression, "_applied", killed)
    with pytest.raises(KeyboardInterrupt):
        _compress(monkeypatch, calib, 0.0, 0.04, run_dir=tmp_path / "run")
    monkeypatch.setattr(compression, "_applied", applied)
    assert (tmp_path / "run" / "plan.json").exists() and not (tmp_path / "run" / "progress.json").exists()
    with pytest.raises(MultinetError, match="holds a run with other arguments"):
        _compress(monkeypatch, calib, 0.0, 0.05, run_dir=tmp_path / "run")
    monkeypatch.setattr(compression, "prepare", _never)
    resumed = _compress(monkeypatch, calib, 0.0, 0.04, run_dir=tmp_path / "run")  # the same arguments: resumed
    assert set(resumed.plan.compared) == {"auto", "uniform"}
