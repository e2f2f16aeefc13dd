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
The weight is kept the same way (W0 - Y Z), with each candidate's W_b W_b^T updated from one
product W W_S^T, and once Y has grown enough the factors are folded in and the removed columns'
rows dropped (``DowndatedInverse``): same selections, a third of the memory traffic at full depth.

The re-solve for a removal set chosen all at once (a plan, a preset, the masked evaluator) is
``refit.ColumnRefit``: the same downdate for the whole set, or a fit of the kept columns.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .problem import (ConsumerProblem, SolverInputError, blocked_columns, dead_columns, finish, removed_columns, start)


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


def block_errors(blocks: torch.Tensor, products: torch.Tensor) -> torch.Tensor:
    """err(S) = tr(W_S^T (Ginv_SS)^-1 W_S) for every candidate at once: ``blocks`` holds Ginv_SS and
    ``products`` W_S W_S^T per candidate (k x w x w each); the result has k entries."""
    if blocks.shape[1] == 1:  # one column per channel: err = |w_c|^2 / Ginv_cc, no solves
        return products[:, 0, 0] / blocks[:, 0, 0]
    # <B^-1, W_S W_S^T>: a batched inverse of the w x w blocks, ~8x faster on the CPU than a batched LU
    # solve with d right-hand sides
    return (torch.linalg.inv(blocks) * products).sum((1, 2))


RESTART_AFTER = 64  # the fewest columns removed since the last restart before another may pay
# weights of at least this many entries and at least 32 outputs per candidate column are kept as W0 - Y Z;
# below, the in-place update's fewer ops per step win (benchmarks/greedy_speed.py, on this CPU)
LAZY_FROM, LAZY_OUTPUTS_PER_COLUMN = 1 << 18, 32


