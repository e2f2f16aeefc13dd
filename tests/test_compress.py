import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import multinet
from multinet import data, zoo
from multinet.errors import MultinetError


class Redundant(nn.Module):
    """Half of each hidden layer's channels are affine copies of the other half."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc1 = nn.Linear(6 * 4 * 4, 10)
        self.fc2 = nn.Linear(10, 3)
        with torch.no_grad():  # conv1 channels 4..7 = 2 x channels 0..3, so after ReLU too
            self.conv1.weight[4:] = 2 * self.conv1.weight[:4]
            self.conv1.bias[4:] = 2 * self.conv1.bias[:4]
            self.fc1.weight[5:] = 0.5 * self.fc1.weight[:5]
            self.fc1.bias[5:] = 0.5 * self.fc1.bias[:5]

    def forward(self, x):
        y = F.relu(self.conv1(x))
        y = F.max_pool2d(F.relu(self.conv2(y)), 2)
        return self.fc2(F.relu(self.fc1(y.flatten(1))))


def test_reap_and_unify_remove_redundant_channels_without_changing_outputs():
    torch.manual_seed(0)
    model = Redundant().eval()
    x = torch.randn(256, 1, 8, 8)
    graph = multinet.trace(model, x[:2])
    ratio = {graph.group_of_layer("conv1").id: 0.5, graph.group_of_layer("fc1").id: 0.5}
    # damping well above float32 rounding of the activations (~1e-7 relative), which exactly singular
    # statistics would otherwise amplify, and far below anything that would blur the reconstruction
    result = multinet.compress(model, x, ratio=ratio, damp=1e-7)
    assert result.model.conv1.out_channels == 4 and result.model.fc1.out_features == 5
    test = torch.randn(64, 1, 8, 8)
    torch.testing.assert_close(result.model(test), model(test), atol=1e-3, rtol=1e-3)
    assert all(g.error < 1e-6 for g in result.groups)
    # Neuro Unification folds each copy into its original (one-to-one affine fits): as exact here
    unified = multinet.compress(model, x, ratio=ratio, method="unify")
    assert unified.model.conv1.out_channels == 4 and unified.model.fc1.out_features == 5
    torch.testing.assert_close(unified.model(test), model(test), atol=1e-4, rtol=1e-4)
    # magnitude keeps the big copies but cannot fold the removed ones back in
    magnitude = multinet.compress(model, x, ratio=ratio, method="magnitude")
    assert (magnitude.model(test) - model(test)).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["mlp", "vgg", "densenet"])
def test_reap_beats_magnitude_on_the_zoo(name):
    split = data.load("digits")
    model = zoo.create(name)
    base = data.accuracy(model, split.test_x, split.test_y)
    acc = {}
    for method in ("reap", "magnitude", "magnitude+ls"):
        result = multinet.compress(model, split.train_x[:512], ratio=0.5, method=method, max_positions=32)
        acc[method] = data.accuracy(result.model, split.test_x, split.test_y)
        assert result.flops_after < 0.5 * result.flops_before
    assert acc["reap"] >= base - 0.02
    assert acc["reap"] >= acc["magnitude"] and acc["reap"] >= acc["magnitude+ls"] - 0.01


def test_report_and_per_group_ratios():
    split = data.load("digits")
    model = zoo.create("resnet")
    graph = multinet.trace(model, split.train_x[:2])
    stream = graph.group_of_layer("stem.0")
    result = multinet.compress(model, split.train_x[:256], ratio={stream.id: 0.25}, max_positions=16)
    (report,) = result.groups
    assert report.group == stream.id and report.channels_before == 16 and report.channels_after == 12
    assert len(report.removed) == 4 and report.seconds > 0 and report.error >= 0
    assert result.model(split.test_x[:4]).shape == (4, 10)
    assert result.as_dict()["groups"][0]["channels_after"] == 12


@pytest.mark.parametrize("kwargs, message", [
    (dict(ratio=1.0), r"must lie in \[0, 1\)"),
    (dict(ratio=-0.1), r"must lie in \[0, 1\)"),
    (dict(method="l2"), "unknown method"),
    (dict(ratio={99: 0.5}), "no channel group 99"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(MultinetError, match=message):
        multinet.compress(zoo.create("mlp"), data.load("digits").train_x[:64], **kwargs)


def test_bad_calibration_data():
    model = zoo.create("mlp")
    with pytest.raises(MultinetError, match="no calibration data"):
        multinet.compress(model, torch.zeros(0, 1, 8, 8))
    with pytest.raises(MultinetError, match="re-iterable"):
        multinet.compress(model, iter([torch.zeros(4, 1, 8, 8)]))
    with pytest.raises(multinet.InputShapeError):
        multinet.compress(model, torch.zeros(8, 1, 9, 9))


def test_unprunable_group_ratio_refused():
    model = zoo.create("mlp")
    with pytest.raises(MultinetError, match="not prunable"):
        multinet.compress(model, data.load("digits").train_x[:64], ratio={2: 0.5})
