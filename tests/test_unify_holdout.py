"""unify's held-out samples: what is fitted never sees them, the choice is fitted again on all samples."""
import copy

import pytest
import torch

import multinet
from multinet import MultinetError, data, zoo
from multinet.calib import iterate_batches
from multinet.unification.holdout import MIN_HELD, FitSamples, held_out, holdout_step

pytestmark = pytest.mark.usefixtures("quiet_calibration")


@pytest.fixture(scope="module")
def split():
    return data.load("digits")


def _rows(batches, key=None) -> torch.Tensor:
    return torch.cat([b[key] if key is not None else b for b in iterate_batches(batches)])


@pytest.mark.parametrize("batch_size", [7, 32, 100])
def test_fit_and_held_out_samples_split_the_set(batch_size):
    x = torch.arange(100.0)[:, None].repeat(1, 3)  # sample i holds i
    fit, held = FitSamples(x, batch_size, 5), held_out(x, batch_size, 5, limit=100)
    fit_ids = _rows(fit)[:, 0].long().tolist()
    held_ids = torch.cat(held)[:, 0].long().tolist()
    assert held_ids == list(range(4, 100, 5))
    assert sorted(fit_ids + held_ids) == list(range(100))
    assert _rows(fit).shape[0] == len(list(_rows(fit)))  # iterable again, same samples
    assert torch.cat(held_out(x, batch_size, 5, limit=7))[:, 0].long().tolist() == held_ids[:7]


def test_tuple_and_dict_batches_keep_their_structure():
    a, b = torch.arange(40.0)[:, None], -torch.arange(40.0)[:, None]
    pairs = [((a[i:i + 8], b[i:i + 8]), torch.zeros(8)) for i in range(0, 40, 8)]  # (inputs, targets)
    got = list(iterate_batches(FitSamples(pairs, 8, 4)))
    assert all(isinstance(g, tuple) and len(g) == 2 for g in got)
    assert torch.equal(torch.cat([g[0] for g in got]), -torch.cat([g[1] for g in got]))
    assert sum(len(g[0]) for g in got) == 30
    dicts = [{"input_ids": a[i:i + 8], "attention_mask": b[i:i + 8]} for i in range(0, 40, 8)]
    held = held_out(dicts, 8, 4, limit=40)
    assert torch.cat([h["input_ids"] for h in held])[:, 0].tolist() == [3.0, 7.0, 11.0, 15.0, 19.0, 23.0, 27.0,
                                                                       31.0, 35.0, 39.0]


def test_too_few_samples_or_no_fraction_means_no_holdout():
    assert holdout_step(0.0, 10_000) is None
    assert holdout_step(0.2, 5 * MIN_HELD) == 5
    assert holdout_step(0.2, 5 * MIN_HELD - 1) is None
    assert holdout_step(0.5, 2 * MIN_HELD) == 2


def test_a_bad_fraction_is_refused(split):
    with pytest.raises(MultinetError, match="holdout"):
        multinet.unify({"a": zoo.create("mlp")}, split.train_x[:64], budget=0.5, holdout=0.7)


def test_with_holdout_the_choice_is_refitted_on_every_sample(split):
    a = zoo.create("mlp")
    models = {"a": a, "b": copy.deepcopy(a)}
    calib = split.train_x[:512]
    unified = multinet.unify(models, calib, budget=0.3, damp=1e-9, holdout=0.2)
    # each member alone, as unify reports it, is what compress gives it on all the samples
    alone = multinet.compress(a, calib, budget=multinet.Budget(flops=0.3), damp=1e-9)
    for name in models:
        with torch.no_grad():
            assert torch.equal(unified.separate[name].model(split.test_x), alone.model(split.test_x))
    # a copy still collapses: one model's layers plus the other's head, at one model's cost or less
    assert set(unified.chosen.values()) == {"unified"}
    assert unified.costs_after["total"]["flops"] <= 0.3 * unified.costs_before["total"]["flops"]
    with torch.no_grad():
        out = unified.model(split.test_x)
    for name in models:
        acc = float((out[name].argmax(1) == split.test_y).float().mean())
        assert acc > 0.9
    # the errors it decided on are the held-out ones: never worse there, by construction
    for name in models:
        assert unified.errors[name]["unified"] <= unified.errors[name]["separate"] + 1e-12


def test_with_holdout_the_fitted_part_never_reads_the_held_out_samples(split, monkeypatch):
    """Every compression inside the search gets the fit samples; only the final refits get them all."""
    from multinet.unification import api

    seen = []
    real = api.compress

    def spy(model, data, **options):
        seen.append(sum(len(b) for b in iterate_batches(data)))
        return real(model, data, **options)

    monkeypatch.setattr(api, "compress", spy)
    a = zoo.create("mlp")
    api.unify({"a": a, "b": copy.deepcopy(a)}, split.train_x[:200], budget=0.3, holdout=0.2, skip_links=False)
    first_refit = seen.index(200)  # the chosen parts, then the members alone, fitted again on every sample
    assert first_refit >= 2 and set(seen[:first_refit]) == {160} and set(seen[first_refit:]) == {200}
    assert len(seen) - first_refit >= 2


def test_the_refits_show_their_progress(split, capsys):
    a = zoo.create("mlp")
    multinet.unify({"a": a, "b": copy.deepcopy(a)}, split.train_x[:256], budget=0.3, holdout=0.5, progress=True)
    err = capsys.readouterr().err
    search, refit = err.split("unify: the choice fitted on every sample", 1)
    assert "unify: link trials" in search.split("done")[-2]  # the trials' bar closes before the refits start
    assert "3/3 (100%) done" in refit  # the unified part and both models alone, fitted on every sample
