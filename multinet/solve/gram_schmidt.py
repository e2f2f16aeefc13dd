"""REAP in Gram-Schmidt form: every candidate evaluated at once by batched products (the GPU form).

For a candidate channel with columns S and the other live columns R, Gram-Schmidt of X_S
against X_R leaves the residual X_S - X_R G_RR^-1 G_RS, whose Gram matrix is the Schur complement

    K_S = G_SS - G_SR G_RR^-1 G_RS,     err(S) = tr(W_S^T K_S W_S),

and the reconstruction is W_R += G_RR^-1 G_RS W_S. No inverse is carried from step to step:
each step factors, for all candidates in one batch, the live Gram with the candidate's columns
cut loose (an identity block), so the work parallelises across candidates. It gives the same
selections and errors as the inverse form (reap.py) on the same statistics.

Which form runs: the inverse form, on every device. It scores all candidates at once as well (one
batched product over their diagonal blocks of the downdated inverse, reap.py) at O(m r |S|) per step,
while this form factors one m x m Gram per candidate per step, O(k m^3): on the CPU, half of a
64-channel 3x3 conv's input (m = 576) takes 16.5 s here against 0.07 s for the inverse form
(``benchmarks/gpu_check.py --device cpu --quick``). It stays as an independent oracle in the
tests — no inverse is carried, so no downdate can drift — and ``benchmarks/gpu_check.py`` times
both on a GPU.
"""
from __future__ import annotations

import torch

from .problem import ConsumerProblem, blocked_columns, finish, start
from .reap import ReapResult, _check_counts, protected


def _candidate_solves(gram: torch.Tensor, live: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """For each candidate (row of ``columns``): G_RR^-1 G_RS as an m x w matrix (zero outside R).

    R = live columns minus the candidate's own. The batch is k copies of the live gram, each with
    its candidate's rows and columns replaced by identity, factored together.
    """
    k, w = columns.shape
    m = gram.shape[0]
    mask = live.clone().expand(k, m).clone()
    mask[torch.arange(k, device=gram.device)[:, None], columns] = False  # R for each candidate
    outer = mask[:, :, None] & mask[:, None, :]
    eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
    batch = torch.where(outer, gram.expand(k, m, m), eye.expand(k, m, m))
    rhs = gram[:, columns].permute(1, 0, 2) * mask[:, :, None]  # k x m x w: G_RS, zero outside R
    chol, info = torch.linalg.cholesky_ex(batch)
    if (info != 0).any():
        from .problem import SolverInputError

        raise SolverInputError("statistics are singular even after damping: raise damp")
    return torch.cholesky_solve(rhs, chol)


def _errors_and_solves(gram, weight, live, columns, chunk: int):
    errs, sols = [], []
    for first in range(0, len(columns), chunk):
        cols = columns[first:first + chunk]
        sol = _candidate_solves(gram, live, cols)  # k x m x w
        g_ss = gram[cols[:, :, None], cols[:, None, :]]
        schur = g_ss - gram[:, cols].permute(1, 2, 0) @ sol  # k x w x w
        w_s = weight[cols]
        errs.append((w_s * (schur @ w_s)).sum((1, 2)))
        sols.append(sol)
    return torch.cat(errs), torch.cat(sols)


def reap_greedy_gs_multi(problems: list[ConsumerProblem], n_channels: int, n_remove: int, damp: float = 1e-6,
                         chunk: int = 64, pieces: list[torch.Tensor] = ()) -> ReapResult:
    """Gram-Schmidt form of ``reap_greedy_multi``; ``chunk`` bounds the candidates batched at once."""
    _check_counts(n_channels, n_remove)
    device = problems[0].gram.device
    states = []
    for p in problems:
        gram, dead, weight = start(p, damp)
        states.append((p, gram, weight, torch.ones(len(gram), dtype=torch.bool, device=device), dead))
    alive = torch.ones(n_channels, dtype=torch.bool, device=device)
    removed, errors = [], []
    for _ in range(n_remove):
        scores = torch.zeros(n_channels, dtype=torch.float64, device=device)
        step_solves = []
        for p, gram, weight, live, _ in states:
            cand = alive[p.channels]
            err, sol = _errors_and_solves(gram, weight, live, p.columns[cand], chunk)
            scores[p.channels[cand]] += p.scale * err
            step_solves.append((p.channels[cand], sol))
        scores[~alive | protected(alive.cpu(), pieces).to(device)] = torch.inf
        best = int(torch.argmin(scores))
        for (p, gram, weight, live, _), (chans, sol) in zip(states, step_solves):
            row = (chans == best).nonzero().flatten()
            if len(row):
                cols = p.columns[(p.channels == best).nonzero().flatten()].flatten()
                weight += sol[row[0]] @ weight[cols]
                weight[cols] = 0
                live[cols] = False
        alive[best] = False
        removed.append(best)
        errors.append(scores[best].clamp_min(0))
    weights = [finish(p, weight, dead, live) for p, _, weight, live, dead in states]
    return ReapResult(removed, torch.stack(errors).cpu() if errors else torch.zeros(0, dtype=torch.float64),
                      weights, n_channels)


def reap_greedy_gs(gram: torch.Tensor, weight: torch.Tensor, n_remove: int, block: int = 1, damp: float = 1e-6,
                   fixed: int = 0, chunk: int = 64) -> ReapResult:
    """Gram-Schmidt form of ``reap_greedy`` (same arguments, same result); runs where ``gram`` lives."""
    from .problem import SolverInputError

    m = gram.shape[0]
    if block < 1 or (m - fixed) % block:
        raise SolverInputError(f"gram has {m} columns: not channels*{block} + {fixed}")
    n_channels = (m - fixed) // block
    cols = blocked_columns(n_channels, block).to(gram.device)
    problem = ConsumerProblem(gram, weight, torch.arange(n_channels, device=gram.device), cols)
    return reap_greedy_gs_multi([problem], n_channels, n_remove, damp, chunk)