class DowndatedInverse:
    """One consumer's working state during greedy removal: its inverse Gram after the removals so
    far, the candidates' diagonal blocks of it and their W_b W_b^T, and the re-solved weight.

    Since the last restart the inverse is Ginv0 - Y U^T and the weight W0 - Y Z (Z: the removed
    rows as they were when removed), over the rows still stored. Scoring needs only each
    candidate's W_b W_b^T (w x w), kept up to date from W W_S^T, so a step never gathers, rewrites
    or squares the whole m x d weight. The per-step products with Y grow with the columns removed;
    once those pass an eighth of the stored rows (and 64), and enough removals are left to repay
    it, a restart folds the factors into Ginv0 and W0 with two GEMMs and drops the removed
    columns' rows, so a full-depth curve reads sum (m - r) r_since_restart instead of sum m r
    entries, and every candidate's blocks and products are recomputed exactly there (no drift
    across restarts). A small weight (under ``LAZY_FROM`` entries, or few outputs per candidate
    column) is updated in place instead and scored from its rows: there the per-step op count, not
    memory traffic, is the cost."""

    def __init__(self, problem: ConsumerProblem, damp: float, capacity: int, scoring: bool = True):
        self.problem = problem
        if problem.inverse is not None:  # solved once where the problem was built (same damping rule)
            problem.validate()
            self.ginv0, self.dead = problem.inverse.double(), dead_columns(problem.gram)
            self.weight0 = problem.weight.to(torch.float64).clone()
            self.weight0[self.dead] = 0
        else:
            gram, self.dead, self.weight0 = start(problem, damp)
            self.ginv0 = invert(gram, damp > 0)
        m = len(self.ginv0)
        self.m, self.scoring = m, scoring
        d, w = self.weight0.shape[1], problem.columns.shape[1]
        self.lazy = m * d >= LAZY_FROM and d >= LAZY_OUTPUTS_PER_COLUMN * w
        self.planned, self.columns_gone = capacity, 0  # columns the caller means to remove, and so far
        device = self.ginv0.device
        self.gone = torch.zeros(m, dtype=torch.bool, device=device)  # removed columns, original indices
        self.stored = torch.arange(m, device=device)  # original index of each stored row
        self.row = torch.arange(m, device=device)  # stored row of each original column (0 once dropped)
        self.present: torch.Tensor | None = None  # after a restart: 1 for candidates whose rows are still stored
        self.columns = problem.columns  # the candidates' columns as stored rows
        self._reset_factors()
        cols = self.columns
        self.blocks = self.ginv0[cols[:, :, None], cols[:, None, :]].clone()  # k x w x w
        if scoring and self.lazy:
            rows = self.weight0[cols]  # k x w x d
            self.products = rows @ rows.transpose(1, 2)  # every candidate's W_b W_b^T

    def _reset_factors(self) -> None:
        n = len(self.ginv0)
        room = max(0, min(self.planned - self.columns_gone, n))  # the columns still planned (it can grow)
        self.u = self.ginv0.new_zeros(n, room)
        self.y = self.ginv0.new_zeros(n, room)
        self.z = self.ginv0.new_zeros(room if self.lazy else 0, self.weight0.shape[1])
        self.rank = 0

    @property
    def weight(self) -> torch.Tensor:
        """The weight re-solved without the removed columns (their rows zero), at full height m."""
        r = self.rank
        out = self.weight0.new_zeros(self.m, self.weight0.shape[1])
        out[self.stored] = torch.addmm(self.weight0, self.y[:, :r], self.z[:r], alpha=-1) if self.lazy else self.weight0
        out[self.gone] = 0
        return out

    def errors(self, live: torch.Tensor) -> torch.Tensor:
        """err of removing each live candidate channel (rows of problem.columns where ``live``)."""
        if self.lazy:
            return block_errors(self.blocks[live], self.products[live])
        rows = self.weight0[self.columns[live]]  # k x w x d, the current weight
        return block_errors(self.blocks[live], rows @ rows.transpose(1, 2))

    def remove(self, cols: torch.Tensor) -> None:
        """Re-solve the weight without columns ``cols`` (original indices) and downdate the factors."""
        self.gone[cols] = True
        cols = self.row[cols]
        r, s = self.rank, len(cols)
        y_r, z_r = self.y[:, :r], self.z[:r]
        if self.lazy:
            w_s = self.weight0[cols] - y_r[cols] @ z_r  # the current W_S, s x d
            # one pass over Y for both the inverse's columns Ginv[:, S] and the weight's W W_S^T
            both = y_r @ torch.cat([self.u[cols, :r].T, z_r @ w_s.T], 1) if r else None
            g = self.ginv0[:, cols] - (both[:, :s] if r else 0)  # current Ginv[:, S]
        else:
            w_s = self.weight0[cols]
            g = self.ginv0[:, cols] - (y_r @ self.u[cols, :r].T if r else 0)
        y = torch.linalg.solve(g[cols], g.T).T  # Ginv[:, S] (Ginv_SS)^-1, n x s
        columns = self.columns
        if not self.lazy:
            self.weight0.addmm_(y, w_s, alpha=-1)
            self.weight0[cols] = 0
        elif self.scoring:
            # W' = W - y W_S: W'_b W'_b^T = P_b - y_b C_b^T - C_b y_b^T + y_b (W_S W_S^T) y_b^T with C = W W_S^T.
            # Scoring reads P_b only against a symmetric (Ginv_bb)^-1, so the two middle terms may be
            # added as one, 2 C_b y_b^T: (y_b W_S W_S^T - 2 C_b) y_b^T, two batched products
            cross = self.weight0 @ w_s.T - (both[:, s:] if r else 0)  # W W_S^T, n x s
            y_b = y[columns]  # k x w x s
            self.products += self._masked((y_b @ cross[cols] - 2 * cross[columns]) @ y_b.transpose(1, 2))
        if r + s > self.u.shape[1]:  # more columns than planned for (a channel in several slots)
            grow = r + s - self.u.shape[1]
            self.u = torch.cat([self.u, self.u.new_zeros(len(self.u), grow)], 1)
            self.y = torch.cat([self.y, self.y.new_zeros(len(self.y), grow)], 1)
            self.z = torch.cat([self.z, self.z.new_zeros(grow, self.z.shape[1])], 0)
        self.u[:, r:r + s] = g
        self.y[:, r:r + s] = y
        if self.lazy:
            self.z[r:r + s] = w_s
        self.rank = r + s
        self.blocks -= self._masked(g[columns] @ y[columns].transpose(1, 2))  # every candidate's Ginv_bb
        self.columns_gone += s
        n = len(self.ginv0)
        steps_left = (self.planned - self.columns_gone) / max(1, self.columns.shape[1])
        # a restart costs two n x n x r GEMMs; it pays once enough steps are left to save their n x r
        # reads of Y (about n / 20 of them at this CPU's GEMM-to-memory speed ratio; n / 16 for the copies)
        if self.rank >= max(RESTART_AFTER, n // 8) and steps_left >= n / 16:
            self._restart()

    def _masked(self, update: torch.Tensor) -> torch.Tensor:
        """Zero for candidates already removed and dropped (their columns point at row 0)."""
        return update if self.present is None else update * self.present

    def _restart(self) -> None:
        """Fold Y U^T into Ginv0 and Y Z into W0 over the rows not yet removed, and drop the rest."""
        keep = ~self.gone[self.stored]  # stored rows still in play
        r = self.rank
        y, u = self.y[keep, :r], self.u[keep, :r]
        self.ginv0 = torch.addmm(self.ginv0[keep][:, keep], y, u.T, alpha=-1)
        self.weight0 = torch.addmm(self.weight0[keep], y, self.z[:r], alpha=-1) if self.lazy else self.weight0[keep]
        self.stored = self.stored[keep]
        self.row = torch.zeros_like(self.row)
        self.row[self.stored] = torch.arange(len(self.stored), device=self.row.device)
        self.present = (~self.gone[self.problem.columns]).all(1).to(torch.float64)[:, None, None]
        self.columns = self.row[self.problem.columns]  # dropped candidates point at row 0; ``present`` masks them
        self._reset_factors()
        cols = self.columns
        self.blocks = self._masked(self.ginv0[cols[:, :, None], cols[:, None, :]])
        if self.scoring and self.lazy:
            rows = self.weight0[cols]
            self.products = self._masked(rows @ rows.transpose(1, 2))


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
    columns_of = [_columns_by_channel(p) for p in problems]
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
            if best in columns_of[j]:
                state.remove(columns_of[j][best])
                cached[j] = None
        alive[best] = False
        removed.append(best)
        errors.append(scores[best].clamp_min(0))
    weights = [finish(st.problem, st.weight, st.dead, ~removed_columns(st.problem, removed)) for st in states]
    return ReapResult(removed, torch.stack(errors).cpu() if errors else torch.zeros(0, dtype=torch.float64),
                      weights, n_channels)


def _columns_by_channel(problem: ConsumerProblem) -> dict[int, torch.Tensor]:
    """{channel: every column it occupies in this consumer}, looked up once instead of per step."""
    rows: dict[int, list[int]] = {}
    for i, c in enumerate(problem.channels.tolist()):
        rows.setdefault(c, []).append(i)
    return {c: problem.columns[r].flatten() for c, r in rows.items()}


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
