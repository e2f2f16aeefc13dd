"""Timed fusion: a set of sibling layers is fused only where the wider layer is not slower on the batch given.

Which way a real timing goes depends on the machine, so decisions are tested with given ratios (the
autouse fixture in conftest.py makes every other test's ratio neutral); the timing itself is run once
for real, asserting only that it measured and that the fused network still computes the members' outputs.
"""
import copy
import importlib

import pytest
import torch
import torch.nn as nn

import multinet
from multinet import MultiNet
from multinet.unification import fusion_timing, speed
from multinet.unification.fusion import widened_call

MEASURED = fusion_timing.fused_over_apart  # the real ones, saved before any test's fixture replaces them
MEASURED_SPEED = speed.unified_vs_separate


def _member(seed: int, width: int, bn: bool = False) -> nn.Module:
    """A 16-channel input read by a deep 3x3 conv (144 multiply-adds per output: fusion.py fuses it)."""
    torch.manual_seed(seed)
    layers = [nn.Conv2d(16, width, 3, padding=1)] + ([nn.BatchNorm2d(width)] if bn else [])
    return nn.Sequential(*layers, nn.ReLU(), nn.Flatten(), nn.Linear(width * 36, 3))


def _net(widths=(16, 1), bn=False):
    models = {f"m{i}": _member(i, w, bn) for i, w in enumerate(widths)}
    x = torch.randn(8, 16, 6, 6)
    return models, MultiNet(models, x[:1]), x


def _wide_layers(net) -> list[nn.Module]:
    return [m for n, m in net.named_children() if n.startswith("fused_")]


@pytest.mark.parametrize("ratio, fuses", [(0.8, True), (1.0, True), (1.3, False)])
def test_a_set_is_fused_only_where_the_wider_layer_is_not_slower(monkeypatch, ratio, fuses):
    models, net, x = _net()
    seen = []
    monkeypatch.setattr(fusion_timing, "fused_over_apart",
                        lambda modules, inp, *a, **k: seen.append((len(modules), tuple(inp.shape))) or ratio)
    fused = net.fused(timed_on=x)
    assert seen == [(2, tuple(x.shape))]  # timed once, on the tensor the siblings read for this batch
    assert bool(_wide_layers(fused)) == fuses and fused.is_fused
    assert _wide_layers(net.fused())  # untimed: fused, as before
    with torch.no_grad():
        out = fused(x)
        for name, model in models.items():
            torch.testing.assert_close(out[name], model(x), atol=1e-5, rtol=1e-5)


