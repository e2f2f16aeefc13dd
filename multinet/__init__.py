"""multinet: compress trained PyTorch models without retraining, and merge models that share an input."""
from .errors import InputShapeError, MultinetError, PruneError, TraceError
from .options import RunOptions
from .pipeline.compression import CompressResult, compress
from .schedule import Budget, BudgetError, Plan
from .runtime.infer import infer
from .io import ModelFileError, data, export, load, save
from .unification import MultiNet, Unified, model_costs, unify
from .graph import ChannelGraph, ChannelGroup, Counts, count, prune, register_elementwise, trace

__all__ = [
    "RunOptions",
    "Budget", "BudgetError", "ChannelGraph", "ChannelGroup", "CompressResult", "compress", "Counts", "InputShapeError", "MultinetError", "Plan", "PruneError", "TraceError",
    "MultiNet", "Unified", "count", "infer", "model_costs", "prune", "register_elementwise", "trace",
    "unify", "export", "load", "save", "ModelFileError",
]
__version__ = "0.1.0"
