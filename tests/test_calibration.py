import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import multinet
from multinet.calib import collect, consumer_specs
from multinet.errors import InputShapeError, MultinetError


class ConvLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 3, 3, stride=2, padding=1, dilation=1)
        self.fc = nn.Linear(3 * 3 * 3, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.b(F.relu(self.a(x)))), 1))


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = ConvLinear().eval()
    x = torch.randn(10, 2, 6, 6)
    return model, x, multinet.trace(model, x[:2])


def test_conv_gram_matches_explicit_im2col(setup):
    model, x, graph = setup
    stats = collect(graph.module, consumer_specs(graph, ["b", "fc"]), x, batch_size=3)
    h = F.relu(model.a(x)).detach()
    # explicit im2col, written out position by position
    padded = F.pad(h, (1, 1, 1, 1))
    rows = []
    for n in range(10):
        for i in range(3):
            for j in range(3):
                patch = padded[n, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3].reshape(-1)
                rows.append(torch.cat([patch, torch.ones(1)]))
    x_b = torch.stack(rows).double()
    torch.testing.assert_close(stats["b"].gram, x_b.T @ x_b)
    # the faster option: one float32 GEMM per batch summed in float64 (float32 rounding)
    fast = collect(graph.module, consumer_specs(graph, ["b"]), x, batch_size=3, precision=torch.float32)
    torch.testing.assert_close(fast["b"].gram, x_b.T @ x_b, rtol=1e-5, atol=1e-5)
    assert stats["b"].rows == 90
    # and the layer's weights multiply those columns: X @ W^T reproduces the conv output
    out = x_b[:, :-1].float() @ model.b.weight.flatten(1).T + model.b.bias
    torch.testing.assert_close(out.reshape(10, 3, 3, 3).permute(0, 3, 1, 2), model.b(h), atol=1e-5, rtol=1e-5)
    f = torch.flatten(F.relu(model.b(h)), 1).double()
    f = torch.cat([f, torch.ones(10, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(stats["fc"].gram, f.T @ f)


def test_statistics_are_additive_and_bounded(setup):
    _, x, graph = setup
    specs = consumer_specs(graph, ["b"])
    whole = collect(graph.module, specs, x)["b"]
    first, second = collect(graph.module, specs, x[:4])["b"], collect(graph.module, specs, x[4:])["b"]
    first.add(second)
    torch.testing.assert_close(first.gram, whole.gram)
    fast = [collect(graph.module, specs, part, precision=torch.float32)["b"] for part in (x, x[:4], x[4:])]
    fast[1].add(fast[2])
    torch.testing.assert_close(fast[1].gram, fast[0].gram, rtol=1e-6, atol=1e-6)  # other batches, float32 sums
    more = collect(graph.module, specs, torch.cat([x, x, x]))["b"]
    assert more.gram.shape == whole.gram.shape  # memory does not grow with the samples


def test_cross_term_against_itself_equals_gram(setup):
    _, x, graph = setup
    specs = consumer_specs(graph, ["b", "fc"])
    stats = collect(graph.module, specs, x, reference=graph.module, reference_specs=specs, max_positions=4)
    for s in stats.values():
        torch.testing.assert_close(s.cross, s.gram)
    assert stats["b"].rows == 10 * 4


def test_calibration_bad_inputs(setup):
    model, x, graph = setup
    specs = consumer_specs(graph, ["b"])
    with pytest.raises(MultinetError, match="no calibration data"):
        collect(graph.module, specs, torch.zeros(0, 2, 6, 6))
    with pytest.raises(MultinetError, match="no calibration data"):
        collect(graph.module, specs, [])
    with pytest.raises(InputShapeError, match=r"\(4, 3, 6, 6\) does not fit"):
        collect(graph.module, specs, torch.randn(4, 3, 6, 6))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(MultinetError, match="NaN or Inf"):
        collect(graph.module, specs, bad)
    with pytest.warns(UserWarning, match="calibration rows"):
        collect(graph.module, consumer_specs(graph, ["fc"]), x[:3])


def test_the_finiteness_check_of_calibration_rows_is_exact():
    """Rows are checked by their sum (a mask as large as the rows cost 15-25x more per batch); a sum that
    overflows on finite values falls back to the element-wise check."""
    from multinet.solve.problem import all_finite

    big = torch.full((64, 8), 3e38)  # finite, but its sum overflows to inf
    assert all_finite(big)
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(64, 8)
        t[5, 3] = bad
        assert not all_finite(t)
    both = torch.randn(64, 8)
    both[0, 0], both[1, 1] = float("inf"), -float("inf")  # their sum is NaN, not a finite number
    assert not all_finite(both)


CONV_CALLS = [  # input shape, conv geometry: strides, padding, dilation, 'same', Conv1d
    ((3, 4, 9, 11), dict(kernel=(3, 3), stride=(2, 1), padding=(1, 2), dilation=(1, 2))),
    ((2, 5, 8, 8), dict(kernel=(1, 1), stride=(2, 2), padding=(0, 0), dilation=(1, 1))),
    ((2, 3, 7, 7), dict(kernel=(3, 3), stride=(1, 1), padding="same", dilation=(2, 2))),
    ((2, 3, 10), dict(kernel=(3,), stride=(2,), padding=(1,), dilation=(1,))),
]


def _im2col_reference(x: torch.Tensor, geom: dict) -> torch.Tensor:
    """Float64 rows (bias column of ones last) from F.unfold directly, padding written out."""
    x = x.double()
    kernel, stride, dilation, padding = geom["kernel"], geom["stride"], geom["dilation"], geom["padding"]
    if x.ndim == 3:
        x, kernel, stride, dilation, padding = x[:, :, None], (1, *kernel), (1, *stride), (1, *dilation), (0, *padding)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        x = F.pad(x, [total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2])
        padding = (0, 0)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
    cols = cols.reshape(-1, cols.shape[2])
    return torch.cat([cols, torch.ones(len(cols), 1, dtype=torch.float64)], 1)


@pytest.mark.parametrize("shape,geom", CONV_CALLS)
def test_a_conv_consumers_rows_and_cross_term_match_a_float64_im2col(shape, geom):
    """The rows are written with their ones column in one copy, and X^T (X_ref - X) W_ref comes from a
    conv of the input difference (no im2col of the reference input) where nothing is sampled; both
    against float64 im2col GEMMs. Sampled positions take the rows' route and agree as well."""
    from multinet.calib.stats import BatchGrams, ConsumerSpec, input_rows

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    x_ref = x + 0.3 * torch.randn(shape, generator=gen)
    spec = ConsumerSpec("c", "conv", ["c"], geom)
    rows = _im2col_reference(x, geom)
    target = torch.randn(rows.shape[1], 5, generator=gen, dtype=torch.float64)
    expected = rows.T @ ((_im2col_reference(x_ref, geom) - rows) @ target)
    got_rows = input_rows(spec, x, None, gen, torch.float32)
    assert got_rows.dtype == torch.float32
    assert torch.allclose(got_rows.double(), rows, atol=1e-6)
    for max_positions in (None, 2):  # every position (the conv route), two of them (the rows' route)
        grams = BatchGrams(max_positions, 7)
        stats = grams.stats("c", spec, x, 0, spec, x_ref, target.float())
        if max_positions is None:
            assert torch.allclose(stats.delta_cross, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
        else:
            picked = grams.input_rows(spec, x, 0).double()
            picked_ref = grams.input_rows(spec, x_ref, 0).double()
            sampled = picked.T @ ((picked_ref - picked) @ target)
            assert picked.shape[0] == 2 * shape[0]
            assert torch.allclose(stats.delta_cross, sampled, rtol=1e-4, atol=1e-4 * sampled.abs().max())


def test_a_nan_in_the_original_models_conv_input_is_reported():
    from multinet.calib.stats import BatchGrams, ConsumerSpec

    geom = dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1))
    spec = ConsumerSpec("layer", "conv", ["layer"], geom)
    x = torch.randn(2, 3, 5, 5)
    x_ref = x.clone()
    x_ref[1, 2, 3, 4] = float("nan")
    with pytest.raises(MultinetError, match="NaN or Inf"):
        BatchGrams(None, 0).stats("layer", spec, x, 0, spec, x_ref, torch.randn(28, 4))


@pytest.mark.parametrize("shape,geom", CONV_CALLS)
def test_sampled_positions_are_gathered_without_the_whole_im2col(shape, geom):
    from multinet.calib.unfold import output_grid, unfold_conv_input

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    full = unfold_conv_input(x, geom)  # F.unfold of every position: the reference
    per_sample = full.shape[0] // shape[0]
    assert per_sample == math.prod(output_grid(x, geom))
    pick = torch.randperm(per_sample, generator=torch.Generator().manual_seed(1))[: max(1, per_sample // 3)]
    expected = full.view(shape[0], per_sample, -1)[:, pick].reshape(-1, full.shape[1])
    assert torch.equal(unfold_conv_input(x, geom, pick), expected)


class _PointwiseTwice(nn.Module):
    """The same 1x1 map of a 6-channel image twice: as a conv, and as a channels-last Linear (ConvNeXt)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 6, 3, padding=1)
        self.conv = nn.Conv2d(6, 4, 1)
        self.linear = nn.Linear(6, 4)

    def forward(self, x):
        h = F.relu(self.stem(x))
        return self.conv(h) + self.linear(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("max_positions", [None, 64, 10])
def test_a_channels_last_linear_samples_its_grid_like_a_1x1_conv(max_positions):
    """A Linear reading an image channels-last is a 1x1 conv in another layout: its statistics sample the
    same positions per sample as the conv's (``max_positions``), so the two Grams are equal, and at most
    ``max_positions`` rows per sample (every one of the 8x8 grid's 64 without a limit or at 64)."""
    torch.manual_seed(0)
    model = _PointwiseTwice().eval()
    x = torch.randn(12, 2, 8, 8)
    graph = multinet.trace(model, x[:2])
    stats = collect(graph.module, consumer_specs(graph, ["conv", "linear"]), x, batch_size=5,
                    max_positions=max_positions)
    torch.testing.assert_close(stats["linear"].gram, stats["conv"].gram)
    assert stats["linear"].rows == stats["conv"].rows == 12 * min(64, max_positions or 64)


def test_a_linear_over_tokens_keeps_every_token():
    """(N, T, C) is a sequence, not a grid: every token counts, whatever ``max_positions``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).eval()
    x = torch.randn(4, 30, 5)
    graph = multinet.trace(model, x[:1])
    stats = collect(graph.module, consumer_specs(graph, ["2"]), x, batch_size=2, max_positions=4)
    h = torch.cat([F.relu(model[0](x)).reshape(-1, 7), torch.ones(120, 1)], 1).double().detach()
    torch.testing.assert_close(stats["2"].gram, h.T @ h)
    assert stats["2"].rows == 120


class Siblings(nn.Module):
    """Two Linear layers and two convs that read the same tensors: their batches share one Gram product."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 4, 3, padding=1)
        self.q, self.k = nn.Linear(7 * 5 * 5, 4), nn.Linear(7 * 5 * 5, 6)

    def forward(self, x):
        h = torch.flatten(torch.cat([self.c1(x), self.c2(x)], 1), 1)
        return self.q(h) + self.k(h).sum(1, keepdim=True)


def test_consumers_that_share_a_batchs_gram_keep_sums_of_their_own():
    """Each batch's product is computed once for consumers that read the same tensor and handed to all of
    them in float32; every consumer's float64 sum over the batches must still be its own and exact."""
    torch.manual_seed(0)
    model, x = Siblings().eval(), torch.randn(11, 2, 5, 5)
    graph = multinet.trace(model, x[:2])
    stats = collect(graph.module, consumer_specs(graph, ["c1", "c2", "q", "k"]), x, batch_size=4,
                    precision=torch.float32)
    ones = torch.ones(len(x), 1, dtype=torch.float64)
    h = torch.flatten(torch.cat([model.c1(x), model.c2(x)], 1), 1).detach().double()
    rows = torch.cat([h, ones], 1)
    cols = F.unfold(x.double(), 3, padding=1).transpose(1, 2).reshape(-1, 18)
    patches = torch.cat([cols, torch.ones(len(cols), 1, dtype=torch.float64)], 1)
    for names, expected in ((("q", "k"), rows.T @ rows), (("c1", "c2"), patches.T @ patches)):
        a, b = (stats[n].gram for n in names)
        assert a.dtype == torch.float64 and a.data_ptr() != b.data_ptr()
        for gram in (a, b):
            torch.testing.assert_close(gram, expected, rtol=1e-5, atol=1e-4)
