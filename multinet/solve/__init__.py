"""Solvers over plain tensors: REAP (inverse and Gram-Schmidt forms)."""
from .problem import ConsumerProblem, SolverInputError, blocked_columns
from .reap import ReapResult, reap_greedy, reap_greedy_multi

__all__ = ["ConsumerProblem", "ReapResult", "SolverInputError", "blocked_columns", "reap_greedy", "reap_greedy_multi"]
