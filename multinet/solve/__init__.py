"""Solvers over plain tensors: REAP (inverse and Gram-Schmidt forms)."""
from .problem import ConsumerProblem, SolverInputError, blocked_columns
from .gram_schmidt import reap_greedy_gs, reap_greedy_gs_multi
from .reap import ReapResult, reap_greedy, reap_greedy_multi
from .refit import ColumnRefit, reconstruct_multi

__all__ = [
    "ColumnRefit", "ConsumerProblem", "ReapResult", "SolverInputError", "blocked_columns", "reap_greedy", "reap_greedy_gs",
    "reap_greedy_gs_multi", "reap_greedy_multi", "reconstruct_multi",
]
