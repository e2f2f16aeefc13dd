"""The links' average pools in the fused network: rewritten as sums of strided halves, same values."""
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from multinet import MultiNet, data, zoo
from multinet.graph.tracing import propagate_shapes
from multinet.io import from_bytes, to_bytes
from multinet.unification.bridges import add_bridges, live_links
from multinet.unification.pooling import halve_pools
from multinet.unification.similarity import Candidate


class Pools(nn.Module):
    """One pool of every kind the pass must tell apart."""

    def __init__(self):
        super().__init__()
        self.own = nn.AvgPool2d(2)  # a member's own pooling module: left alone

    def forward(self, x, s, v):
        return (F.avg_pool2d(x, (2, 2)),  # rewritten
                F.avg_pool2d(x, 4),  # rewritten (two halvings per dim)
                F.avg_pool2d(x, (2, 1)),  # rewritten (one dim)
                F.avg_pool2d(x, 2, stride=1),  # overlapping windows: left alone
                F.avg_pool2d(x, 2, padding=1),  # padded: left alone
                F.avg_pool2d(s, 2),  # a 6 x 6 input: rewritten
                F.avg_pool2d(s, 3),  # a window of 3: not a power of two, left alone
                F.avg_pool2d(s, 4),  # 6 is not a multiple of 4 (the pool drops a row): left alone
                F.avg_pool1d(v, 2),  # 1-D: rewritten
                F.avg_pool3d(x.unsqueeze(2).expand(-1, -1, 4, -1, -1), 2),  # 3-D: rewritten
                self.own(x))


def test_eligible_pools_become_strided_sums_with_the_same_values():
    gm = fx.symbolic_trace(Pools())
    args = (torch.randn(3, 5, 8, 8), torch.randn(3, 5, 6, 6), torch.randn(3, 5, 8))
    propagate_shapes(gm, args)
    expected = gm(*args)
    assert halve_pools(gm, torch.device("cuda")) == 0  # a GPU runs one pool kernel faster
    assert halve_pools(gm, torch.device("cpu")) == 6
    gm.recompile()
    pools = [n.target for n in gm.graph.nodes if n.op == "call_function" and "pool" in getattr(n.target, "__name__", "")]
    assert len(pools) == 4  # stride 1, padding 1, window 3, window 4 on 6
    assert any(n.op == "call_module" and n.target == "own" for n in gm.graph.nodes)
    for got, want in zip(gm(*args), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def linked():
    """Two digit VGGs, the second one's third conv reading the first one's 8 x 8 features pooled to 4 x 4."""
    split = data.load("digits")
    torch.manual_seed(1)
    net = MultiNet({"a": zoo.create("vgg"), "b": zoo.create("vgg")}, split.train_x[:1])
    link = Candidate("b", "b.features.3.0", "a", "a.features.1.0", (2, 2), 0.9)
    bridged, bridges = add_bridges(net, split.train_x[:1], [link])
    return MultiNet.from_graph(bridged, net.members, live_links(bridges, bridged)), split.test_x[:64]


def test_a_fused_multinet_with_a_pooled_link_equals_the_unfused_one_and_round_trips(linked):
    net, x = linked
    assert any(n.target is F.avg_pool2d for n in net.graph_module.graph.nodes)
    fused = net.fused()
    assert not any(n.target is F.avg_pool2d for n in fused.graph_module.graph.nodes)
    with torch.no_grad():
        ref, fast, batched = net(x), fused(x), net.fused(batched=True)(x)
        loaded = from_bytes(to_bytes(fused))
        again = loaded(x)
    for name in ref:
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batched[name], ref[name], rtol=1e-5, atol=1e-5)
        assert torch.equal(again[name], fast[name])


def test_export_keeps_the_links_pools_for_the_runtimes_own_kernels(linked):
    from multinet.io.export import _deployable

    net, _ = linked
    assert any(n.target is F.avg_pool2d for n in net.fused(export=True).graph_module.graph.nodes)
    assert any(n.target is F.avg_pool2d for n in _deployable(net).graph.nodes)
