"""unify's speed check: a link trial whose fused network is slower than its members' separate networks is
dropped. Timing is never asserted (a shared box is noisy): the ratio is given, or the clock is fake."""
import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import multinet
from multinet import data, zoo
from multinet.unification import speed

pytestmark = pytest.mark.usefixtures("quiet_calibration")

MEASURED = speed.unified_vs_separate  # the real one (tests/conftest.py makes every test's neutral)


@pytest.fixture(scope="module")
def split():
    return data.load("digits")


def test_time_ratio_is_the_median_of_paired_rounds_that_take_turns():
    now, calls = [0.0], []

    def costs(name, seconds):
        def run():
            calls.append(name)
            now[0] += seconds.pop(0) if seconds else 1.0
        return run

    # rounds: (3 vs 1), (1 vs 2), (6 vs 2) -> ratios 3, 0.5, 3 -> median 3; the warm-up is not timed
    first = costs("first", [100.0, 3.0, 1.0, 6.0])
    second = costs("second", [100.0, 1.0, 2.0, 2.0])
    ratio = speed.time_ratio(first, second, rounds=3, clock=lambda: now[0])
    assert ratio == pytest.approx(3.0)
    # warm-up, then the order alternates: first goes first in rounds 0 and 2, second in round 1
    assert calls == ["first", "second", "first", "second", "second", "first", "first", "second"]


def _fake_pair(first_seconds, second_seconds):
    """Two callables that advance a fake clock by the next given duration each (1.0 once those run out),
    the clock, and how many times each ran."""
    now, runs = [0.0], {"first": 0, "second": 0}

    def costs(name, seconds):
        seconds = list(seconds)

        def run():
            runs[name] += 1
            now[0] += seconds.pop(0) if seconds else 1.0
        return run

    return costs("first", first_seconds), costs("second", second_seconds), (lambda: now[0]), runs


@pytest.mark.parametrize("first_time", [0.5, 1.5], ids=["clearly faster", "clearly slower"])
def test_a_clear_first_reading_is_settled_on_its_seven_rounds(first_time):
    first, second, clock, runs = _fake_pair([1.0] + [first_time] * 100, [1.0] * 101)
    assert speed.settled_ratio(first, second, clock=clock) == pytest.approx(first_time)
    assert runs == {"first": 1 + speed.SPEED_ROUNDS, "second": 1 + speed.SPEED_ROUNDS}


def test_a_reading_near_one_is_timed_again_and_judged_on_every_round():
    """Seven rounds read 1.03 (inside the band: kept under a 5 % slack, as before); the next 21 read 1.10.
    The settled ratio is the median of all 28 rounds (1.10), and it counts as slower."""
    rounds, more = speed.SPEED_ROUNDS, speed.CONFIRM_ROUNDS
    first, second, clock, runs = _fake_pair([1.0] + [1.03] * rounds + [1.10] * more, [1.0] * (1 + rounds + more))
    ratio = speed.settled_ratio(first, second, clock=clock)
    assert ratio == pytest.approx(1.10)
    assert runs == {"first": 1 + rounds + more, "second": 1 + rounds + more}  # one warm-up, not two
    assert speed.is_slower(ratio) and speed.is_slower(1.001) and not speed.is_slower(1.0)


def test_the_measured_ratio_runs_the_fused_part_and_every_separate_network(split):
    a, b = zoo.create("mlp"), zoo.create("mlp")
    net = multinet.MultiNet({"a": a, "b": b}, split.test_x[:1])
    ratio = MEASURED(net.fused(), [a, b], split.test_x[:64], rounds=3)
    assert ratio > 0 and torch.isfinite(torch.tensor(ratio))


def _unify(split, monkeypatch, ratio, **options):
    monkeypatch.setattr(speed, "unified_vs_separate", lambda *args, **kwargs: ratio)
    a = zoo.create("mlp")
    b = copy.deepcopy(a)  # a copy: unified, one model and a head are left; apart, two narrow models
    return multinet.unify({"a": a, "b": b}, split.train_x[:512], budget=0.3, **options), a


@pytest.mark.parametrize("ratio", [1.5, 1.02], ids=["much slower", "a little slower"])
def test_a_trial_slower_than_separate_is_dropped_and_every_member_keeps_its_separate_result(split, monkeypatch, ratio):
    unified, a = _unify(split, monkeypatch, ratio)
    assert unified.chosen == {"a": "separate", "b": "separate"}
    assert not unified.model.links and unified.speed == {}
    assert unified.slower_trials and all(t["time_ratio"] == ratio for t in unified.slower_trials)
    x = split.test_x[:128]
    with torch.no_grad():
        out = unified.model(x)
        for name in ("a", "b"):
            torch.testing.assert_close(out[name], unified.separate[name].model(x))


@pytest.mark.parametrize("ratio, check", [(0.5, True), (1.0, True), (1.5, False)],
                         ids=["faster", "as fast", "slower but unchecked"])
def test_a_trial_no_slower_or_unchecked_is_kept(split, monkeypatch, ratio, check):
    unified, _ = _unify(split, monkeypatch, ratio, speed_check=check)
    assert unified.chosen == {"a": "unified", "b": "unified"} and unified.model.links
    assert not unified.slower_trials
    assert unified.speed == ({"a + b": ratio} if check else {})


@pytest.mark.parametrize("check, size", [(True, 128), (200, 200), (np.int64(64), 64), (10_000, 512)],
                         ids=["batch_size", "given", "numpy int", "more than the data"])
def test_trials_are_timed_on_the_batch_asked_for(split, monkeypatch, check, size):
    seen = []
    monkeypatch.setattr(speed, "unified_vs_separate", lambda fused, separate, batch, **kw: seen.append(batch) or 1.0)
    a = zoo.create("mlp")
    multinet.unify({"a": a, "b": copy.deepcopy(a)}, split.train_x[:512], budget=0.3, speed_check=check)
    assert seen and all(torch.equal(b, split.train_x[:size]) for b in seen)


def test_a_bad_speed_check_is_refused(split):
    a = zoo.create("mlp")
    with pytest.raises(multinet.MultinetError, match="speed_check must be True, False or a batch size"):
        multinet.unify({"a": a, "b": copy.deepcopy(a)}, split.train_x[:256], budget=0.3, speed_check=0)


def test_progress_says_why_a_trial_was_dropped():
    """The progress line's outcome of a trial (the bar itself is throttled, so its text is not asserted)."""
    from multinet.unification.api import _outcome

    trials = SimpleNamespace(last_slower=None)
    assert _outcome(None, trials) == "dropped" and _outcome(object(), trials) == "kept"
    trials.last_slower = 1.5
    assert _outcome(None, trials) == "dropped: 1.50x the time of separate"


def test_a_real_unify_times_its_trials_on_compressed_networks(split, monkeypatch):
    """The measured ratio (not the tests' neutral one) on what unify really times: a fused part against
    compressed members' GraphModules. Which way it goes depends on the machine; only that it ran is asserted."""
    monkeypatch.setattr(speed, "unified_vs_separate", MEASURED)
    a = zoo.create("mlp")
    unified = multinet.unify({"a": a, "b": copy.deepcopy(a)}, split.train_x[:512], budget=0.3, speed_check=64)
    ratios = list(unified.speed.values()) + [t["time_ratio"] for t in unified.slower_trials]
    assert ratios and all(r > 0 for r in ratios)
