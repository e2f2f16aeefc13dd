"""Neuro Unification: merge models that read the same input, and neurons within a model."""
from .api import Match, Unified, unify
from .bridges import Bridge, add_bridges
from .multinet import MultiNet, MultiNetError, model_costs

__all__ = ["Bridge", "Match", "MultiNet", "MultiNetError", "Unified", "add_bridges", "model_costs", "unify"]
