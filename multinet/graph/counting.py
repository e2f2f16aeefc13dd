"""FLOPs and parameter counts from traced shapes.

FLOPs are counted as multiply-accumulates of Conv, Linear and matmul nodes, the convention of
torchvision's model cards and Torch-Pruning's counter, so numbers compare directly.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .tracing import propagate_shapes


@dataclass
class LayerCount:
    name: str
    kind: str
    flops: int
    params: int


@dataclass
class Counts:
    flops: int
    params: int
    layers: list[LayerCount]


def _out_numel(node: fx.Node) -> int:
    meta = node.meta.get("tensor_meta")
    return math.prod(meta.shape) if meta is not None and hasattr(meta, "shape") else 0


def _in_numel(node: fx.Node) -> int:
    shape = _in_shape(node.args[0]) if node.args else None
    return math.prod(shape) if shape is not None else 0


def _in_shape(arg) -> tuple[int, ...] | None:
    meta = arg.meta.get("tensor_meta") if isinstance(arg, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


_SDPA = (F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)
_MATMUL = (torch.matmul, torch.bmm, operator.matmul, torch.ops.aten.matmul.default, torch.ops.aten.bmm.default)
_ADD_MATMUL = (torch.baddbmm, torch.addmm, torch.ops.aten.baddbmm.default, torch.ops.aten.addmm.default)  # bias first


def _attention_flops(node: fx.Node) -> int:
    """q·kᵀ and weights·v: (batch·heads·L) x S x (E + Ev) multiply-accumulates."""
    q, k = _in_shape(node.args[0]), _in_shape(node.args[1])
    if q is None or k is None:
        return 0
    return math.prod(q[:-1]) * k[-2] * (q[-1] + _out_numel(node) // max(1, math.prod(q[:-1])))


def count(gm: fx.GraphModule, example_inputs: tuple | None = None) -> Counts:
    """Count FLOPs (MACs) and parameters; reruns shape propagation when inputs are given."""
    if example_inputs is not None:
        propagate_shapes(gm, example_inputs)
    modules = dict(gm.named_modules())
    layers: list[LayerCount] = []
    for node in gm.graph.nodes:
        flops = 0
        kind = None
        if node.op == "call_module":
            m = modules[node.target]
            own = sum(p.numel() for p in m.parameters(recurse=False))
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                kind, flops = "conv", _out_numel(node) * (m.in_channels // m.groups) * math.prod(m.kernel_size)
            elif isinstance(m, nn.modules.conv._ConvTransposeNd):  # every input value times out/groups x kernel
                kind, flops = "conv", _in_numel(node) * (m.out_channels // m.groups) * math.prod(m.kernel_size)
            elif isinstance(m, nn.Linear):
                kind, flops = "linear", _out_numel(node) * m.in_features
            elif own:
                kind = type(m).__name__
            if kind:
                layers.append(LayerCount(node.target, kind, flops, own))
        elif node.op == "call_function" and node.target in (F.conv1d, F.conv2d, F.conv3d, F.linear,
                                                              torch.ops.aten.linear.default):
            w = _in_shape(node.args[1])
            flops = _out_numel(node) * math.prod(w[1:])
            linear = node.target in (F.linear, torch.ops.aten.linear.default)
            layers.append(LayerCount(node.name, "linear" if linear else "conv", flops, 0))
        elif node.op == "call_function" and node.target in _SDPA:
            layers.append(LayerCount(node.name, "attention", _attention_flops(node), 0))
        elif node.op in ("call_function", "call_method") and (
            node.target in _MATMUL or node.target in ("matmul", "bmm")
        ):
            a = _in_shape(node.args[0])
            if a is not None:
                layers.append(LayerCount(node.name, "matmul", _out_numel(node) * a[-1], 0))
        elif node.op == "call_function" and node.target in _ADD_MATMUL:
            a = _in_shape(node.args[1])
            if a is not None:
                layers.append(LayerCount(node.name, "matmul", _out_numel(node) * a[-1], 0))
    params = sum(p.numel() for p in gm.parameters())
    return Counts(sum(lc.flops for lc in layers), params, layers)

