"""Which graph nodes write into a tensor they read: code that runs or caches nodes out of graph order
must know, since such a node changes a value other nodes may still read (or, unused itself, exists
only for that write)."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

_IN_PLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                       operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                       operator.ilshift, operator.irshift, operator.imatmul)


def writes_in_place(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` writes into one of its inputs: an ``inplace=True`` layer or keyword, a method
    or torch function named with a trailing underscore (``x.relu_()``, ``torch.relu_``,
    ``x.masked_fill_``), an in-place operator (``x += y``) or an aten overload whose schema mutates."""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op == "call_method":
        return _underscored(node.target)
    if node.op == "call_function":
        target = node.target
        if bool(node.kwargs.get("inplace", False)) or target in _IN_PLACE_OPERATORS:
            return True
        if isinstance(target, torch._ops.OpOverload):
            return target._schema.is_mutable
        return _underscored(getattr(target, "__name__", ""))
    return False


def _underscored(name: str) -> bool:
    return name.endswith("_") and not name.endswith("__")
