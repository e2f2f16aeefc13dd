"""One consumer's least-squares re-solve once any set of its input columns is gone.

Every path that re-solves a consumer for a given removal (sequential compression with a preset or
scheduled selection, the one-shot mode's final weights, the scheduler's masked evaluator, a grouped
conv's conv groups) asks this object, so there is one rule. With G_d the damped Gram
(``prepare_gram``), W the full-column least-squares weight and S the removed columns (K the kept):

    W'_K = W_K - Ginv_KS (Ginv_SS)^-1 W_S        (downdate: needs the inverse, O(s^3 + m s d))
         = W_K + (G_d)_KK^-1 G_KS W_S             (kept form: a Cholesky of the kept block, O(k^3))
    W'_S = 0

The two are the same weight (the Schur complement identity; G_d's off-diagonal block is G's), so the
cheaper one is taken: the downdate where few columns go, the kept form where most do. The greedy
selection's step (``reap.DowndatedInverse.remove``) is the downdate for one channel at a time.
"""
from __future__ import annotations

import torch

from .problem import ConsumerProblem, dead_columns, finish, prepare_gram, removed_columns
from .reap import invert


class ColumnRefit:
    """The least-squares weight of one consumer for any removal set, from its statistics.

    ``gram``: the Gram as collected (undamped, m x m); ``fit``: the full-column least-squares weight
    (m x d, float64, dead rows zero); ``inverse``: the damped Gram's inverse where the caller already
    made it (made on the first downdate otherwise); ``restore``: the rows a dead column (zero on every
    calibration row) gets back when it stays, since zero on calibration data is not zero elsewhere
    (None: they keep the fit's rows)."""

    def __init__(self, gram: torch.Tensor, fit: torch.Tensor, damp: float, inverse: torch.Tensor | None = None,
                 restore: torch.Tensor | None = None):
        self.gram, self.fit, self.damp = gram, fit, damp
        self.inverse = inverse
        self.dead = dead_columns(gram)
        self.restore = restore

    def without(self, cols: torch.Tensor) -> torch.Tensor:
        """The re-solved weight without columns ``cols`` (their rows zero), at full height m."""
        m = len(self.fit)
        kept = torch.ones(m, dtype=torch.bool, device=self.fit.device)
        kept[cols] = False
        if not len(cols):
            out = self.fit.clone()
        else:
            out = self._kept_form(cols, kept) if self._kept_form_cheaper(len(cols)) else None
            if out is None:
                out = self._downdate(cols)
        if self.restore is not None:
            back = self.dead & kept
            out[back] = self.restore[back].to(out.dtype)
        return out

    def _kept_form_cheaper(self, s: int) -> bool:
        """Flop counts: a Cholesky of the k kept columns and its solves, against an LU of Ginv_SS and the
        m x s x d product of the downdate (whose inverse may still have to be made: m^3 / 3 more)."""
        m, d = self.fit.shape
        k = m - s
        downdate = (2 / 3) * s ** 3 + 2 * m * s * d + (m ** 3 / 3 if self.inverse is None else 0)
        return k ** 3 / 3 + 2 * k * s * d + 2 * k * k * d < downdate

    def _kept_form(self, cols: torch.Tensor, kept: torch.Tensor) -> torch.Tensor | None:
        """W_K + (G_d)_KK^-1 G_KS W_S; None where the kept block's Cholesky factor does not exist."""
        keep = kept.nonzero().flatten()
        block, _ = prepare_gram(self.gram, self.damp, keep)
        chol, info = torch.linalg.cholesky_ex(block)
        if info.item() != 0:
            return None
        # G_KS as prepare_gram sees it: symmetrised, dead columns cut loose from everything
        coupling = (self.gram[keep][:, cols].to(self.fit.dtype) + self.gram[cols][:, keep].T.to(self.fit.dtype)) / 2
        coupling[self.dead[keep]] = 0
        coupling[:, self.dead[cols]] = 0
        out = torch.zeros_like(self.fit)
        out[keep] = self.fit[keep] + torch.cholesky_solve(coupling @ self.fit[cols], chol)
        return out

    def _downdate(self, cols: torch.Tensor) -> torch.Tensor:
        """W - Ginv[:, S] (Ginv_SS)^-1 W_S with rows S zeroed, from the full problem's inverse."""
        if self.inverse is None:
            self.inverse = invert(prepare_gram(self.gram, self.damp)[0], self.damp > 0)
        g = self.inverse[:, cols].to(self.fit.dtype)
        out = self.fit - g @ torch.linalg.solve(g[cols], self.fit[cols])
        out[cols] = 0
        return out


def reconstruct_multi(problems: list[ConsumerProblem], removed: list[int], damp: float = 1e-6) -> list[torch.Tensor]:
    """Least-squares re-solve of every consumer once ``removed`` channels are gone (any selection)."""
    weights = []
    for p in problems:
        p.validate()
        dead = dead_columns(p.gram)
        fit = p.weight.to(torch.float64).clone()
        fit[dead] = 0  # a dead column sees only zeros: its row is the problem's again if it stays (finish)
        inverse = None if p.inverse is None else p.inverse.to(torch.float64)
        gone = removed_columns(p, removed)
        refit = ColumnRefit(p.gram, fit, damp, inverse).without(gone.nonzero().flatten())
        weights.append(finish(p, refit, dead, ~gone))
    return weights
