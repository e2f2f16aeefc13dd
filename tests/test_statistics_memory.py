"""Groups whose least-squares statistics cannot fit in memory stay whole, with a warning, before any work."""
import pytest
import torch
import torch.nn as nn

import multinet
from multinet.pipeline import statistics_memory
from multinet.pipeline.statistics_memory import group_bytes, peak_bytes


class WideReader(nn.Module):
    """stem (group A, 4 channels) -> a 3x3 conv reading A (36 columns) -> wide (group B, 32 channels) read by a
    3x3 conv (288 columns) and a 1x1 conv (32 columns)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.wide = nn.Conv2d(4, 32, 3, padding=1)
        self.a, self.b = nn.Conv2d(32, 6, 3, padding=1), nn.Conv2d(32, 6, 1)

    def forward(self, x):
        y = torch.relu(self.wide(torch.relu(self.stem(x))))
        return self.a(y) + self.b(y)


def _setup():
    torch.manual_seed(0)
    model, x = WideReader().eval(), torch.randn(32, 3, 6, 6)
    graph = multinet.trace(model, x[:1])
    return model, x, graph, graph.group_of_layer("stem").id, graph.group_of_layer("wide").id


def test_the_estimate_counts_every_consumer_gram():
    _, _, graph, narrow, wide = _setup()
    assert group_bytes(graph, narrow) == 8 * (36 + 1) ** 2
    assert group_bytes(graph, wide) == 8 * ((288 + 1) ** 2 + (32 + 1) ** 2)
    assert peak_bytes([10, 40], together=False) == 40 * 5.5
    assert peak_bytes([10, 40], together=True) == 40 * 5.5 + 10 * 2


@pytest.mark.parametrize("run", [dict(ratio=0.5), dict(ratio=0.5, mode="oneshot"),
                                 dict(budget=multinet.Budget(flops=0.8))])
def test_a_group_that_cannot_fit_stays_whole_and_the_others_compress(run, monkeypatch):
    model, x, graph, narrow, wide = _setup()
    limit = peak_bytes([group_bytes(graph, narrow)], True) + 1000  # the narrow group fits, the wide one does not
    monkeypatch.setattr(statistics_memory, "available_memory", lambda: 2 * limit)  # half goes to the frontier
    with pytest.warns(UserWarning, match=r"1 group\(s\) stay whole.*`a` reads 288 columns"):
        result = multinet.compress(model, x, batch_size=16, max_positions=None, **run)
    changed = {r.group for r in result.groups if r.channels_after < r.channels_before}
    assert wide not in changed and narrow in changed


def test_together_the_largest_go_first(monkeypatch):
    from multinet.pipeline.statistics_memory import fitting

    _, _, graph, narrow, wide = _setup()
    both = peak_bytes([group_bytes(graph, narrow), group_bytes(graph, wide)], True)
    assert fitting(graph, [narrow, wide], both, together=True) == {narrow, wide}
    with pytest.warns(UserWarning, match="together"):
        assert fitting(graph, [narrow, wide], both - 1, together=True) == {narrow}
    assert fitting(graph, [narrow, wide], both - 1, together=False) == {narrow, wide}  # one at a time: each fits
    assert fitting(graph, [narrow, wide], None, together=True) == {narrow, wide}  # memory unknown: no check


def test_the_limit_leaves_the_frontier_its_share(monkeypatch):
    from multinet.pipeline.statistics_memory import statistics_limit

    monkeypatch.setattr(statistics_memory, "available_memory", lambda: 1000)
    assert statistics_limit("auto") == 500  # an "auto" frontier may keep half of what is available
    assert statistics_limit(300) == 700 and statistics_limit(5000) == 0
    assert statistics_limit(None) == 1000  # an unlimited frontier spills nothing: no share is set aside
    monkeypatch.setattr(statistics_memory, "available_memory", lambda: None)
    assert statistics_limit("auto") is None  # unknown: nothing is checked


def test_the_cli_says_which_group_stayed_whole_and_why(monkeypatch, capsys):
    from multinet import zoo
    from multinet.cli import main

    graph = multinet.trace(zoo.create("mlp"), zoo.example_input())
    sizes = sorted(group_bytes(graph, g.id) for g in graph.prunable_groups)
    limit = peak_bytes([sizes[0]], False) + 1000  # the smallest group fits, the largest does not
    monkeypatch.setattr(statistics_memory, "available_memory", lambda: 2 * limit)
    assert main(["compress", "zoo:mlp", "--ratio", "0.3", "--calibration", "64", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "note: " in err and "stay whole" in err and "GB" in err
