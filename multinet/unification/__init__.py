"""Neuro Unification: merge models that read the same input, and neurons within a model."""
from .api import Match, Unified, unify
from .bridges import Bridge, add_bridges
from .multinet import MultiNet, model_costs

__all__ = ["Bridge", "Match", "MultiNet", "Unified", "add_bridges", "model_costs", "unify"]
