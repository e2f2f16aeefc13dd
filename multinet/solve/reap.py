"""REAP: greedy channel removal by the least error *after* least-squares reconstruction.

Inverse form. With Ginv = G^-1 and S the columns of a candidate channel:

    err(S) = tr(W_S^T (Ginv_SS)^-1 W_S)
    W     <- W - Ginv[:, S] (Ginv_SS)^-1 W_S
    Ginv  <- Ginv - Ginv[:, S] (Ginv_SS)^-1 Ginv[S, :]

One inversion, then no least-squares solve per candidate per step. Per-step errors add up
exactly to the total error (the residual of each step is orthogonal to everything the next step
can change), so one greedy pass gives the whole error curve E(k).

The downdated inverse is never written out: after t removals it is Ginv0 - Y U^T, with
u = Ginv[:, S] and y = u (Ginv_SS)^-1 appended per step (m x |S| each). A step then needs only
the removed channel's columns, Ginv0[:, S] - Y U[S]^T (O(m r |S|) for r columns removed so far,
r <= m), instead of an m x m rank-|S| update of the whole inverse (O(m^2 |S|)); the candidates'
diagonal blocks Ginv_bb, all that scoring reads, are downdated in a batch of |S|-rank updates.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .problem import (ConsumerProblem, SolverInputError, blocked_columns, dead_columns, finish, removed_columns,
                      start)


@dataclass
class ReapResult:
    removed: list[int]  # channels in removal order
    errors: torch.Tensor  # error added by each removal (sum over consumers, scaled)
    weights: list[torch.Tensor]  # reconstructed weight per consumer; removed rows are zero
    n_channels: int

    @property
    def weight(self) -> torch.Tensor:
        return self.weights[0]

    @property
    def error_curve(self) -> torch.Tensor:
        """Total error after k removals, k = 1..n_remove."""
        return torch.cumsum(self.errors, 0)

    @property
    def kept(self) -> list[int]:
        gone = set(self.removed)
        return [c for c in range(self.n_channels) if c not in gone]


ROUNDING = 1e-7  # relative rounding of statistics summed from float32 GEMMs (measured ~3e-7 in Frobenius norm)


def invert(gram: torch.Tensor, tolerate_rounding: bool = True) -> torch.Tensor:
    """Inverse of a symmetric positive definite matrix through its Cholesky factor.

    Statistics of exactly redundant channels are singular; summed from float32 GEMMs they can be
    slightly indefinite, more than a small damping covers. With ``tolerate_rounding`` the diagonal
    is raised in steps from the rounding level (1e-7 of its largest entry) until the factor exists;
    without it (no damping asked for) a singular matrix is an error."""
    chol, info = torch.linalg.cholesky_ex(gram)
    shift = ROUNDING * gram.diagonal().abs().max()
    for _ in range(6 if tolerate_rounding else 0):
        if info.item() == 0:
            break
        chol, info = torch.linalg.cholesky_ex(gram + torch.diag(shift.expand(len(gram))))
        shift = shift * 10
    if info.item() != 0:
        raise SolverInputError("statistics are singular even after damping: raise damp")
    return torch.cholesky_inverse(chol)


def block_errors(blocks: torch.Tensor, weight: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """err(S) for every candidate at once: ``blocks`` holds Ginv_SS per candidate (k x w x w),
    columns is k x w; the result has k entries."""
    w_s = weight[columns]  # k x w x d
    if columns.shape[1] == 1:  # one column per channel: err = |w_c|^2 / Ginv_cc, no solves
        return (w_s[:, 0] ** 2).sum(1) / blocks[:, 0, 0]
    # tr(W_S^T B^-1 W_S) = <B^-1, W_S W_S^T>: two batched GEMM-shaped products, ~8x faster on the CPU
    # than a batched LU solve with d right-hand sides (the blocks are only w x w)
    return (torch.linalg.inv(blocks) * (w_s @ w_s.transpose(1, 2))).sum((1, 2))


class DowndatedInverse:
    """One consumer's working state during greedy removal: its inverse Gram after the removals so
    far (as Ginv0 - Y U^T), the candidates' diagonal blocks of it, and the re-solved weight."""

    def __init__(self, problem: ConsumerProblem, damp: float, capacity: int):
        self.problem = problem
        if problem.inverse is not None:  # solved once where the problem was built (same damping rule)
            problem.validate()
            self.ginv0, self.dead = problem.inverse.double(), dead_columns(problem.gram)
            self.weight = problem.weight.to(torch.float64).clone()
            self.weight[self.dead] = 0
        else:
            gram, self.dead, self.weight = start(problem, damp)
            self.ginv0 = invert(gram, damp > 0)
        m = len(self.ginv0)
        capacity = min(capacity, m)
        self.u = self.ginv0.new_zeros(m, capacity)
        self.y = self.ginv0.new_zeros(m, capacity)
        self.rank = 0
        cols = problem.columns
        self.blocks = self.ginv0[cols[:, :, None], cols[:, None, :]].clone()  # k x w x w

    def errors(self, live: torch.Tensor) -> torch.Tensor:
        """err of removing each live candidate channel (rows of problem.columns where ``live``)."""
        return block_errors(self.blocks[live], self.weight, self.problem.columns[live])

    def remove(self, cols: torch.Tensor) -> None:
        """Re-solve the weight without columns ``cols`` and downdate the inverse's factors."""
        r, s = self.rank, len(cols)
        g = self.ginv0[:, cols] - self.y[:, :r] @ self.u[cols, :r].T  # current Ginv[:, S]
        b = g[cols]
        y = torch.linalg.solve(b, g.T).T  # Ginv[:, S] (Ginv_SS)^-1, m x s
        self.weight.addmm_(y, self.weight[cols], alpha=-1)
        self.weight[cols] = 0
        if r + s > self.u.shape[1]:  # more columns than planned for (a channel in several slots)
            self.u = torch.cat([self.u, self.u.new_zeros(len(self.u), r + s - self.u.shape[1])], 1)
            self.y = torch.cat([self.y, self.y.new_zeros(len(self.y), r + s - self.y.shape[1])], 1)
        self.u[:, r:r + s] = g
        self.y[:, r:r + s] = y
        self.rank = r + s
        columns = self.problem.columns
        self.blocks -= g[columns] @ y[columns].transpose(1, 2)  # every candidate's Ginv_bb, rank s


