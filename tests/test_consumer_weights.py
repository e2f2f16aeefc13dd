"""The consumer weight layout (pipeline/consumer_weights.py): the matrix its statistics' rows multiply, and back.

Checked against the layers themselves: the im2col rows (torch's F.unfold, with a ones column) times the
matrix must give the layer's output, so a layout that drifted from what the statistics assume fails here.
"""
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from multinet.pipeline.consumer_weights import (consumer_matrix, has_bias_row, layer_weight, weight_matrix,
                                                write_matrix)


def _rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows the layer's weights multiply, ones column last (an independent im2col: F.unfold)."""
    if isinstance(layer, nn.Linear):
        rows = x
    else:
        image = x if isinstance(layer, nn.Conv2d) else x[..., None]  # Conv1d as a conv of width 1
        kernel = layer.kernel_size if isinstance(layer, nn.Conv2d) else (layer.kernel_size[0], 1)
        pad = layer.padding if isinstance(layer, nn.Conv2d) else (layer.padding[0], 0)
        cols = F.unfold(image.double(), kernel, padding=pad)  # N x (C k) x positions
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return torch.cat([rows.double(), torch.ones(len(rows), 1, dtype=torch.float64)], 1)


def _outputs_as_rows(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    return y.double() if isinstance(layer, nn.Linear) else y.double().flatten(2).transpose(1, 2).reshape(-1, y.shape[1])


LAYERS = [
    (lambda: nn.Linear(6, 4), (5, 6)),
    (lambda: nn.Linear(6, 4, bias=False), (5, 6)),
    (lambda: nn.Conv2d(3, 5, 3, padding=1), (2, 3, 6, 6)),
    (lambda: nn.Conv2d(3, 5, 3, padding=1, bias=False), (2, 3, 6, 6)),
    (lambda: nn.Conv1d(4, 3, 3, padding=1), (2, 4, 7)),
]


@pytest.mark.parametrize("make, shape", LAYERS)
def test_the_matrix_times_the_rows_is_the_layer_output(make, shape):
    torch.manual_seed(0)
    layer, x = make().eval(), torch.randn(*shape)
    gm = fx.symbolic_trace(nn.Sequential(layer))
    w = consumer_matrix(gm, "0")
    assert has_bias_row(gm, "0") and w.dtype == torch.float64  # a module always gets its bias row
    with torch.no_grad():
        expected = _outputs_as_rows(layer, layer(x))
    torch.testing.assert_close(_rows(layer, x) @ w, expected, rtol=1e-5, atol=1e-5)
    assert layer_weight(w[:-1], tuple(layer.weight.shape)).shape == layer.weight.shape
    torch.testing.assert_close(layer_weight(w[:-1], tuple(layer.weight.shape)), layer.weight.double())


def test_a_grouped_conv_matrix_is_its_own_layout_per_conv_group():
    torch.manual_seed(0)
    layer, x = nn.Conv2d(4, 6, 3, padding=1, groups=2).eval(), torch.randn(2, 4, 5, 5)
    w = weight_matrix(layer.weight, layer.bias)  # (in/groups * 9 + 1) x out
    assert w.shape == (2 * 9 + 1, 6)
    with torch.no_grad():
        y = _outputs_as_rows(layer, layer(x))
    for g in range(2):
        block = nn.Conv2d(2, 3, 3, padding=1)
        rows = _rows(block, x[:, 2 * g:2 * g + 2])
        torch.testing.assert_close(rows @ w[:, 3 * g:3 * g + 3], y[:, 3 * g:3 * g + 3], rtol=1e-5, atol=1e-5)


def test_a_functional_weight_has_no_bias_row():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 5))

        def forward(self, x):
            return F.linear(x, self.w)

    gm = fx.symbolic_trace(Functional())
    assert not has_bias_row(gm, "w")
    w = consumer_matrix(gm, "w")
    assert w.shape == (5, 3)
    x = torch.randn(4, 5)
    torch.testing.assert_close(x.double() @ w, gm(x).double())
    write_matrix(gm, "w", 2 * w, False)
    torch.testing.assert_close(gm(x).double(), 2 * (x.double() @ w), rtol=1e-6, atol=1e-6)


