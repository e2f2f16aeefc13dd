"""A consumer's weights as the matrix its statistics' rows multiply, and back: the one place that knows the layout.

A consumer computes Y = X W, X holding one row per sample (a Linear) or output position (a conv): its input
columns, then a ones column where the layer has a bias. W is the layer's weight flattened to outputs x
columns (a conv's (out, in/groups, *kernel) to out x (in/groups * kernel)) and transposed, with the bias as
its last row. Statistics, least-squares problems, the masked evaluator and every write-back read and write
weights through these functions, so the layout cannot drift apart between them.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn


def consumer_weight(gm: fx.GraphModule, name: str) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """(weight, bias, is_module) of a consumer: a module name or a functional weight attribute."""
    try:
        module = gm.get_submodule(name)
        return module.weight, module.bias, True
    except AttributeError:
        return getattr(gm, name), None, False


def weight_matrix(weight: torch.Tensor, bias: torch.Tensor | None, bias_row: bool = True,
                  outputs: torch.Tensor | None = None, dtype: torch.dtype | None = torch.float64,
                  device: str | torch.device | None = "cpu") -> torch.Tensor:
    """W: (columns [+ 1]) x outputs, the bias (zero where the layer has none) as the last row where
    ``bias_row``. ``outputs``: only these outputs' columns. ``dtype``/``device`` None: the weight's own
    (statistics are float64 on the CPU; a shard multiplies by the weights where they are)."""
    flat = weight.detach().flatten(1)
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
    return weight_matrix(weight, bias, bias_row, **options)


def has_bias_row(gm: fx.GraphModule, name: str) -> bool:
    """Whether the consumer's least squares has a bias row: a module, or a functional layer with a bias."""
    _, bias, is_module = consumer_weight(gm, name)
    return is_module or bias is not None


def layer_weight(rows: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of ``weight_matrix`` without its bias row: columns x outputs back to a layer weight
    (outputs, inputs per conv group, *kernel), the kernel taken from ``shape`` (the layer's weight shape)."""
    return rows.T.reshape(rows.shape[1], -1, *shape[2:])


def write_matrix(gm: fx.GraphModule, name: str, matrix: torch.Tensor, has_bias: bool,
                 outputs: torch.Tensor | None = None) -> None:
    """W (columns [+ 1] x outputs, the inverse of ``weight_matrix``) into the consumer's parameters in
    place: the weight's rows ``outputs`` (all of them where None; a full-width model keeps its removed
    outputs) and, with ``has_bias``, the bias's, a bias-free module gaining a zero bias first."""
    weight, bias, _ = consumer_weight(gm, name)
    rows = (matrix[:-1] if has_bias else matrix).T
    if outputs is None:
        flat = rows.to(weight)
    else:
        outputs = outputs.to(weight.device)
        flat = weight.detach().flatten(1).clone()
        flat[outputs] = rows.to(flat)
    weight.data = flat.reshape(weight.shape)
    if not has_bias:
        return
    module = gm.get_submodule(name)  # only a module has a bias row (``has_bias_row``)
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
    if outputs is None:
        module.bias.data = matrix[-1].to(module.bias)
    else:
        values = module.bias.detach().clone()
        values[outputs] = matrix[-1].to(values)
        module.bias.data = values
