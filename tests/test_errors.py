"""Bad input gives one clear error each."""
import pytest
import torch
import torch.nn as nn

import multinet
from multinet import InputShapeError, PruneError, TraceError


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:  # data-dependent control flow: fx cannot trace this
            h = -h
        return self.b(h)


def test_untraceable_model_names_the_failing_line():
    with pytest.raises(TraceError) as info:
        multinet.trace(DataDependent(), torch.randn(2, 4))
    message = str(info.value)
    assert "test_errors.py" in message and "if h.sum() > 0" in message and "leaf_modules" in message


class Flip(nn.Module):
    def forward(self, h):
        return -h if h.sum() > 0 else h


class WithLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.flip, self.b = nn.Linear(4, 6), Flip(), nn.Linear(6, 2)

    def forward(self, x):
        return self.b(self.flip(self.a(x)))


def test_leaf_module_escape_hatch_traces_and_fails_closed():
    with pytest.raises(TraceError):
        multinet.trace(WithLeaf(), torch.randn(2, 4))
    graph = multinet.trace(WithLeaf(), torch.randn(2, 4), leaf_modules=[Flip])
    group = graph.group_of_layer("a")
    assert not group.prunable and "Flip" in group.reasons[0]
    graph = multinet.trace(WithLeaf(), torch.randn(2, 4), leaf_modules=["flip"])
    assert not graph.group_of_layer("a").prunable


def clamp_if_positive(h):
    return h.clamp(min=0) if bool(h.sum() > 0) else h


class UsesFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return clamp_if_positive(self.a(x))


def test_autowrap_function_escape_hatch():
    with pytest.raises(TraceError):
        multinet.trace(UsesFunction(), torch.randn(2, 4))
    graph = multinet.trace(UsesFunction(), torch.randn(2, 4), autowrap_functions=[clamp_if_positive])
    assert any(n.target is clamp_if_positive for n in graph.module.graph.nodes)
    assert not graph.group_of_layer("a").prunable  # unknown function: fail closed


def scale_if_positive(h):
    return h * 2 if bool(h.sum() > 0) else h


class Declared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.b(scale_if_positive(self.a(x)))


def test_registered_elementwise_function_passes_channels():
    multinet.register_elementwise(scale_if_positive)
    graph = multinet.trace(Declared(), torch.randn(2, 4), autowrap_functions=[scale_if_positive])
    group = graph.group_of_layer("a")
    assert group.prunable and group.consumer_names == ["b"]


def test_wrong_input_shape():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(InputShapeError, match=r"\(2, 1, 8, 8\).*node `_0` = 0 \(Conv2d\): .*3 channels"):
        multinet.trace(model, torch.randn(2, 1, 8, 8))
    with pytest.raises(InputShapeError, match="takes 1 input"):
        multinet.trace(model, (torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)))


def test_not_a_module():
    with pytest.raises(TraceError, match="nn.Module"):
        multinet.trace(lambda x: x, torch.randn(2))


@pytest.fixture
def graph():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    return multinet.trace(model, torch.randn(1, 3, 4, 4))


def test_group_pruned_to_zero_channels(graph):
    with pytest.raises(PruneError, match="zero channels"):
        multinet.prune(graph, {0: []})


def test_indices_out_of_range_and_duplicates(graph):
    with pytest.raises(PruneError, match="0..7"):
        multinet.prune(graph, {0: [0, 8]})
    with pytest.raises(PruneError, match="0..7"):
        multinet.prune(graph, {0: [-1, 2]})
    with pytest.raises(PruneError, match="duplicate"):
        multinet.prune(graph, {0: [1, 1, 2]})


def test_unknown_or_unprunable_group(graph):
    with pytest.raises(PruneError, match="no channel group 7"):
        multinet.prune(graph, {7: [0]})
    with pytest.raises(PruneError, match="not prunable: reaches the model output"):
        multinet.prune(graph, {1: [0, 1]})
    assert multinet.prune(graph, {1: [0, 1, 2, 3]})(torch.randn(1, 3, 4, 4)).shape == (1, 4, 4, 4)


def test_prune_module_without_example_inputs():
    with pytest.raises(PruneError, match="example_inputs"):
        multinet.prune(nn.Linear(2, 2), {0: [0]})


def test_split_piece_emptied():
    class Halves(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(1, 4, 1), nn.Conv2d(2, 1, 1), nn.Conv2d(2, 1, 1)

        def forward(self, x):
            left, right = self.a(x).chunk(2, 1)
            return self.b(left) + self.c(right)

    graph = multinet.trace(Halves(), torch.randn(1, 1, 2, 2))
    with pytest.raises(PruneError, match="empties a piece of the split"):
        multinet.prune(graph, {0: [0, 1]})


def test_consumer_weights_are_checked(graph):
    with pytest.raises(PruneError, match=r"shape \(4, 8, 1, 1\).*\(4, 5, 1, 1\)"):
        multinet.prune(graph, {0: [0, 1, 2, 3, 4]}, consumer_weights={"2": torch.zeros(4, 8, 1, 1)})
    with pytest.raises(PruneError, match="not a consumer"):
        multinet.prune(graph, {0: [0, 1, 2, 3, 4]}, consumer_weights={"nope": torch.zeros(1)})
    w = torch.randn(4, 5, 1, 1)
    pruned = multinet.prune(graph, {0: [0, 1, 2, 3, 4]}, consumer_weights={"2": (w, torch.zeros(4))})
    assert torch.equal(pruned.get_submodule("2").weight, w)
    assert torch.equal(pruned.get_submodule("2").bias, torch.zeros(4))


def test_impossible_budget_is_refused_before_any_calibration(monkeypatch):
    """The floor is decided from the traced graph's cost model, so no statistics are gathered first."""
    import multinet.schedule.scheduler as scheduler
    from multinet import Budget, BudgetError, zoo

    calls = []
    monkeypatch.setattr(scheduler, "one_shot_stats", lambda *a, **k: calls.append(1))
    x = zoo.example_input("digits", batch=4)
    with pytest.raises(BudgetError, match=r"flops budget .* is below .*what the layers that cannot be pruned"):
        multinet.compress(zoo.create("resnet"), x, budget=Budget(flops=0.1, ignore=("stem*", "blocks.0*")))
    with pytest.raises(BudgetError, match="params budget"):
        multinet.compress(zoo.create("mlp"), x, budget=Budget(params=0.001))
    with pytest.raises(BudgetError, match="unknown schedule"):
        multinet.compress(zoo.create("mlp"), x, budget=Budget(flops=0.5), schedule="fastest")
    assert calls == []


def test_multinet_errors_have_one_base_class():
    """One class to catch: every user error multinet raises derives from MultinetError."""
    from multinet.io import ModelFileError
    from multinet.runtime.devices import DeviceError
    from multinet.scenario.schema import ScenarioError

    assert not hasattr(multinet, "MultiNetError")
    for error in (multinet.BudgetError, ModelFileError, DeviceError, ScenarioError, TraceError, PruneError):
        assert issubclass(error, multinet.MultinetError)
    with pytest.raises(multinet.MultinetError, match="duplicate model names"):
        multinet.MultiNet([("a", nn.Linear(2, 2)), ("a", nn.Linear(2, 2))], torch.zeros(1, 2))