def test_write_matrix_is_the_inverse_and_writes_only_the_outputs_asked_for():
    torch.manual_seed(0)
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False)))
    layer, x = gm.get_submodule("0"), torch.randn(2, 3, 6, 6)
    before = consumer_matrix(gm, "0")
    assert torch.equal(before[-1], torch.zeros(4, dtype=torch.float64))  # no bias: a zero bias row
    new = torch.randn_like(before)
    outputs = torch.tensor([1, 3])
    write_matrix(gm, "0", new[:, outputs], True, outputs)  # a bias-free module gains a bias
    after = consumer_matrix(gm, "0")
    assert layer.bias is not None
    torch.testing.assert_close(after[:, outputs], new[:, outputs].float().double())
    kept = torch.tensor([0, 2])
    assert torch.equal(after[:-1, kept], before[:-1, kept]) and torch.equal(after[-1, kept], torch.zeros(2).double())
    write_matrix(gm, "0", before, True)  # every output at once: the layer as it was, with a zero bias
    with torch.no_grad():
        torch.testing.assert_close(_rows(layer, x) @ before, _outputs_as_rows(layer, layer(x)), rtol=1e-5, atol=1e-5)


def test_outputs_select_the_matrix_columns_and_their_bias():
    layer = nn.Linear(5, 4)
    full = weight_matrix(layer.weight, layer.bias)
    picked = weight_matrix(layer.weight, layer.bias, outputs=torch.tensor([3, 0]))
    assert torch.equal(picked, full[:, [3, 0]])
    assert weight_matrix(layer.weight, layer.bias, bias_row=False).shape == (5, 4)
    same = weight_matrix(layer.weight, layer.bias, dtype=None, device=None)
    assert same.dtype == torch.float32 and torch.equal(same, full.float())


TRANSPOSED = [
    (lambda: nn.ConvTranspose2d(3, 4, 2, stride=2), (2, 3, 4, 5)),
    (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1, bias=False), (2, 3, 4, 5)),
    (lambda: nn.ConvTranspose2d(3, 4, 4, stride=3, padding=2, dilation=2), (2, 3, 4, 5)),
    (lambda: nn.ConvTranspose1d(3, 4, 3, stride=2, padding=1), (2, 3, 7)),
]


@pytest.mark.parametrize("make, shape", TRANSPOSED)
def test_a_transposed_conv_is_the_conv_it_equals(make, shape):
    """A transposed conv's rows (its input zero-stuffed and padded, calib.unfold) times its matrix (kernel
    flipped, in/out swapped) give the layer's output, sampled positions too; the matrix written back
    (doubled) doubles the output, and layer_weight takes it back to the (in, out, *kernel) layout."""
    from multinet.calib.unfold import conv_as_rows, conv_geometry, output_grid, unfold_conv_input

    torch.manual_seed(0)
    layer, x = make().double().eval(), torch.randn(*shape, dtype=torch.float64)
    gm = fx.symbolic_trace(nn.Sequential(layer))
    w = consumer_matrix(gm, "0")
    geom = conv_geometry(layer, (), {}, tuple(layer.weight.shape))
    with torch.no_grad():
        y = layer(x)
    expected = _outputs_as_rows(layer, y)
    assert tuple(output_grid(x, geom))[-1] == y.shape[-1]
    torch.testing.assert_close(unfold_conv_input(x, geom, ones_column=True) @ w, expected)
    torch.testing.assert_close(conv_as_rows(x, geom, w[:-1]) + w[-1], expected)
    positions = torch.tensor([0, 5, y[0, 0].numel() - 1])
    sampled = unfold_conv_input(x, geom, positions, ones_column=True) @ w
    torch.testing.assert_close(sampled, expected.reshape(len(x), -1, 4)[:, positions].reshape(-1, 4))
    torch.testing.assert_close(layer_weight(w[:-1], tuple(layer.weight.shape), True), layer.weight)
    write_matrix(gm, "0", 2 * w, True)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), 2 * y)
