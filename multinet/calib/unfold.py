"""A consumer's input as the rows x columns matrix its weights multiply (im2col for convs)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import MultinetError


def conv_geometry(module: nn.Module | None, node_args: tuple, node_kwargs: dict, weight_shape) -> dict:
    """kernel/stride/padding/dilation of a conv call, module or functional."""
    if module is not None:
        if module.padding_mode != "zeros":
            raise MultinetError(f"calibration supports zero-padded convs only, not padding_mode={module.padding_mode!r}")
        geom = dict(kernel=tuple(module.kernel_size), stride=tuple(module.stride), padding=module.padding,
                    dilation=tuple(module.dilation))
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            geom.update(transposed=True, output_padding=tuple(module.output_padding))
        return geom
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


def _as_image(x: torch.Tensor, geom: dict) -> tuple[torch.Tensor, tuple, tuple, tuple, tuple]:
    """Explicitly padded N x C x H x W input and its kernel, stride, dilation, padding (Conv1d as 1 x L)."""
    if geom.get("transposed"):
        return _transposed_as_image(x, geom)
    x, padding = _explicit_padding(x, geom)
    kernel, stride, dilation = geom["kernel"], geom["stride"], geom["dilation"]
    if x.ndim == 3:  # Conv1d as a 1 x L image
        x = x.unsqueeze(2)
        kernel, stride, dilation, padding = (1, *kernel), (1, *stride), (1, *dilation), (0, *padding)
    if x.ndim != 4:
        raise MultinetError("calibration supports Conv1d and Conv2d consumers (not Conv3d)")
    return x, tuple(kernel), tuple(stride), tuple(dilation), tuple(padding)


def _transposed_as_image(x: torch.Tensor, geom: dict) -> tuple[torch.Tensor, tuple, tuple, tuple, tuple]:
    """A transposed conv as the conv it equals: its input with stride - 1 zeros between neighbours, padded
    by dilation * (kernel - 1) - padding on each side (output_padding more at the end; a negative pad
    crops), read at stride 1 with the kernel flipped and in/out swapped (consumer_weights.output_major)."""
    kernel, stride, dilation = geom["kernel"], geom["stride"], geom["dilation"]
    padding, extra = geom["padding"], geom["output_padding"]
    if x.ndim == 3:  # ConvTranspose1d as a 1 x L image
        x = x.unsqueeze(2)
        kernel, stride, dilation, padding, extra = (1, *kernel), (1, *stride), (1, *dilation), (0, *padding), (0, *extra)
    if x.ndim != 4:
        raise MultinetError("calibration supports ConvTranspose1d and ConvTranspose2d consumers (not 3d)")
    n, c, h, w = x.shape
    stuffed = x.new_zeros(n, c, (h - 1) * stride[0] + 1, (w - 1) * stride[1] + 1)
    stuffed[:, :, ::stride[0], ::stride[1]] = x
    pads = []  # F.pad order: last dim first
    for k, d, p, e in reversed(list(zip(kernel, dilation, padding, extra))):
        pads += [d * (k - 1) - p, d * (k - 1) - p + e]
    return F.pad(stuffed, pads), tuple(kernel), (1, 1), tuple(dilation), (0, 0)


def _grid(x: torch.Tensor, kernel: tuple, stride: tuple, dilation: tuple, padding: tuple) -> tuple[int, ...]:
    return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1
                 for size, k, s, d, p in zip(x.shape[2:], kernel, stride, dilation, padding))


def output_grid(x: torch.Tensor, geom: dict) -> tuple[int, ...]:
    """The conv's output height and width (1 x L for Conv1d): how many positions each sample has."""
    return _grid(*_as_image(x, geom))


def unfold_conv_input(x: torch.Tensor, geom: dict, positions: torch.Tensor | None = None,
                      ones_column: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """N x C x (L | H x W) -> (N*positions) x (C*prod(kernel)), columns ordered like weight.flatten(1).

    ``positions``: flat output positions (row-major over the output grid) to keep, the same for
    every sample; only their patches are gathered, so sampling never builds the whole im2col
    matrix (C*k*k columns for every output position) first. ``ones_column`` appends a column of
    ones (a bias's input), ``dtype`` converts: both written in the one copy that lays the patches
    out as rows, not in copies of their own (the rows are most of the statistics' memory traffic)."""
    x, kernel, stride, dilation, padding = _as_image(x, geom)
    if positions is None:
        cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # N x C*k x L
        patches = cols.transpose(1, 2)  # N x L x C*k, a view
    else:
        _, width = _grid(x, kernel, stride, dilation, padding)
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
        positions = positions.to(x.device)
        top = (positions // width) * stride[0]
        left = (positions % width) * stride[1]
        rows = top[:, None, None] + (torch.arange(kernel[0], device=x.device) * dilation[0])[None, :, None]
        cols = left[:, None, None] + (torch.arange(kernel[1], device=x.device) * dilation[1])[None, None, :]
        gathered = x[:, :, rows, cols]  # N x C x P x kh x kw
        patches = gathered.permute(0, 2, 1, 3, 4)  # N x P x C x kh x kw, a view
    n, p = patches.shape[:2]
    columns = math.prod(patches.shape[2:])
    out = torch.empty(n * p, columns + int(ones_column), dtype=dtype or x.dtype, device=x.device)
    out[:, :columns].view(patches.shape).copy_(patches)
    if ones_column:
        out[:, columns] = 1
    return out


def conv_as_rows(x: torch.Tensor, geom: dict, matrix: torch.Tensor) -> torch.Tensor:
    """``unfold_conv_input(x, geom) @ matrix`` for a ``C*prod(kernel)`` x d ``matrix``, computed as the
    conv it is (no im2col matrix): (N*positions) x d, rows ordered like the unfolded ones."""
    x, kernel, stride, dilation, padding = _as_image(x, geom)
    weight = matrix.T.reshape(matrix.shape[1], x.shape[1], *kernel).to(x)
    y = F.conv2d(x, weight, stride=stride, padding=padding, dilation=dilation)  # N x d x H' x W'
    return y.flatten(2).transpose(1, 2).reshape(-1, matrix.shape[1])


def linear_rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])
