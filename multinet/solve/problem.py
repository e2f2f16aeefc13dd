"""The least-squares problems a channel group poses to its consumers, as plain tensors.

A consumer computes Y = X W (X: rows x m input columns, W: m x d). Its statistics are the Gram
matrix G = X^T X. Each channel of the group occupies a set of columns of X (one for a Linear,
kh*kw for a conv, H*W after flatten); removing the channel removes those columns, and the
remaining weights are re-solved by least squares. Columns that belong to no candidate (the
bias column of ones, other groups' channels) are never removed but take part in the
reconstruction.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MultinetError


class SolverInputError(MultinetError):
    """Statistics or weights the solver cannot use (NaN/Inf, wrong shapes)."""


@dataclass
class ConsumerProblem:
    gram: torch.Tensor  # m x m
    weight: torch.Tensor  # m x d
    channels: torch.Tensor  # k group channels present in this consumer
    columns: torch.Tensor  # k x w: the columns each of those channels occupies
    scale: float = 1.0  # multiplies this consumer's errors (normalisation across consumers)
    # the damped inverse of gram (``prepare_gram`` + ``invert``), when whoever built the problem already
    # factored it to fit ``weight``: the solver then starts from it instead of inverting again
    inverse: torch.Tensor | None = None

    def to(self, device: str | torch.device) -> "ConsumerProblem":
        """The same problem with its tensors on ``device`` (solves run where the run's device is)."""
        return ConsumerProblem(self.gram.to(device), self.weight.to(device), self.channels.to(device),
                               self.columns.to(device), self.scale,
                               None if self.inverse is None else self.inverse.to(device))

    def validate(self) -> None:
        m = self.gram.shape[0]
        if self.gram.ndim != 2 or self.gram.shape != (m, m):
            raise SolverInputError(f"gram must be square, got shape {tuple(self.gram.shape)}")
        if self.weight.ndim != 2 or self.weight.shape[0] != m:
            raise SolverInputError(f"weight must be {m} x d to match the gram, got {tuple(self.weight.shape)}")
        if self.columns.ndim != 2 or len(self.columns) != len(self.channels):
            raise SolverInputError("columns must be k x w with one row per channel")
        if len(self.columns) and (self.columns.min() < 0 or self.columns.max() >= m):
            raise SolverInputError(f"column indices must lie in 0..{m - 1}")
        if len(torch.unique(self.columns)) != self.columns.numel():
            raise SolverInputError("a column belongs to two channels")
        if self.inverse is not None and self.inverse.shape != self.gram.shape:
            raise SolverInputError(f"inverse must be {m} x {m} like the gram, got {tuple(self.inverse.shape)}")
        for name, t in (("gram", self.gram), ("weight", self.weight)):
            if not all_finite(t):
                raise SolverInputError(f"{name} contains NaN or Inf: recalibrate (the activations overflowed)")


def start(problem: "ConsumerProblem", damp: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validated, damped float64 gram, its dead-column mask, and a working float64 weight whose
    dead rows are zero (they see only zeros, so removing them must cost nothing)."""
    problem.validate()
    gram, dead = prepare_gram(problem.gram, damp)
    weight = problem.weight.to(torch.float64).clone()
    weight[dead] = 0
    return gram, dead, weight


def finish(problem: "ConsumerProblem", weight: torch.Tensor, dead: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The reconstructed weight in the caller's dtype; dead columns of kept channels get their
    original rows back (zero on calibration data does not mean zero on other data)."""
    restore = dead & kept
    weight[restore] = problem.weight.to(torch.float64)[restore]
    return weight.to(problem.weight.dtype)


def removed_columns(problem: "ConsumerProblem", removed) -> torch.Tensor:
    """Mask of the columns the ``removed`` channels occupy in this consumer."""
    mask = torch.zeros(problem.gram.shape[0], dtype=torch.bool, device=problem.gram.device)
    gone = torch.isin(problem.channels, torch.as_tensor(list(removed), dtype=problem.channels.dtype,
                                                        device=problem.channels.device))
    mask[problem.columns[gone].flatten()] = True
    return mask


def blocked_columns(n_channels: int, block: int) -> torch.Tensor:
    """Channel c = columns c*block .. c*block+block-1."""
    return torch.arange(n_channels * block).reshape(n_channels, block)


def prepare_gram(gram: torch.Tensor, damp: float, keep: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 gram with dead columns decoupled and relative damping added.

    A dead column (zero on every calibration row) carries no signal: it is cut loose from the
    others with a unit diagonal, and the caller zeroes its weight row, so removing it costs
    nothing. Damping adds damp * mean(diag) to the diagonal so rank-deficient statistics stay
    solvable. ``keep``: only these columns' block of the result, built without the rest (the damping
    and dead columns still judged on the whole diagonal). Returns (gram, dead mask), both over ``keep``.
    """
    diag = torch.diagonal(gram).to(torch.float64)
    dead = dead_columns(gram)
    live_mean = diag[~dead].mean() if (~dead).any() else torch.tensor(1.0, dtype=diag.dtype, device=diag.device)
    if keep is not None:
        gram, dead = gram[keep][:, keep], dead[keep]
    g = gram.to(torch.float64, copy=True)
    g.add_(g.T.clone()).mul_(0.5)  # symmetric to the last bit, with one temporary instead of three
    g[dead, :] = 0
    g[:, dead] = 0
    idx = torch.arange(len(g), device=g.device)
    g[idx, idx] += damp * live_mean
    g[dead, dead] = 1.0
    return g, dead


def dead_columns(gram: torch.Tensor) -> torch.Tensor:
    """Columns that are zero on every calibration row: diagonal below 1e-12 of the largest."""
    diag = torch.diagonal(gram).to(torch.float64)
    return diag <= 1e-12 * diag.abs().max().clamp_min(1e-300)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``: one reduction (a NaN or Inf makes the sum non-finite) instead of a
    mask as large as ``t``; only a sum that overflows falls back to the element-wise check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())
