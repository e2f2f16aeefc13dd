"""REAP: greedy channel removal by the least error *after* least-squares reconstruction.

Inverse form. With Ginv = G^-1 and S the columns of a candidate channel:

    err(S) = tr(W_S^T (Ginv_SS)^-1 W_S)
    W     <- W - Ginv[:, S] (Ginv_SS)^-1 W_S
    Ginv  <- Ginv - Ginv[:, S] (Ginv_SS)^-1 Ginv[S, :]

One inversion, then O(m^2 |S|) per removed channel instead of one least-squares solve per
candidate per step. Per-step errors add up exactly to the total error (the residual of each
step is orthogonal to everything the next step can change), so one greedy pass gives the whole
error curve E(k).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .problem import ConsumerProblem, SolverInputError, blocked_columns, finish, removed_columns, start


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
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    for _ in range(6 if tolerate_rounding else 0):
        if info.item() == 0:
            break
        chol, info = torch.linalg.cholesky_ex(gram + shift * eye)
        shift = shift * 10
    if info.item() != 0:
        raise SolverInputError("statistics are singular even after damping: raise damp")
    return torch.cholesky_inverse(chol)


def block_errors(ginv: torch.Tensor, weight: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """err(S) for every candidate at once: columns is k x w, result has k entries."""
    w_s = weight[columns]  # k x w x d
    if columns.shape[1] == 1:  # one column per channel: err = |w_c|^2 / Ginv_cc, no solves
        return (w_s[:, 0] ** 2).sum(1) / ginv[columns[:, 0], columns[:, 0]]
    blocks = ginv[columns[:, :, None], columns[:, None, :]]  # k x w x w
    return (w_s * torch.linalg.solve(blocks, w_s)).sum((1, 2))


def remove_block(ginv: torch.Tensor, weight: torch.Tensor, cols: torch.Tensor) -> None:
    """Re-solve the weights without columns ``cols`` and downdate the inverse, in place."""
    g_cs = ginv[:, cols]
    b = ginv[cols][:, cols]
    weight.addmm_(g_cs, torch.linalg.solve(b, weight[cols]), alpha=-1)
    ginv.addmm_(g_cs, torch.linalg.solve(b, g_cs.T), alpha=-1)  # in place: no m x m temporary per step
    weight[cols] = 0
    ginv[cols, :] = 0
    ginv[:, cols] = 0


def protected(alive: torch.Tensor, pieces: list[torch.Tensor]) -> torch.Tensor:
    """Channels that are the last alive member of a piece (a split output must keep one channel)."""
    mask = torch.zeros_like(alive)
    for piece in pieces:
        live = piece[alive[piece]]
        if len(live) == 1:
            mask[live] = True
    return mask


def reap_greedy_multi(problems: list[ConsumerProblem], n_channels: int, n_remove: int,
                      damp: float = 1e-6, pieces: list[torch.Tensor] = (), allow_all: bool = False) -> ReapResult:
    """Greedy REAP over a group read by several consumers: errors summed, all consumers re-solved.

    ``pieces``: channel sets of which at least one channel must stay (outputs of a split).
    ``allow_all``: the group may lose every channel (its consumers also read other channels).
    """
    _check_counts(n_channels, n_remove, allow_all)
    states = []
    for p in problems:
        gram, dead, weight = start(p, damp)
        states.append((p, invert(gram, damp > 0), weight, dead))
    device = problems[0].gram.device if problems else torch.device("cpu")  # solve where the statistics live
    pieces = [piece.to(device) for piece in pieces]
    alive = torch.ones(n_channels, dtype=torch.bool, device=device)
    removed, errors = [], []
    for _ in range(n_remove):
        scores = torch.zeros(n_channels, dtype=torch.float64, device=device)
        for p, ginv, weight, _ in states:
            live = alive[p.channels]
            scores[p.channels[live]] += p.scale * block_errors(ginv, weight, p.columns[live])
        scores[~alive | protected(alive, pieces)] = torch.inf
        if torch.isinf(scores).all():
            raise SolverInputError(f"cannot remove {n_remove} channels: every split piece must keep one")
        best = int(torch.argmin(scores))
        for p, ginv, weight, _ in states:
            rows = (p.channels == best).nonzero().flatten()
            if len(rows):
                remove_block(ginv, weight, p.columns[rows].flatten())
        alive[best] = False
        removed.append(best)
        errors.append(scores[best].clamp_min(0))
    weights = [finish(p, weight, dead, ~removed_columns(p, removed)) for p, _, weight, dead in states]
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
        gram, dead, weight = start(p, damp)
        ginv = invert(gram, damp > 0)
        for c in removed:
            rows = (p.channels == c).nonzero().flatten()
            if len(rows):
                remove_block(ginv, weight, p.columns[rows].flatten())
        weights.append(finish(p, weight, dead, ~removed_columns(p, removed)))
    return weights