def test_each_set_is_decided_on_its_own(monkeypatch):
    """Two sets of siblings (the members' first layers, and two later layers reading the same tensor):
    the slower one stays apart, the other is fused."""
    class Member(nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.conv = nn.Conv2d(16, 8, 3, padding=1)
            self.left, self.right = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

        def forward(self, x):
            h = torch.relu(self.conv(x))
            return self.left(h).mean((2, 3)) + self.right(h).mean((2, 3)).repeat(1, 2)

    models = {"a": Member(0), "b": Member(1)}
    x = torch.randn(4, 16, 6, 6)
    net = MultiNet(models, x[:1])
    slow = {16: 1.0, 12: 2.0}  # by the set's output channels: the first layers (8 + 8) pay, left + right do not
    monkeypatch.setattr(fusion_timing, "fused_over_apart",
                        lambda modules, inp, *a, **k: slow[sum(m.out_channels for m in modules)])
    fused = net.fused(timed_on=x)
    assert [m.out_channels for m in _wide_layers(fused)] == [16]
    with torch.no_grad():
        out = fused(x)
        for name, model in models.items():
            torch.testing.assert_close(out[name], model(x), atol=1e-5, rtol=1e-5)


def test_a_layer_called_at_two_levels_is_timed_on_each_call_s_own_input(monkeypatch):
    """Heads shared across pyramid levels (RetinaNet/FCOS style): the same two modules read p3 and then
    p4, two sets of siblings. Each set is timed on the tensor its nodes read (it used to be the modules'
    first call's input, p3, for both), and only the set that pays is fused."""
    class Pyramid(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.stem, self.down = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, stride=2, padding=1)
            self.cls, self.box = nn.Conv2d(16, 8, 3, padding=1), nn.Conv2d(16, 4, 3, padding=1)

        def forward(self, x):
            p3 = torch.relu(self.stem(x))
            p4 = torch.relu(self.down(p3))
            return torch.cat([f(p).mean((2, 3)) for p in (p3, p4) for f in (self.cls, self.box)], 1)

    model, x = Pyramid(), torch.randn(4, 16, 6, 6)
    net = MultiNet({"det": model}, x[:1])
    seen = []
    monkeypatch.setattr(fusion_timing, "fused_over_apart",
                        lambda modules, inp, *a, **k: seen.append(tuple(inp.shape)) or (1.0 if inp.shape[-1] == 3 else 2.0))
    fused = net.fused(timed_on=x)
    assert seen == [(4, 16, 6, 6), (4, 16, 3, 3)]
    assert len(_wide_layers(fused)) == 1  # p4's set (timed as paying), not p3's
    with torch.no_grad():
        torch.testing.assert_close(fused(x)["det"], model(x), atol=1e-5, rtol=1e-5)


def test_building_and_timed_fusion_leave_batchnorm_statistics_and_training_modes_alone():
    """Shape propagation and the timing's pass run in eval mode: a member in training mode keeps its
    BatchNorm statistics (they used to move towards the zeros that shapes are propagated with)."""
    models = {f"m{i}": _member(i, w, bn=True).train() for i, w in enumerate((16, 1))}
    before = {name: copy.deepcopy(m.state_dict()) for name, m in models.items()}
    x = torch.randn(8, 16, 6, 6)
    net = MultiNet(models, x[:1]).train()
    fused = net.fused(timed_on=x * 5 + 3)
    for name, model in models.items():
        for key, value in before[name].items():
            assert torch.equal(model.state_dict()[key], value), (name, key)
            assert torch.equal(net.state_dict()[f"{name}.{key}"], value), (name, key)
            if f"{name}.{key}" in fused.state_dict():  # (the convs are fused into one layer)
                assert torch.equal(fused.state_dict()[f"{name}.{key}"], value), (name, key)
    assert any(k.endswith("running_mean") for k in fused.state_dict())
    assert all(m.training for m in net.modules()) and all(m.training for m in fused.modules())


def test_the_timed_wider_call_computes_the_layers_outputs_and_a_real_timing_runs(monkeypatch):
    convs = [nn.Conv2d(16, w, 3, padding=1) for w in (16, 1)]
    x = torch.randn(32, 16, 8, 8)
    with torch.no_grad():
        pieces = widened_call(convs)(x)
        for piece, conv in zip(pieces, convs):
            assert piece.is_contiguous()
            torch.testing.assert_close(piece, conv(x), atol=1e-5, rtol=1e-5)
    ratio = MEASURED(convs, x, rounds=3)
    assert 0 < ratio < float("inf")
    monkeypatch.setattr(fusion_timing, "fused_over_apart", MEASURED)
    models, net, xb = _net()
    fused = net.fused(timed_on=xb)  # whichever way the machine decides, the outputs are the members'
    with torch.no_grad():
        out = fused(xb)
        for name, model in models.items():
            torch.testing.assert_close(out[name], model(xb), atol=1e-5, rtol=1e-5)


def test_infer_times_fusion_on_its_first_batch_and_not_on_another_device(monkeypatch):
    infer_module = importlib.import_module("multinet.runtime.infer")  # (the package's `infer` is the function)

    models, net, x = _net()
    seen = []
    monkeypatch.setattr(fusion_timing, "fused_over_apart",
                        lambda modules, inp, *a, **k: seen.append(inp.shape[0]) or 2.0)
    outs = multinet.infer(net, x, batch_size=5, overlap=False)
    assert seen == [5]  # the first batch
    with torch.no_grad():
        for name, model in models.items():
            torch.testing.assert_close(outs[name], model(x), atol=1e-5, rtol=1e-5)
    seen.clear()
    elsewhere = infer_module._fused(net, timed_on=x, device=torch.device("meta"))
    assert seen == [] and _wide_layers(elsewhere)  # parameters not on the run's device: fused untimed


def test_a_ray_actor_times_fusion_on_its_own_first_batch_not_the_driver(monkeypatch):
    """Batch inference on Ray ships the network as given; each actor (``_Predictor``, built here from the
    bytes without a cluster) chooses its form on its first batch, where it computes."""
    infer_module = importlib.import_module("multinet.runtime.infer")
    from multinet.io import to_bytes

    models, net, x = _net()
    seen = []
    monkeypatch.setattr(fusion_timing, "fused_over_apart",
                        lambda modules, inp, *a, **k: seen.append(inp.shape[0]) or 1.0)
    monkeypatch.setattr(infer_module, "predictor_device", lambda: torch.device("cpu"))
    actor = infer_module._Predictor(to_bytes(net, x[:1]), True, False)
    assert seen == [] and not actor.net.is_fused  # nothing chosen before a batch arrives
    first = actor({"data": x[:3].numpy()})
    actor({"data": x[3:].numpy()})
    assert seen == [3] and actor.net.is_fused and _wide_layers(actor.net)  # timed once, on the first batch
    with torch.no_grad():
        for i, name in enumerate(net(x[:1])):  # the actor returns the outputs flattened, in the net's order
            torch.testing.assert_close(torch.from_numpy(first[f"out{i}"]), models[name](x[:3]), atol=1e-5, rtol=1e-5)


def test_unify_speed_check_times_the_part_fused_for_its_batch(monkeypatch):
    """``unified_vs_separate`` given an unfused MultiNet fuses it for the batch it times on."""
    models, net, x = _net()
    seen = []
    monkeypatch.setattr(fusion_timing, "fused_over_apart", lambda modules, inp, *a, **k: seen.append(1) or 1.0)
    ratio = MEASURED_SPEED(net, list(models.values()), x, rounds=3)
    assert seen == [1] and ratio > 0


def test_auto_form_does_not_time_a_fused_form_that_fused_nothing(monkeypatch):
    """Where timed fusion keeps every set apart the fused form runs the same code as the net as built:
    infer's ``fuse="auto"`` then has nothing to choose between and times no calls."""
    infer_module = importlib.import_module("multinet.runtime.infer")
    models, net, x = _net()
    monkeypatch.setattr(fusion_timing, "fused_over_apart", lambda *a, **k: 2.0)
    reads = []

    def clock():
        reads.append(1)
        return float(len(reads))

    chosen = infer_module.faster_form(net, x, torch.device("cpu"), clock=clock)
    assert chosen is net and reads == []
    monkeypatch.setattr(fusion_timing, "fused_over_apart", lambda *a, **k: 0.5)  # fused: two forms timed
    chosen = infer_module.faster_form(net, x, torch.device("cpu"), clock=clock)
    assert reads and chosen.members == net.members
