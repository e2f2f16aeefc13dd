"""multinet: compress trained PyTorch models without retraining, and merge models that share an input."""
from .errors import InputShapeError, MultinetError, PruneError, TraceError
from .compress import CompressResult, compress
from .schedule import Budget, BudgetError, Plan
from .graph import ChannelGraph, ChannelGroup, Counts, count, prune, register_elementwise, trace

__all__ = [
    "Budget", "BudgetError", "ChannelGraph", "ChannelGroup", "CompressResult", "compress", "Counts", "InputShapeError", "MultinetError", "Plan", "PruneError", "TraceError",
    "count", "prune", "register_elementwise", "trace",
]
__version__ = "0.1.0"
