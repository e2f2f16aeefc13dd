"""Neuro Unification: merge models that read the same input, and neurons within a model."""
from .api import Match, Unified, compress_multinet, unify
from .bridges import Bridge, add_bridges
from .multinet import Link, MultiNet, model_costs

__all__ = ["Bridge", "Link", "Match", "MultiNet", "Unified", "add_bridges", "compress_multinet", "model_costs",
           "unify"]
