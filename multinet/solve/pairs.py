"""Neuro Unification within a group: replace a channel by an affine function of another one.

Channel j's behaviour a_j (its values over the calibration rows; for a conv the centre tap of its
im2col block) is fitted as alpha * a_i + beta from the same Gram statistics REAP uses — no
activation caches. Unifying j into i folds j's consumer weights into i's (w_i += alpha * w_j) and
beta into the bias (bias += beta * sum of w_j's taps), and the output error is the fit residual
times j's weight energy. The greedy unifies the cheapest pair first. A one-to-one special case of
REAP: REAP may spread j over every remaining channel, this uses one.
"""
from __future__ import annotations

import torch

from .problem import ConsumerProblem
from .reap import protected


def _representatives(problem: ConsumerProblem) -> torch.Tensor:
    """One column per channel: the centre of its block (the value at the output position)."""
    return problem.columns[:, problem.columns.shape[1] // 2]


def unify_pairs(problems: list[ConsumerProblem], n_channels: int, n_remove: int,
                pieces: list[torch.Tensor] = ()) -> tuple[list[int], list[torch.Tensor], list[tuple[int, int, float, float]]]:
    """(removed channels, folded weights per consumer, [(removed j, kept i, alpha, beta)]).

    The consumers' grams must end with the ones column (the bias); the first consumer reading a
    channel provides its behaviour.
    """
    weights = [p.weight.double().clone() for p in problems]
    first = {}
    for pi, p in enumerate(problems):
        for row, c in enumerate(p.channels.tolist()):
            first.setdefault(c, (pi, row))
    mean = torch.zeros(n_channels, dtype=torch.float64)
    cov = torch.zeros(n_channels, n_channels, dtype=torch.float64)
    same = torch.zeros(n_channels, n_channels, dtype=torch.bool)  # pairs seen by one consumer
    for pi, p in enumerate(problems):
        reps = _representatives(p)
        g = p.gram.double()
        n = g[-1, -1].clamp_min(1.0)
        mu = g[reps, -1] / n
        ch = p.channels
        own = torch.tensor([first[c][0] == pi for c in ch.tolist()])
        mean[ch[own]] = mu[own]
        block = g[reps][:, reps] / n - mu[:, None] * mu[None, :]
        cov[ch[:, None], ch[None, :]] = torch.where(same[ch[:, None], ch[None, :]],
                                                    cov[ch[:, None], ch[None, :]], block)
        same[ch[:, None], ch[None, :]] = True
    readers = torch.zeros(len(problems), n_channels, dtype=torch.bool)
    for pi, p in enumerate(problems):
        readers[pi, p.channels] = True
    # i may stand in for j only if every reader of j also reads i (else that reader loses alpha * a_i)
    covers = ~(readers[:, None, :] & ~readers[:, :, None]).any(0)  # covers[i, j]
    var = cov.diagonal().clamp_min(0)
    alive = torch.ones(n_channels, dtype=torch.bool)
    removed, folds = [], []
    for _ in range(n_remove):
        energy = torch.zeros(n_channels, dtype=torch.float64)
        for p, w in zip(problems, weights):
            energy[p.channels] += p.scale * (w[p.columns] ** 2).sum((1, 2))
        safe = var.clamp_min(1e-30)
        r2 = (cov ** 2 / (safe[:, None] * safe[None, :])).clamp(max=1.0)  # r2[i, j]
        residual = var[None, :] * (1 - r2)  # residual variance of a_j fitted from a_i
        cost = residual * energy[None, :]
        ok = alive[:, None] & alive[None, :] & same & covers & ~torch.eye(n_channels, dtype=torch.bool)
        ok &= ~protected(alive, pieces)[None, :]
        constant = var <= 1e-12 * var.max().clamp_min(1e-30)
        cost = torch.where(ok, cost, torch.full_like(cost, torch.inf))
        i, j = divmod(int(torch.argmin(cost)), n_channels)
        if not torch.isfinite(cost[i, j]):
            raise ValueError(f"cannot unify {n_remove} channels: no pair left")
        alpha = 0.0 if constant[j] else float(cov[i, j] / safe[i])
        beta = float(mean[j] - alpha * mean[i])
        for p, w in zip(problems, weights):
            rows_j = (p.channels == j).nonzero().flatten()
            if not len(rows_j):
                continue
            cols_j = p.columns[rows_j[0]]
            rows_i = (p.channels == i).nonzero().flatten()
            if len(rows_i):
                w[p.columns[rows_i[0]]] += alpha * w[cols_j]
            w[-1] += beta * w[cols_j].sum(0)
            w[cols_j] = 0
        alive[j] = False
        removed.append(j)
        folds.append((j, i, alpha, beta))
    return removed, [w.to(p.weight.dtype) for p, w in zip(problems, weights)], folds
