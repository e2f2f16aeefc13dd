"""The one re-solve (solve.refit) against brute-force ridge least squares on the kept columns."""
import pytest
import torch

from multinet.solve import ColumnRefit, ConsumerProblem, reconstruct_multi
from multinet.solve.problem import prepare_gram
from multinet.solve.reap import invert

D = torch.float64


def _data(seed: int, rows: int = 200, m: int = 41, d: int = 6):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, m, generator=gen, dtype=D)
    x = x @ (torch.eye(m, dtype=D) + 0.3 * torch.randn(m, m, generator=gen, dtype=D))
    x[:, -1] = 1.0  # the bias column
    x[:, 7] = 0  # a dead column
    return x, torch.randn(m, d, generator=gen, dtype=D)


def ridge_without(x: torch.Tensor, target: torch.Tensor, cols, damp: float) -> torch.Tensor:
    """Fit ``target`` from the kept columns of ``x`` by lstsq on x stacked on sqrt(lambda) I, lambda = damp *
    the mean of the live columns' squared norms (prepare_gram's damping), removed rows zero."""
    norms = (x * x).sum(0)
    lam = damp * norms[norms > 0].mean()
    kept = [j for j in range(x.shape[1]) if j not in set(cols.tolist())]
    xa = torch.cat([x[:, kept], lam.sqrt() * torch.eye(len(kept), dtype=D)])
    ya = torch.cat([target, torch.zeros(len(kept), target.shape[1], dtype=D)])
    out = torch.zeros(x.shape[1], target.shape[1], dtype=D)
    out[kept] = torch.linalg.lstsq(xa, ya).solution
    return out


@pytest.mark.parametrize("form", ["downdate", "kept columns"])
@pytest.mark.parametrize("removed", [1, 5, 30, 39])
def test_both_forms_equal_ridge_least_squares_on_the_kept_columns(form, removed, monkeypatch):
    x, w = _data(removed)
    damp = 1e-4
    gram = x.T @ x
    inverse = invert(prepare_gram(gram, damp)[0])
    fit = inverse @ gram @ w  # the full-column fit of the outputs x w
    cols = torch.randperm(40, generator=torch.Generator().manual_seed(removed))[:removed]
    cols = cols[cols != 7].sort().values
    monkeypatch.setattr(ColumnRefit, "_kept_form_cheaper", lambda self, s: form == "kept columns")
    used = []
    for name in ("_kept_form", "_downdate"):
        real = getattr(ColumnRefit, name)
        monkeypatch.setattr(ColumnRefit, name, lambda self, *a, real=real, name=name: used.append(name) or real(self, *a))
    got = ColumnRefit(gram, fit, damp, inverse if removed % 2 else None, restore=w).without(cols)
    assert used == (["_kept_form"] if form == "kept columns" else ["_downdate"])
    expected = ridge_without(x, x @ w, cols, damp)
    expected[7] = w[7]  # the dead column stays: it gets its original row back
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-8)
    assert not got[cols].any()


def test_the_cheaper_form_is_taken():
    """The kept form where most columns go (no inverse needed), the downdate where few do."""
    x, w = _data(3)
    gram = x.T @ x
    refit = ColumnRefit(gram, w, 1e-6, invert(prepare_gram(gram, 1e-6)[0]))
    assert not refit._kept_form_cheaper(2) and refit._kept_form_cheaper(38)
    assert ColumnRefit(gram, w, 1e-6)._kept_form_cheaper(20)  # no inverse yet: making one costs m^3 / 3


def test_nothing_removed_gives_the_fit_and_dead_rows_stay_as_given_without_restore():
    x, w = _data(4)
    gram = x.T @ x
    fit = w.clone()
    fit[7] = 0
    refit = ColumnRefit(gram, fit, 1e-6)
    torch.testing.assert_close(refit.without(torch.zeros(0, dtype=torch.long)), fit)
    assert not refit.without(torch.tensor([3, 4]))[7].any()


def test_reconstruct_multi_equals_brute_force_for_a_preset_selection():
    """Two consumers reading one group (one a conv-like block of 3 columns per channel), channels chosen by
    someone else: each consumer's weight is the ridge fit of its target from its kept columns. The problems
    carry the full-column fit, as the pipeline's do (group_problems), with the inverse it was made from."""
    damp = 1e-3
    gen = torch.Generator().manual_seed(0)
    problems, data = [], []
    for block, d in ((1, 4), (3, 5)):
        m = 6 * block + 1
        x = torch.randn(300, m, generator=gen, dtype=D)
        x[:, -1] = 1.0
        target = torch.randn(300, d, generator=gen, dtype=D)  # not a function of x: a real residual
        inverse = invert(prepare_gram(x.T @ x, damp)[0])
        fit = inverse @ (x.T @ target)
        problems.append(ConsumerProblem(x.T @ x, fit, torch.arange(6), torch.arange(6 * block).reshape(6, block),
                                        inverse=inverse if block == 1 else None))
        data.append((x, target, block))
    removed = [1, 4]
    weights = reconstruct_multi(problems, removed, damp)
    for (x, target, block), got in zip(data, weights):
        cols = torch.tensor([c * block + j for c in removed for j in range(block)])
        torch.testing.assert_close(got, ridge_without(x, target, cols, damp), rtol=1e-7, atol=1e-8)
