"""Compressing one submodule of a model that does not trace as a whole (a detector's backbone)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import multinet
from multinet.errors import MultinetError


class Backbone(nn.Module):
    """Two stages and a feature pyramid of two levels, returned as a dict (as torchvision's BackboneWithFPN)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(12, 24, 3, 2, 1), nn.BatchNorm2d(24), nn.ReLU())
        self.l1, self.l2 = nn.Conv2d(12, 8, 1), nn.Conv2d(24, 8, 1)
        self.out_channels = 8

    def forward(self, x):
        a = self.c1(x)
        b = self.c2(a)
        top = self.l2(b)
        return {"0": self.l1(a) + F.interpolate(top, size=a.shape[-2:]), "1": top}


class Detector(nn.Module):
    """Preprocessing, the backbone, and a head whose Python depends on the data: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.backbone = Backbone()
        self.head = nn.Conv2d(8, 4, 1)
        self.calls = 0

    def forward(self, images):
        x = torch.stack([F.interpolate(i[None], size=(12, 12))[0] for i in images])  # a list of any sizes
        x = (x - 0.5) / 0.25
        features = self.backbone(x)
        scores = [self.head(f).amax(dim=(2, 3)) for f in features.values()]
        best = torch.stack(scores).amax(0)
        return [s[s > s.median()] for s in best] if int(best.sum() > 0) else best  # data-dependent


def _detector():
    torch.manual_seed(0)
    model = Detector().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model


def test_the_whole_model_does_not_trace_its_backbone_compresses_in_place():
    model, images = _detector(), torch.rand(48, 3, 10, 10)
    with pytest.raises(MultinetError):
        multinet.compress(model, images, ratio=0.3, batch_size=16)
    result = multinet.compress(model, images, ratio=0.3, batch_size=16, submodule="backbone")
    assert result.submodule == "backbone" and "submodule 'backbone'" in repr(result)
    assert result.flops_after < result.flops_before
    assert result.whole_model.backbone is result.model and model.backbone is not result.model
    assert result.model.out_channels == 8  # the rest of a model may read it (torchvision's detectors do)
    assert all(r.channels_after < r.channels_before for r in result.groups)
    # the compressed backbone, given what the detector feeds it, keeps its outputs' channels and stays close
    x = (torch.stack([F.interpolate(i[None], size=(12, 12))[0] for i in images]) - 0.5) / 0.25
    with torch.no_grad():
        before, after = model.backbone(x), result.model(x)
        for key in before:
            assert after[key].shape == before[key].shape
            assert float((after[key] - before[key]).pow(2).sum() / before[key].pow(2).sum()) < 0.05
        whole = result.whole_model(images)
    assert isinstance(whole, (list, torch.Tensor))  # the copy runs its own, untraceable forward
    assert "submodule" in result.as_dict() and "whole_model" not in result.as_dict()


def test_the_recorded_inputs_are_what_the_submodule_receives():
    from multinet.pipeline.submodule import submodule_inputs

    model, images = _detector(), torch.rand(20, 3, 7, 9)
    model.train()
    recorded = submodule_inputs(model, "backbone", images, batch_size=8)
    assert [len(b) for b in recorded] == [8, 8, 4]
    expected = (torch.stack([F.interpolate(i[None], size=(12, 12))[0] for i in images]) - 0.5) / 0.25
    torch.testing.assert_close(torch.cat(recorded), expected)
    assert all(m.training for m in model.modules())  # the model's modes are given back


def test_a_budget_on_a_submodule():
    model, images = _detector(), torch.rand(48, 3, 10, 10)
    result = multinet.compress(model, images, budget=multinet.Budget(flops=0.5), batch_size=16, submodule="backbone")
    assert result.flops_after <= 0.5 * result.flops_before + 1
    assert result.plan is not None


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.block(self.block(x))


class Keywords(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Linear(4, 4)

    def forward(self, x):
        return self.block(input=x)


@pytest.mark.parametrize("model, data, path, message", [
    (Twice(), torch.rand(4, 3, 5, 5), "block", "ran 2 times"),
    (Keywords(), torch.rand(4, 4), "block", "keyword arguments"),
    (Twice(), torch.rand(4, 3, 5, 5), "neck", r"no submodule 'neck' \(its children: block\)"),
])
def test_submodules_that_cannot_be_calibrated_are_refused_with_the_reason(model, data, path, message):
    with pytest.raises(MultinetError, match=message):
        multinet.compress(model, data, ratio=0.3, submodule=path)
