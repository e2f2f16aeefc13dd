"""REAP against an independent brute-force reference: one least-squares solve per candidate per step."""
import pytest
import torch

from multinet.solve import ConsumerProblem, SolverInputError, blocked_columns, reap_greedy, reap_greedy_multi
from multinet.solve.gram_schmidt import reap_greedy_gs, reap_greedy_gs_multi

D = torch.float64


@pytest.fixture(autouse=True, params=["lazy weight", "weight in place"])
def weight_form(request, monkeypatch):
    """Every test runs with both of the solver's weight forms (W0 - Y Z with per-candidate products, used for
    large weights, and the weight updated in place, for small ones), whatever the problem's size."""
    from multinet.solve import reap

    lazy = request.param == "lazy weight"
    monkeypatch.setattr(reap, "LAZY_FROM", 0 if lazy else 1 << 62)
    monkeypatch.setattr(reap, "LAZY_OUTPUTS_PER_COLUMN", 0 if lazy else 1 << 62)
    original = reap.DowndatedInverse.__init__

    def checked(self, *args, **kwargs):
        original(self, *args, **kwargs)
        assert self.lazy == lazy

    monkeypatch.setattr(reap.DowndatedInverse, "__init__", checked)
    return request.param


def brute_force_greedy(xs, ws, channel_columns, n_remove, damp, scales=None):
    """Greedy removal, each candidate scored by a fresh lstsq on the remaining columns.

    Damping lambda*mean(diag G) is the ridge problem: X stacked on sqrt(lambda)*I rows with targets
    stacked accordingly. Returns removal order, per-step errors and the final weights.
    """
    scales = scales or [1.0] * len(xs)
    augmented = []
    for x, w in zip(xs, ws):
        lam = damp * (x * x).sum(0).mean()
        xa = torch.cat([x, lam.sqrt() * torch.eye(x.shape[1], dtype=D)])
        augmented.append((xa, xa @ w))

    def fit(kept_cols_per_consumer):
        total, weights = 0.0, []
        for (xa, ya), cols, s in zip(augmented, kept_cols_per_consumer, scales):
            sol = torch.linalg.lstsq(xa[:, cols], ya).solution
            total += s * ((ya - xa[:, cols] @ sol) ** 2).sum().item()
            full = torch.zeros(xa.shape[1], ya.shape[1], dtype=D)
            full[cols] = sol
            weights.append(full)
        return total, weights

    n_channels = len(channel_columns[0])
    alive, removed, errors, previous = list(range(n_channels)), [], [], 0.0
    for _ in range(n_remove):
        best = None
        for c in alive:
            rest = [a for a in alive if a != c]
            kept = [[col for ch in rest for col in cc[ch]] + fixed for cc, fixed in _with_fixed(channel_columns, xs)]
            err, _ = fit(kept)
            if best is None or err < best[0] - 1e-12 * max(1.0, abs(err)):
                best = (err, c)
        removed.append(best[1])
        errors.append(best[0] - previous)
        previous = best[0]
        alive.remove(best[1])
    kept = [[col for ch in alive for col in cc[ch]] + fixed for cc, fixed in _with_fixed(channel_columns, xs)]
    return removed, torch.tensor(errors, dtype=D), fit(kept)[1]


def _with_fixed(channel_columns, xs):
    for cc, x in zip(channel_columns, xs):
        used = {col for cols in cc for col in cols}
        yield cc, [j for j in range(x.shape[1]) if j not in used]


def _problem(seed, rows, channels, block, d, fixed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, channels * block + fixed, generator=gen, dtype=D)
    x = x @ (torch.eye(x.shape[1], dtype=D) + 0.3 * torch.randn(x.shape[1], x.shape[1], generator=gen, dtype=D))
    if fixed:
        x[:, -1] = 1.0  # the bias column
    return x, torch.randn(x.shape[1], d, generator=gen, dtype=D)


