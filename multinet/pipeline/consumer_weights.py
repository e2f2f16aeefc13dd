"""A consumer's weights as the matrix its statistics' rows multiply, and back: the one place that knows the layout.

A consumer computes Y = X W, X holding one row per sample (a Linear) or output position (a conv): its input
columns, then a ones column where the layer has a bias. W is the layer's weight flattened to outputs x
columns (a conv's (out, in/groups, *kernel) to out x (in/groups * kernel)) and transposed, with the bias as
its last row. Statistics, least-squares problems, the masked evaluator and every write-back read and write
weights through these functions, so the layout cannot drift apart between them.

A transposed conv computes the conv of its zero-stuffed input (calib.unfold) with the kernel flipped and
its (in, out) dims swapped: ``output_major`` gives that conv's weight, ``layer_layout`` takes it back, and
everything between sees a transposed conv as the conv it equals.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from ..graph.op_tables import weight_output_dim


def consumer_weight(gm: fx.GraphModule, name: str) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """(weight, bias, is_module) of a consumer: a module name or a functional weight attribute."""
    try:
        module = gm.get_submodule(name)
        return module.weight, module.bias, True
    except AttributeError:
        return getattr(gm, name), None, False


def transposed(gm: fx.GraphModule, name: str) -> bool:
    """Whether consumer ``name`` is a transposed conv (its weight (in, out / groups, *kernel))."""
    try:
        return weight_output_dim(gm.get_submodule(name)) == 1
    except AttributeError:
        return False


def output_major(weight: torch.Tensor, is_transposed: bool) -> torch.Tensor:
    """The weight as (outputs, inputs per conv group, *kernel): a transposed conv's as the conv it equals."""
    if not is_transposed:
        return weight
    return weight.transpose(0, 1).flip(list(range(2, weight.ndim)))


def layer_layout(weight: torch.Tensor, is_transposed: bool) -> torch.Tensor:
    """The inverse of ``output_major`` (the flip and the swap are their own inverses)."""
    return output_major(weight, is_transposed)


def weight_matrix(weight: torch.Tensor, bias: torch.Tensor | None, bias_row: bool = True,
                  outputs: torch.Tensor | None = None, dtype: torch.dtype | None = torch.float64,
                  device: str | torch.device | None = "cpu", is_transposed: bool = False) -> torch.Tensor:
    """W: (columns [+ 1]) x outputs, the bias (zero where the layer has none) as the last row where
    ``bias_row``. ``outputs``: only these outputs' columns. ``dtype``/``device`` None: the weight's own
    (statistics are float64 on the CPU; a shard multiplies by the weights where they are)."""
    flat = output_major(weight.detach(), is_transposed).flatten(1)
    flat = flat.to(device=device if device is not None else flat.device, dtype=dtype or flat.dtype)
    if outputs is not None:
        flat = flat[outputs.to(flat.device)]
    if not bias_row:
        return flat.T
    if bias is None:
        bias_values = flat.new_zeros(flat.shape[0])
    else:
        bias_values = bias.detach().to(flat)
        if outputs is not None:
            bias_values = bias_values[outputs.to(flat.device)]
    return torch.cat([flat.T, bias_values[None]], 0)


def consumer_matrix(gm: fx.GraphModule, name: str, bias_row: bool | None = None, **options) -> torch.Tensor:
    """``weight_matrix`` of a consumer in ``gm``; ``bias_row`` None: where the layer can hold a bias (a
    module always can: a bias-free module gains one when re-solved; a functional weight only with one)."""
    weight, bias, _ = consumer_weight(gm, name)
    if bias_row is None:
        bias_row = has_bias_row(gm, name)
    return weight_matrix(weight, bias, bias_row, is_transposed=transposed(gm, name), **options)


def output_count(gm: fx.GraphModule, name: str) -> int:
    """How many outputs consumer ``name`` has (a transposed conv's weight holds them in dim 1)."""
    return output_major(consumer_weight(gm, name)[0], transposed(gm, name)).shape[0]


def has_bias_row(gm: fx.GraphModule, name: str) -> bool:
    """Whether the consumer's least squares has a bias row: a module, or a functional layer with a bias."""
    _, bias, is_module = consumer_weight(gm, name)
    return is_module or bias is not None


def layer_weight(rows: torch.Tensor, shape: tuple[int, ...], is_transposed: bool = False) -> torch.Tensor:
    """The inverse of ``weight_matrix`` without its bias row: columns x outputs back to a layer weight
    (outputs, inputs per conv group, *kernel; a transposed conv's in its own layout), the kernel taken from
    ``shape`` (the layer's weight shape)."""
    return layer_layout(rows.T.reshape(rows.shape[1], -1, *shape[2:]), is_transposed)


def write_matrix(gm: fx.GraphModule, name: str, matrix: torch.Tensor, has_bias: bool,
                 outputs: torch.Tensor | None = None) -> None:
    """W (columns [+ 1] x outputs, the inverse of ``weight_matrix``) into the consumer's parameters in
    place: the weight's rows ``outputs`` (all of them where None; a full-width model keeps its removed
    outputs) and, with ``has_bias``, the bias's, a bias-free module gaining a zero bias first."""
    weight, bias, _ = consumer_weight(gm, name)
    is_transposed = transposed(gm, name)
    as_conv = output_major(weight.detach(), is_transposed)
    rows = (matrix[:-1] if has_bias else matrix).T
    if outputs is None:
        flat = rows.to(weight)
    else:
        outputs = outputs.to(weight.device)
        flat = as_conv.flatten(1).clone()
        flat[outputs] = rows.to(flat)
    weight.data = layer_layout(flat.reshape(as_conv.shape), is_transposed).contiguous()
    if not has_bias:
        return
    module = gm.get_submodule(name)  # only a module has a bias row (``has_bias_row``)
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros(as_conv.shape[0], dtype=weight.dtype, device=weight.device))
    if outputs is None:
        module.bias.data = matrix[-1].to(module.bias)
    else:
        values = module.bias.detach().clone()
        values[outputs] = matrix[-1].to(values)
        module.bias.data = values