def without_columns(ginv: torch.Tensor, weight: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The least-squares weight once columns ``cols`` are gone, from the full problem's inverse Gram
    and full-column weight: W - Ginv[:, S] (Ginv_SS)^-1 W_S with rows S zeroed. The same step as
    one greedy removal (DowndatedInverse.remove), for any set at once: O(m |S|^2 + |S|^3) instead of
    factoring the m - |S| kept columns again."""
    if not len(cols):
        return weight.clone()
    g = ginv[:, cols]
    out = weight - g @ torch.linalg.solve(g[cols], weight[cols])
    out[cols] = 0
    return out


def protected(alive: torch.Tensor, pieces: list[torch.Tensor]) -> torch.Tensor:
    """Channels that are the last alive member of a piece (a split output must keep one channel)."""
    mask = torch.zeros_like(alive)
    for piece in pieces:
        live = piece[alive[piece]]
        if len(live) == 1:
            mask[live] = True
    return mask


def reap_greedy_multi(problems: list[ConsumerProblem], n_channels: int, n_remove: int,
                      damp: float = 1e-6, pieces: list[torch.Tensor] = (), allow_all: bool = False,
                      may_go: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
                      why_stuck: str | None = None) -> ReapResult:
    """Greedy REAP over a group read by several consumers: errors summed, all consumers re-solved.

    ``pieces``: channel sets of which at least one channel must stay (outputs of a split).
    ``allow_all``: the group may lose every channel (its consumers also read other channels).
    ``may_go(alive, step)``: a further constraint, the channels allowed at this step (e.g. equal
    counts per conv group); ``why_stuck`` is the error when it leaves none.
    A consumer's scores are kept until a removal touches it: a step re-scores only the consumers
    (or a grouped conv's per-group problems) that read the removed channel.
    """
    _check_counts(n_channels, n_remove, allow_all)
    states = [DowndatedInverse(p, damp, n_remove * p.columns.shape[1]) for p in problems]
    device = problems[0].gram.device if problems else torch.device("cpu")  # solve where the statistics live
    pieces = [piece.to(device) for piece in pieces]
    alive = torch.ones(n_channels, dtype=torch.bool, device=device)
    removed, errors = [], []
    cached: list[torch.Tensor | None] = [None] * len(states)
    for step in range(n_remove):
        scores = torch.zeros(n_channels, dtype=torch.float64, device=device)
        for j, state in enumerate(states):
            if cached[j] is None:
                p = state.problem
                cached[j] = torch.zeros(n_channels, dtype=torch.float64, device=device)
                live = alive[p.channels]
                if live.any():
                    cached[j][p.channels[live]] = p.scale * state.errors(live)
            scores += cached[j]
        blocked = ~alive | protected(alive, pieces)
        if may_go is not None:
            blocked |= ~may_go(alive, step)
        scores[blocked] = torch.inf
        if torch.isinf(scores).all():
            raise SolverInputError(why_stuck or f"cannot remove {n_remove} channels: every split piece must keep one")
        best = int(torch.argmin(scores))
        for j, state in enumerate(states):
            rows = (state.problem.channels == best).nonzero().flatten()
            if len(rows):
                state.remove(state.problem.columns[rows].flatten())
                cached[j] = None
        alive[best] = False
        removed.append(best)
        errors.append(scores[best].clamp_min(0))
    weights = [finish(st.problem, st.weight, st.dead, ~removed_columns(st.problem, removed)) for st in states]
    return ReapResult(removed, torch.stack(errors).cpu() if errors else torch.zeros(0, dtype=torch.float64),
                      weights, n_channels)


def reap_greedy(gram: torch.Tensor, weight: torch.Tensor, n_remove: int, block: int = 1, damp: float = 1e-6,
                fixed: int = 0) -> ReapResult:
    """Greedy REAP for one consumer.

    gram: m x m with m = channels*block + fixed; weight: m x d. Channel c = columns
    c*block .. c*block+block-1; the last ``fixed`` columns (e.g. the bias column of ones) are
    never removed but help the reconstruction.
    """
    m = gram.shape[0]
    if block < 1 or (m - fixed) % block:
        raise SolverInputError(f"gram has {m} columns: not channels*{block} + {fixed}")
    n_channels = (m - fixed) // block
    problem = ConsumerProblem(gram, weight, torch.arange(n_channels), blocked_columns(n_channels, block))
    return reap_greedy_multi([problem], n_channels, n_remove, damp)


def _check_counts(n_channels: int, n_remove: int, allow_all: bool = False) -> None:
    if not 0 <= n_remove < n_channels + allow_all:
        raise SolverInputError(f"n_remove must lie in 0..{n_channels - 1} (keep at least one channel), got {n_remove}")


def reconstruct_multi(problems: list[ConsumerProblem], removed: list[int], damp: float = 1e-6) -> list[torch.Tensor]:
    """Least-squares re-solve of every consumer once ``removed`` channels are gone (any selection)."""
    weights = []
    for p in problems:
        state = DowndatedInverse(p, damp, len(removed) * p.columns.shape[1])
        for c in removed:
            rows = (p.channels == c).nonzero().flatten()
            if len(rows):
                state.remove(p.columns[rows].flatten())
        weights.append(finish(p, state.weight, state.dead, ~removed_columns(p, removed)))
    return weights
