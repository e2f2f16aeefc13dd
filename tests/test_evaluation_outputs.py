"""The masked evaluator's reference outputs come from the scheduler's statistics pass, not a pass of
their own: the same outputs to the bit, and a pass of their own wherever the statistics pass did not see
exactly the evaluation batches (a loader that shuffles, a sharded executor)."""
import pytest
import torch

from multinet import Budget, data, trace, zoo
from multinet.schedule import oneshot
from multinet.schedule.oneshot import EvaluationOutputs, evaluation_inputs, run_outputs
from multinet.schedule.scheduler import prepare

pytestmark = pytest.mark.usefixtures("quiet_calibration")


@pytest.fixture(scope="module")
def digits():
    return data.load("digits").train_x[:200]


def _counted_reference_passes(monkeypatch):
    """How many times the masked evaluator computes its reference itself."""
    calls = []
    real = oneshot.run_outputs

    def counting(model, inputs):
        calls.append(len(inputs))
        return real(model, inputs)

    monkeypatch.setattr(oneshot, "run_outputs", counting)
    return calls


@pytest.mark.parametrize("name, eval_samples", [("resnet", 1024), ("mobilenet", 150), ("mlp", 64)],
                         ids=["every sample", "the last batch cut", "whole batches"])
def test_the_reference_is_the_statistics_pass_s_outputs_to_the_bit(digits, monkeypatch, name, eval_samples):
    calls = _counted_reference_passes(monkeypatch)
    graph = trace(zoo.create(name), digits[:1])
    ctx = prepare(graph, digits, Budget(flops=0.5), batch_size=64, max_positions=16, eval_samples=eval_samples)
    assert calls == []  # no pass of its own
    expected = run_outputs(graph.module, evaluation_inputs(digits, 64, eval_samples))
    assert len(ctx.masked.reference) == len(expected)
    for got, want in zip(ctx.masked.reference, expected):
        assert torch.equal(got, want)
    assert ctx.masked.error({}) == 0.0


class Shuffled:
    """A loader that gives the samples in a new order each time it is read, as a shuffling DataLoader does."""

    def __init__(self, x):
        self.x, self.reads = x, 0

    def __iter__(self):
        self.reads += 1
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.reads))
        return iter(self.x[order].split(64))


def test_a_loader_that_shuffles_gets_a_reference_pass_of_its_own(digits, monkeypatch):
    calls = _counted_reference_passes(monkeypatch)
    graph = trace(zoo.create("mlp"), digits[:1])
    loader = Shuffled(digits)
    ctx = prepare(graph, loader, Budget(flops=0.5), batch_size=64, max_positions=16, eval_samples=128)
    assert calls == [2]  # the statistics pass read other samples than the evaluation inputs
    expected = run_outputs(graph.module, ctx.masked.inputs)
    for got, want in zip(ctx.masked.reference, expected):
        assert torch.equal(got, want)


def test_outputs_are_none_unless_every_evaluation_batch_was_seen(digits):
    model = zoo.create("mlp").eval()
    inputs = evaluation_inputs(digits, 64, 128)
    seen = EvaluationOutputs(model, inputs)
    assert seen.reference() is None  # a pass that ran elsewhere (sharded) calls nothing here
    with torch.no_grad():
        seen(inputs[0], model(inputs[0]))
    assert seen.reference() is None  # half of them
    seen(inputs[1], model(inputs[1]))
    assert [r.shape for r in seen.reference()] == [(128, 10)]
    other = EvaluationOutputs(model, inputs)
    with torch.no_grad():
        other(inputs[1], model(inputs[1]))  # another batch where the first was expected
        other(inputs[0], model(inputs[0]))
    assert other.reference() is None
