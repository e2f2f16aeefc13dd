"""Batches beyond one tensor: a tensor, a tuple/list of tensors, or a dict of tensors.

Transformers take several inputs (``input_ids``, ``attention_mask``, ...). Every tensor of a batch
has the samples along dim 0, so splitting, slicing and moving a batch act on all of them together.
A graph binds a batch to its placeholders: a tuple by position, a dict by name (torch.export
graphs of Hugging Face models name their placeholders after the forward's arguments). An input
named ``attention_mask`` marks padding: its zero positions are left out of the statistics.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from ..errors import InputShapeError, MultinetError

Batch = torch.Tensor | tuple | list | Mapping
MASK_NAMES = ("attention_mask",)  # inputs whose zero positions are padding


def is_batch(x) -> bool:
    """A tensor, or a non-empty tuple/list/dict whose leaves are all tensors."""
    if isinstance(x, torch.Tensor):
        return True
    if not isinstance(x, (tuple, list, Mapping)) or not len(x):
        return False
    leaves = pytree.tree_leaves(x)
    return bool(leaves) and all(isinstance(t, torch.Tensor) for t in leaves)


def check_batch(batch) -> Batch:
    """``batch`` itself when it is one; a clear error otherwise (also when dim 0 disagrees)."""
    if not is_batch(batch):
        raise MultinetError(f"calibration batches must be tensors, or tuples or dicts of tensors, "
                            f"got {type(batch).__name__}")
    sizes = {len(t) if t.ndim else None for t in pytree.tree_leaves(batch)}
    if len(sizes) != 1 or None in sizes:
        raise InputShapeError(f"the tensors of a batch must share their first (sample) dimension, got {describe(batch)}")
    return batch


def size(batch: Batch) -> int:
    """Number of samples in a batch."""
    return len(pytree.tree_leaves(batch)[0])


def take(batch: Batch, start: int, stop: int) -> Batch:
    """Samples ``start .. stop-1`` of every tensor of the batch."""
    return pytree.tree_map(lambda t: t[start:stop], batch)


def select(batch: Batch, rows: Sequence[int]) -> Batch:
    """Samples ``rows`` (indices along dim 0) of every tensor of the batch."""
    index = torch.as_tensor(list(rows), dtype=torch.long)
    return pytree.tree_map(lambda t: t.index_select(0, index.to(t.device)), batch)


def to_device(batch: Batch, device) -> Batch:
    return pytree.tree_map(lambda t: t.to(device), batch)


def concat(batches: Sequence[Batch]) -> Batch:
    """Batches of one structure joined along the samples."""
    leaves = [pytree.tree_flatten(b) for b in batches]
    joined = [torch.cat(column) for column in zip(*(flat for flat, _ in leaves))]
    return pytree.tree_unflatten(joined, leaves[0][1])


def split(data: Batch, batch_size: int) -> Iterator[Batch]:
    """A whole dataset (tensor or dict of tensors) in batches of ``batch_size`` samples."""
    n = size(check_batch(data))
    if n == 0:
        raise MultinetError("no calibration data: the tensor is empty")
    for i in range(0, n, batch_size):
        yield take(data, i, i + batch_size)


def describe(batch: Batch) -> str:
    """Shapes for error messages: (2, 7) or {input_ids: (2, 7), attention_mask: (2, 7)}."""
    if isinstance(batch, torch.Tensor):
        return str(tuple(batch.shape))
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in batch.items()) + "}"
    return "(" + ", ".join(describe(v) for v in batch) + ")"


def _graph_of(model):
    """A MultiNet's graph (it binds inputs like the graph does); any other model as it is. An
    ExportedProgram's ``graph_module`` is a different thing (lifted parameters), hence nn.Module only."""
    return getattr(model, "graph_module", model) if isinstance(model, nn.Module) else model


def input_names(model) -> list[str]:
    """The names a batch dict binds to: a graph's placeholders, else the forward's arguments."""
    graph_module = _graph_of(model)
    if isinstance(graph_module, fx.GraphModule):
        return [n.name for n in graph_module.graph.nodes if n.op == "placeholder"]
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in inspect.signature(model.forward).parameters.values() if p.kind in kinds]


def input_defaults(model) -> dict[str, object]:
    """The forward's positional arguments that have a default (a graph's placeholders have none)."""
    if isinstance(_graph_of(model), fx.GraphModule):
        return {}
    return {p.name: p.default for p in inspect.signature(model.forward).parameters.values()
            if p.default is not inspect.Parameter.empty}


def as_args(batch: Batch, names: Sequence[str], defaults: Mapping[str, object] | None = None) -> tuple:
    """The batch as positional inputs for inputs called ``names``: a dict is ordered by name and must
    fill the first ones (a model's later, optional arguments keep their defaults); an argument before
    them that is not in the batch takes its value from ``defaults`` (GPT-2's ``past_key_values``
    between ``input_ids`` and ``attention_mask``)."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if not isinstance(batch, Mapping):
        return tuple(batch)
    unknown = [k for k in batch if k not in names]
    if unknown:
        raise InputShapeError(f"the batch has inputs {unknown} that the model does not take (it takes {list(names)})")
    count = max(names.index(k) for k in batch) + 1
    defaults = defaults or {}
    missing = [n for n in names[:count] if n not in batch and n not in defaults]
    if missing:
        raise InputShapeError(f"the batch lacks inputs {missing}, which come before {list(batch)} in the model's "
                              f"arguments {list(names)}")
    return tuple(batch[n] if n in batch else defaults[n] for n in names[:count])


def model_args(model, batch: Batch) -> tuple:
    """``batch`` as ``model``'s positional arguments, defaults filling gaps between given inputs."""
    return as_args(batch, input_names(model), input_defaults(model))


def call(model, batch: Batch):
    """``model`` on a batch: a graph by position (exported graphs check their inputs' structure),
    any other module with a dict as keyword arguments."""
    if isinstance(batch, Mapping) and not isinstance(_graph_of(model), fx.GraphModule):
        return model(**batch)
    return model(*as_args(batch, input_names(model)))


def padding_mask(batch: Batch, names: Sequence[str]) -> torch.Tensor | None:
    """The (samples, tokens) mask of real tokens, when the batch carries one for inputs ``names``."""
    if isinstance(batch, torch.Tensor):
        return None
    bound = dict(zip(names, as_args(batch, names)))
    mask = next((bound[n] for n in MASK_NAMES if n in bound), None)
    return mask if mask is not None and mask.ndim == 2 else None


def token_rows(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """Which rows of a (samples, tokens, features) consumer input are real tokens (None: all)."""
    if mask is None or x.ndim != 3 or tuple(x.shape[:2]) != tuple(mask.shape):
        return None
    return mask.reshape(-1).to(device=x.device) != 0


def same_batches(left: list, right: list) -> bool:
    """Two lists of batches hold the same samples, batched alike."""
    if len(left) != len(right):
        return False
    for a, b in zip(left, right):
        leaves_a, leaves_b = pytree.tree_leaves(a), pytree.tree_leaves(b)
        if len(leaves_a) != len(leaves_b) or not all(
                isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
                and torch.equal(x, y.to(x.device)) for x, y in zip(leaves_a, leaves_b)):
            return False
    return True
