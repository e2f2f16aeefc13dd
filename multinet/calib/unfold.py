"""A consumer's input as the rows x columns matrix its weights multiply (im2col for convs)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import MultinetError


def conv_geometry(module: nn.Module | None, node_args: tuple, node_kwargs: dict, weight_shape) -> dict:
    """kernel/stride/padding/dilation of a conv call, module or functional."""
    if module is not None:
        if module.padding_mode != "zeros":
            raise MultinetError(f"calibration supports zero-padded convs only, not padding_mode={module.padding_mode!r}")
        return dict(kernel=tuple(module.kernel_size), stride=tuple(module.stride), padding=module.padding,
                    dilation=tuple(module.dilation))
    nd = len(weight_shape) - 2

    def get(i, name, default):
        value = node_args[i] if len(node_args) > i else node_kwargs.get(name, default)
        return (value,) * nd if isinstance(value, int) else value

    return dict(kernel=tuple(weight_shape[2:]), stride=tuple(get(3, "stride", 1)), padding=get(4, "padding", 0),
                dilation=tuple(get(5, "dilation", 1)))


def _explicit_padding(x: torch.Tensor, geom: dict) -> tuple[torch.Tensor, tuple]:
    padding = geom["padding"]
    if isinstance(padding, str):
        if padding == "valid":
            return x, (0,) * len(geom["kernel"])
        pads = []  # 'same': F.pad order is last dim first
        for k, d in reversed(list(zip(geom["kernel"], geom["dilation"]))):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads), (0,) * len(geom["kernel"])
    return x, tuple(padding)


def unfold_conv_input(x: torch.Tensor, geom: dict) -> torch.Tensor:
    """N x C x (L | H x W) -> (N*positions) x (C*prod(kernel)), columns ordered like weight.flatten(1)."""
    x, padding = _explicit_padding(x, geom)
    kernel, stride, dilation = geom["kernel"], geom["stride"], geom["dilation"]
    if x.ndim == 3:  # Conv1d as a 1 x L image
        x = x.unsqueeze(2)
        kernel, stride, dilation, padding = (1, *kernel), (1, *stride), (1, *dilation), (0, *padding)
    if x.ndim != 4:
        raise MultinetError("calibration supports Conv1d and Conv2d consumers (not Conv3d)")
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # N x C*k x L
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def linear_rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])
