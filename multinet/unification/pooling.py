"""The links' resampling, made cheap for CPU inference: average pools as sums of strided halves.

A link from a finer grid (an earlier stride or pooling) reads its source through a functional
average pool whose window equals its stride (similarity.py). On a CPU, ATen's NCHW avg_pool kernel
costs as much per element as a small convolution: at 256 × 17 × 8 × 8, one 2 × 2 pool took 0.52 ms
on one thread, about a twentieth of two compressed digit VGGs' whole forward, where summing the
two halves of each spatial dim (two strided views, one add per dim) took 0.12 ms (0.24–0.39 × the
pool for 2 × 2 windows up to 64 × 64 × 56 × 56, 0.67–0.86 × for 4 × 4; same values up to float
rounding). This pass rewrites those pools in the fused (inference) network. Only functional pools
are rewritten — what the links add —, never a member's own pooling modules, so the fused network
still runs each member's own layers as the member did. On a GPU one pool kernel beats several
elementwise launches, so graphs whose parameters live there are left as they are.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .similarity import _POOLS as _POOL_OF_DIMS

_DIMS_OF_POOL = {pool: dims for dims, pool in _POOL_OF_DIMS.items()}  # the pools links insert -> spatial dims
_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")


def halve_pools(gm: fx.GraphModule, device: torch.device) -> int:
    """Rewrite every eligible functional average pool of ``gm`` in place; returns how many."""
    if device.type != "cpu":
        return 0
    done = 0
    for node in list(gm.graph.nodes):
        kernel = _halvable_kernel(node)
        if kernel is None:
            continue
        with gm.graph.inserting_before(node):
            value, scale = node.args[0], 1.0
            for axis, size in enumerate(kernel):
                dim = 2 + axis
                while size > 1:
                    value = gm.graph.call_function(operator.add, (_every_other(gm, value, dim, 0),
                                                                  _every_other(gm, value, dim, 1)))
                    size //= 2
                    scale /= 2
            value = gm.graph.call_function(operator.mul, (value, scale))
        node.replace_all_uses_with(value)
        gm.graph.erase_node(node)
        done += 1
    return done


def _every_other(gm: fx.GraphModule, value: fx.Node, dim: int, start: int) -> fx.Node:
    index = (slice(None),) * dim + (slice(start, None, 2),)
    return gm.graph.call_function(operator.getitem, (value, index))


def _halvable_kernel(node: fx.Node) -> tuple[int, ...] | None:
    """The pool's window when it tiles its input exactly (window = stride, no padding, no ceil mode,
    no divisor override, every input size a multiple of the window) and every side is a power of two."""
    if node.op != "call_function" or node.target not in _DIMS_OF_POOL:
        return None
    spatial = _DIMS_OF_POOL[node.target]
    given = dict(zip(_ARGS, node.args)) | dict(node.kwargs)
    kernel = _sizes(given.get("kernel_size"), spatial)
    stride = _sizes(given.get("stride"), spatial) or kernel
    padding = _sizes(given.get("padding", 0), spatial)
    if (kernel is None or stride != kernel or padding != (0,) * spatial or given.get("ceil_mode", False)
            or given.get("divisor_override") is not None):
        return None
    meta = getattr(node.args[0], "meta", {}).get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if shape is None or len(shape) != spatial + 2 or any(s % k for s, k in zip(shape[2:], kernel)):
        return None
    if any(k < 1 or k & (k - 1) for k in kernel) or all(k == 1 for k in kernel):
        return None
    return kernel


def _sizes(value, spatial: int) -> tuple[int, ...] | None:
    if value is None or (isinstance(value, (tuple, list)) and not value):
        return None
    if isinstance(value, int):
        return (value,) * spatial
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
        return tuple(value) * spatial if len(value) == 1 else tuple(value)
    return None
