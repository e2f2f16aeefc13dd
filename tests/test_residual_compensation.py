"""Residual-stream writers are re-solved towards their original output plus the stream's drift.

Checked against brute-force least squares on the compressed model's own activations: the writer's
new weights must be the least-squares fit of ``original output + (original stream - compressed
stream)`` from its compressed inputs, for the channels REAP kept (and of the original output alone
with the option off). Both the cached-input pipeline and the full-pass reference path.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import multinet
from multinet import data
from multinet.graph.streams import stream_operand

pytestmark = pytest.mark.usefixtures("quiet_calibration")


class ResidualMLP(nn.Module):
    """Two residual MLP blocks on a 16-wide stream: fc2 and fc4 write into it."""

    def __init__(self, width=16, hidden=24):
        super().__init__()
        self.embed = nn.Linear(64, width)
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.fc3, self.fc4 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        s0 = torch.tanh(self.embed(x.flatten(1)))
        s1 = s0 + self.drop(self.fc2(torch.relu(self.fc1(s0))))
        s2 = s1 + self.fc4(torch.relu(self.fc3(s1)))
        return self.head(s2)


class ResidualConv(nn.Module):
    """Conv blocks whose last conv goes through a BatchNorm into the stream (a prunable stream)."""

    def __init__(self, width=6, hidden=5):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            self.blocks.append(nn.ModuleDict(dict(
                conv1=nn.Conv2d(width, hidden, 3, padding=1), bn1=nn.BatchNorm2d(hidden),
                conv2=nn.Conv2d(hidden, width, 3, padding=1), bn2=nn.BatchNorm2d(width))))
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        s = self.stem(x)
        for b in self.blocks:
            s = s + b["bn2"](b["conv2"](torch.relu(b["bn1"](b["conv1"](s)))))
        return self.head(s.mean((2, 3)))


def _randomise_batchnorms(model):
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def calib():
    return data.load("digits").train_x[:384]


def _inputs(model, layer: str, x) -> torch.Tensor:
    """The input of ``layer`` on ``x`` (a forward hook; the pruned GraphModule keeps module names)."""
    seen = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


def _kept(result, producer: str) -> list[int]:
    group = next(g for g in result.groups if producer in g.producers)
    return [c for c in range(group.channels_before) if c not in set(group.removed)]


def _lstsq(rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    ones = torch.ones(len(rows), 1, dtype=torch.float64)
    return torch.linalg.lstsq(torch.cat([rows.double(), ones], 1), target.double()).solution


def _ratios(model, x, producers: list[str], ratio: float) -> dict[int, float]:
    """``ratio`` for the groups made by ``producers`` only (the stream group stays whole)."""
    graph = multinet.trace(model, x[:1])
    chosen = {g.id: ratio for g in graph.prunable_groups if set(g.producers) & set(producers)}
    assert len(chosen) == len(producers)
    return chosen


@pytest.mark.parametrize("mode", ["sequential", "reference"])
@pytest.mark.parametrize("compensate", [True, False])
def test_a_linear_writer_fits_its_output_plus_the_streams_drift(calib, mode, compensate):
    torch.manual_seed(0)
    model = ResidualMLP().eval()
    options = multinet.RunOptions(compensate_residuals=compensate, damp=0.0)
    result = multinet.compress(model, calib, ratio=_ratios(model, calib, ["fc1", "fc3"], 0.5), mode=mode,
                               options=options)
    small = result.model
    h, h_ref = _inputs(small, "fc4", calib), _inputs(model, "fc4", calib)
    s1, s1_ref = _inputs(small, "fc3", calib), _inputs(model, "fc3", calib)
    target = model.fc4(h_ref).detach()
    if compensate:
        target = target + (s1_ref - s1)
    expected = _lstsq(h, target)
    got = torch.cat([small.fc4.weight.detach().T, small.fc4.bias.detach()[None]], 0).double()
    assert got.shape == expected.shape and h.shape[1] == len(_kept(result, "fc3")) < 24
    assert (s1_ref - s1).abs().max() > 1e-2  # fc1's group left a drift in the stream
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-4)


def _conv_check(model, small, calib, kept: torch.Tensor, compensated: bool) -> None:
    """blocks.1.conv2's fitted outputs (conv, then BatchNorm, then ``+ r``; ``r`` is blocks.1.conv1's
    input) against brute-force least squares on every position, in the BatchNorm's output space,
    for the stream channels ``kept``."""
    x, x_ref = _inputs(small, "blocks.1.conv2", calib), _inputs(model, "blocks.1.conv2", calib)
    r, r_ref = _inputs(small, "blocks.1.conv1", calib), _inputs(model, "blocks.1.conv1", calib)
    bn = model.blocks[1]["bn2"]
    a = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()[kept]
    with torch.no_grad():
        out_ref = model.blocks[1]["conv2"](x_ref)[:, kept]
    target = a[None, :, None, None] * out_ref + (r_ref[:, kept] - r if compensated else 0)
    target = target.permute(0, 2, 3, 1).reshape(-1, len(kept))
    rows = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, x.shape[1] * 9)
    expected = _lstsq(rows, target) / a.double()[None]
    conv = small.get_submodule("blocks.1.conv2")
    got = torch.cat([conv.weight.detach().flatten(1).T, conv.bias.detach()[None]], 0).double()
    # digits' blank borders make some columns redundant: compare the fitted outputs, not the weights
    design = torch.cat([rows.double(), torch.ones(len(rows), 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(design @ got, design @ expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("mode", ["sequential", "reference"])
def test_a_conv_writer_behind_a_batchnorm_cancels_the_streams_drift(calib, mode):
    torch.manual_seed(0)
    model = _randomise_batchnorms(ResidualConv())
    ratio = _ratios(model, calib, ["blocks.0.conv1", "blocks.1.conv1"], 0.6)
    result = multinet.compress(model, calib, ratio=ratio, mode=mode, max_positions=None)
    assert _inputs(result.model, "blocks.1.conv1", calib).shape[1] == 6  # the stream is whole
    _conv_check(model, result.model, calib, torch.arange(6), compensated=True)
    with pytest.raises(AssertionError):  # and the drift term mattered
        _conv_check(model, result.model, calib, torch.arange(6), compensated=False)


@pytest.mark.parametrize("mode", ["sequential", "reference"])
def test_no_compensation_under_readers_already_fitted_to_the_drifted_stream(calib, mode):
    """The stream group comes first: its readers (the blocks' conv1 and the head) are re-solved on the
    drifted stream, so the writers must not undo that drift under them."""
    torch.manual_seed(0)
    model = _randomise_batchnorms(ResidualConv())
    result = multinet.compress(model, calib, ratio=0.5, mode=mode, max_positions=None)
    assert result.groups[0].producers[0] == "stem"
    kept = torch.tensor(_kept(result, "stem"))
    assert len(kept) < 6  # the stream group was pruned first
    _conv_check(model, result.model, calib, kept, compensated=False)


def test_pipeline_equals_reference_with_and_without_compensation(calib):
    """The drift term from cached frontiers equals the one from full passes (the zoo's equality tests
    run with compensation on, the default; here both settings, and they must differ)."""
    torch.manual_seed(0)
    model = ResidualMLP().eval()
    outputs = {}
    for compensate in (True, False):
        options = multinet.RunOptions(compensate_residuals=compensate)
        ratio = _ratios(model, calib, ["fc1", "fc3"], 0.6)
        runs = [multinet.compress(model, calib, ratio=ratio, mode=m, options=options) for m in ("sequential", "reference")]
        assert [g.removed for g in runs[0].groups] == [g.removed for g in runs[1].groups]
        with torch.no_grad():
            outputs[compensate] = runs[0].model(calib)
            torch.testing.assert_close(outputs[compensate], runs[1].model(calib), atol=1e-4, rtol=1e-4)
    assert (outputs[True] - outputs[False]).abs().max() > 1e-3


def test_only_same_shaped_adds_reached_through_identities_are_streams():
    class Cases(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1)

        def forward(self, x):
            y = x + self.a(x)  # a stream writer
            z = torch.relu(self.b(y)) + y  # an activation in between: not a plain writer
            return z + self.c(z)  # broadcast: c's output is (n, 1)

    graph = multinet.trace(Cases(), (torch.randn(2, 4),))
    nodes = {n.target: n for n in graph.module.graph.nodes if n.op == "call_module"}
    assert stream_operand(graph.module, nodes["a"]).name == "x"
    assert stream_operand(graph.module, nodes["b"]) is None
    assert stream_operand(graph.module, nodes["c"]) is None