@pytest.mark.parametrize("solver", [reap_greedy, reap_greedy_gs])
@pytest.mark.parametrize("block, damp, fixed", [(1, 0.0, 0), (1, 1e-2, 1), (9, 0.0, 0), (4, 1e-3, 1)])
def test_matches_brute_force(solver, block, damp, fixed):
    channels = 8
    x, w = _problem(block * 10 + fixed, rows=120 if block == 1 else 400, channels=channels, block=block, d=5, fixed=fixed)
    cols = blocked_columns(channels, block).tolist()
    order, errors, weights = brute_force_greedy([x], [w], [cols], 6, damp)
    result = solver(x.T @ x, w, 6, block=block, damp=damp, fixed=fixed)
    assert result.removed == order
    torch.testing.assert_close(result.errors, errors, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(result.weight, weights[0], rtol=1e-6, atol=1e-8)
    # per-step errors add up to the total error of the final reconstruction
    lam = damp * (x * x).sum(0).mean()
    total = ((x @ (w - result.weight)) ** 2).sum() + lam * ((w - result.weight) ** 2).sum()
    torch.testing.assert_close(result.error_curve[-1], total, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("solver", [reap_greedy_multi, reap_greedy_gs_multi])
def test_several_consumers_sum_scaled_errors(solver):
    """A residual stream read by a Linear (block 1) and a conv (block 4, channel order shifted)."""
    x1, w1 = _problem(1, rows=150, channels=6, block=1, d=3, fixed=1)
    x2, w2 = _problem(2, rows=300, channels=6, block=4, d=4)
    perm = [2, 0, 1, 5, 3, 4]  # consumer 2 sees the group's channels in another order
    cols2 = [blocked_columns(6, 4)[perm.index(c)].tolist() for c in range(6)]
    scales = [1 / ((x1 @ w1) ** 2).sum().item(), 1 / ((x2 @ w2) ** 2).sum().item()]
    order, errors, weights = brute_force_greedy([x1, x2], [w1, w2], [blocked_columns(6, 1).tolist(), cols2], 4, 1e-4,
                                                scales)
    problems = [
        ConsumerProblem(x1.T @ x1, w1, torch.arange(6), blocked_columns(6, 1), scales[0]),
        ConsumerProblem(x2.T @ x2, w2, torch.arange(6), torch.tensor(cols2), scales[1]),
    ]
    result = solver(problems, 6, 4, damp=1e-4)
    assert result.removed == order
    torch.testing.assert_close(result.errors, errors, rtol=1e-6, atol=1e-10)
    for got, want in zip(result.weights, weights):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("solver", [reap_greedy, reap_greedy_gs])
def test_redundant_channels_go_first_with_zero_error(solver):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 10, generator=gen, dtype=D)
    x[:, 7] = 0.5 * x[:, 1] - x[:, 4]  # exact linear combinations of others
    x[:, 2] = 3 * x[:, 9]
    w = torch.randn(10, 4, generator=gen, dtype=D)
    result = solver(x.T @ x, w, 4, damp=1e-9)
    first_two = set(result.removed[:2])
    assert len(first_two & {7, 1, 4}) == 1 and len(first_two & {2, 9}) == 1
    assert result.errors[:2].max() < 1e-5 * result.errors[2]
    # the reconstruction absorbs them: outputs unchanged after the two redundant removals
    two = solver(x.T @ x, w, 2, damp=1e-9)
    torch.testing.assert_close(x @ two.weight, x @ w, rtol=0, atol=1e-4)


@pytest.mark.parametrize("solver", [reap_greedy, reap_greedy_gs])
def test_dead_columns_cost_nothing_even_without_damping(solver):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(100, 6, generator=gen, dtype=D)
    x[:, 3] = 0
    w = torch.randn(6, 2, generator=gen, dtype=D)
    result = solver(x.T @ x, w, 2, damp=0.0)
    assert result.removed[0] == 3 and result.errors[0] == 0
    kept = result.kept
    assert 3 not in kept and len(kept) == 4


@pytest.mark.parametrize("seed", range(5))
def test_dead_column_of_a_kept_channel_keeps_its_weight(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(50, 4, generator=gen, dtype=D)
    x[:, 0] = 0
    w = torch.randn(4, 2, generator=gen, dtype=D)
    w[1] *= 100  # channel 0 (columns 0, 1; column 0 dead) carries the output: it is always kept
    result = reap_greedy(x.T @ x, w, 1, block=2)
    assert result.removed == [1] and 0 in result.kept
    assert torch.equal(result.weight[0], w[0])  # a dead column's weight is left as it was, not zeroed or moved


def test_bad_inputs():
    x = torch.randn(20, 4, dtype=D)
    g, w = x.T @ x, torch.randn(4, 2, dtype=D)
    with pytest.raises(SolverInputError, match="NaN or Inf"):
        reap_greedy(g.clone().fill_diagonal_(float("nan")), w, 1)
    with pytest.raises(SolverInputError, match="NaN or Inf"):
        reap_greedy(g, w * float("inf"), 1)
    with pytest.raises(SolverInputError, match="n_remove"):
        reap_greedy(g, w, 4)
    with pytest.raises(SolverInputError, match="n_remove"):
        reap_greedy(g, w, -1)
    with pytest.raises(SolverInputError, match="to match the gram"):
        reap_greedy(g, w[:3], 1)
    with pytest.raises(SolverInputError, match="channels\\*3"):
        reap_greedy(g, w, 1, block=3)
    singular = torch.ones(4, 4, dtype=D)  # rank one, no damping
    with pytest.raises(SolverInputError, match="singular"):
        reap_greedy(singular, w, 1, damp=0.0)
    assert reap_greedy(singular, w, 1, damp=1e-3).removed  # damping makes it solvable


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gram_schmidt_on_cuda_matches_inverse_form():
    x, w = _problem(3, rows=300, channels=16, block=4, d=6)
    cpu = reap_greedy(x.T @ x, w, 8, block=4)
    gpu = reap_greedy_gs((x.T @ x).cuda(), w.cuda(), 8, block=4)
    assert gpu.removed == cpu.removed
    torch.testing.assert_close(gpu.errors, cpu.errors, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(gpu.weight.cpu(), cpu.weight, rtol=1e-6, atol=1e-8)


@pytest.fixture
def restarts(monkeypatch):
    """Restart the downdated inverse as often as the size rule allows, counting the restarts."""
    from multinet.solve import reap

    count = []
    original = reap.DowndatedInverse._restart

    def counted(self):
        count.append(len(self.ginv0))
        original(self)

    monkeypatch.setattr(reap, "RESTART_AFTER", 1)
    monkeypatch.setattr(reap.DowndatedInverse, "_restart", counted)
    return count


@pytest.mark.parametrize("block, damp, fixed", [(1, 1e-2, 1), (4, 1e-3, 1), (9, 0.0, 0)])
def test_restarts_match_brute_force(restarts, block, damp, fixed):
    """Folding the factors into the inverse and dropping removed rows changes nothing: same order,
    errors and weights as one least-squares solve per candidate per step."""
    channels = 24
    x, w = _problem(block + 100, rows=60 * block + 100, channels=channels, block=block, d=5, fixed=fixed)
    cols = blocked_columns(channels, block).tolist()
    order, errors, weights = brute_force_greedy([x], [w], [cols], 20, damp)
    result = reap_greedy(x.T @ x, w, 20, block=block, damp=damp, fixed=fixed)
    assert len(restarts) >= 2 and restarts[-1] < restarts[0]  # restarted, and the stored rows shrank
    assert result.removed == order
    torch.testing.assert_close(result.errors, errors, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(result.weight, weights[0], rtol=1e-6, atol=1e-8)


def test_restarts_with_several_consumers_and_channels_in_two_slots(restarts):
    """Consumers that see the group's channels in another order, one reading them twice
    (cat([y, y]) then a conv: each channel in two column blocks), through restarts: the same as the
    brute-force reference."""
    channels = 16
    x1, w1 = _problem(7, rows=200, channels=channels, block=1, d=3, fixed=1)
    x2, w2 = _problem(8, rows=400, channels=2 * channels, block=2, d=4)
    half = 2 * channels
    x2[:, half:] = 0.8 * x2[:, :half] + 0.3 * x2[:, half:]  # the second slot: nearly the same values
    perm = torch.randperm(channels, generator=torch.Generator().manual_seed(3)).tolist()
    blocks2 = blocked_columns(2 * channels, 2)
    cols2 = [blocks2[perm.index(c)].tolist() + blocks2[channels + perm.index(c)].tolist() for c in range(channels)]
    scales = [1 / ((x1 @ w1) ** 2).sum().item(), 1 / ((x2 @ w2) ** 2).sum().item()]
    order, errors, weights = brute_force_greedy([x1, x2], [w1, w2], [blocked_columns(channels, 1).tolist(), cols2],
                                                13, 1e-4, scales)
    problems = [ConsumerProblem(x1.T @ x1, w1, torch.arange(channels), blocked_columns(channels, 1), scales[0]),
                ConsumerProblem(x2.T @ x2, w2, torch.arange(channels), torch.tensor(cols2), scales[1])]
    result = reap_greedy_multi(problems, channels, 13, damp=1e-4)
    assert restarts
    assert result.removed == order
    torch.testing.assert_close(result.errors, errors, rtol=1e-6, atol=1e-10)
    for got, want in zip(result.weights, weights):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
