"""Neuro Unification: merge models that read the same input, and neurons within a model."""
from .api import Match, Unified, compress_multinet, unify
from .bridges import Bridge, add_bridges, choose_links
from .multinet import Link, MultiNet, combine, model_costs
from .similarity import Candidate, canonical_order, score_candidates

__all__ = ["Bridge", "Candidate", "Link", "Match", "MultiNet", "Unified", "add_bridges", "canonical_order",
           "choose_links", "combine", "compress_multinet", "model_costs", "score_candidates", "unify"]
