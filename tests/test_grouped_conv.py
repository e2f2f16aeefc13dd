"""Grouped convolutions (ResNeXt, RegNet): the same number of channels from every conv group."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import multinet
from group_checks import check_model, randomize_norm_stats


def _conv_bn(cin, cout, k=1, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class ResNeXtBottleneck(nn.Module):
    """torchvision's Bottleneck with groups=4, width 16, and a downsample."""

    def __init__(self, cin=8, width=16, cout=12, groups=4):
        super().__init__()
        self.conv1, self.conv2 = _conv_bn(cin, width), _conv_bn(width, width, 3, 2, groups)
        self.conv3, self.downsample = _conv_bn(width, cout), _conv_bn(cin, cout, 1, 2)
        self.stem, self.fc = nn.Conv2d(3, cin, 3, padding=1), nn.Linear(cout, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = F.relu(self.conv2(F.relu(self.conv1(x))))
        y = F.relu(self.conv3(y) + self.downsample(x))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


class RegNetYBlock(nn.Module):
    """RegNetY: 1x1, grouped 3x3 (group width 4), squeeze-and-excitation, 1x1, residual."""

    def __init__(self, c=8, width=16, group_width=4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.a, self.b = _conv_bn(c, width), _conv_bn(width, width, 3, 1, width // group_width)
        self.se_reduce, self.se_expand = nn.Conv2d(width, 4, 1), nn.Conv2d(4, width, 1)
        self.c = _conv_bn(width, c)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = F.relu(self.b(F.relu(self.a(x))))
        s = torch.sigmoid(self.se_expand(F.relu(self.se_reduce(F.adaptive_avg_pool2d(y, 1)))))
        y = F.relu(x + self.c(y * s))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def test_resnext_bottleneck_groups_prunable():
    torch.manual_seed(0)
    graph = check_model(randomize_norm_stats(ResNeXtBottleneck()), torch.randn(2, 3, 8, 8), max_channels=2)
    into, out_of = graph.group_of_layer("conv1.0"), graph.group_of_layer("conv2.0")
    assert into.prunable and out_of.prunable and len(into.balanced[0]) == 4
    (slot,) = into.consumers
    assert slot.consumer == "conv2.0" and slot.conv_groups == 4
    assert [g.prunable for g in graph.groups].count(False) == 1  # only the logits
    pruned = multinet.prune(graph, {into.id: [0, 5, 8, 13], out_of.id: list(range(0, 16, 2))})
    conv2 = pruned.get_submodule("conv2.0")
    assert (conv2.groups, conv2.in_channels, conv2.out_channels) == (4, 4, 8)
    assert conv2.weight.shape == (8, 1, 3, 3)


def test_regnety_block_with_squeeze_excitation():
    torch.manual_seed(0)
    graph = check_model(randomize_norm_stats(RegNetYBlock()), torch.randn(2, 3, 6, 6), max_channels=2)
    gated = graph.group_of_layer("b.0")
    assert gated.prunable and "se_expand" in gated.producers and {"se_reduce", "c.0"} <= set(gated.consumer_names)
    assert graph.group_of_layer("a.0").prunable


def test_unbalanced_keep_is_refused_with_the_reason():
    graph = multinet.trace(ResNeXtBottleneck(), torch.randn(2, 3, 8, 8))
    g = graph.group_of_layer("conv2.0")
    assert not g.is_balanced([0, 1, 2, 3]) and g.is_balanced([0, 4, 8, 12])
    with pytest.raises(multinet.PruneError, match="keep the same number of channels in each"):
        multinet.prune(graph, {g.id: [0, 1, 2, 3]})


def test_compress_reconstructs_grouped_conv_groups_with_equal_counts_per_conv_group():
    torch.manual_seed(0)
    model = ResNeXtBottleneck().eval()
    x = torch.randn(64, 3, 8, 8)
    graph = multinet.trace(model, x[:1])
    grouped = [g for g in graph.prunable_groups if g.grouped_conv]
    assert grouped and any(not g.grouped_conv for g in graph.prunable_groups)
    result = multinet.compress(model, x, ratio=0.5, max_positions=16)
    reports = {r.group: r for r in result.groups}
    for g in grouped:
        assert reports[g.id].channels_after == g.size // 2
        assert g.is_balanced(sorted(set(range(g.size)) - set(reports[g.id].removed)))
    assert result.model.get_submodule("conv2.0").groups == 4
    with pytest.warns(UserWarning, match="grouped convolutions"):  # unify cannot pair across conv groups yet
        multinet.compress(model, x, ratio=0.5, method="unify", max_positions=16)
    with pytest.raises(multinet.MultinetError, match="grouped convolution"):
        multinet.compress(model, x, ratio={grouped[0].id: 0.5}, method="unify")
    budgeted = multinet.compress(model, x, budget=multinet.Budget(flops=0.8), max_positions=16)
    assert budgeted.model.get_submodule("conv2.0").groups == 4
