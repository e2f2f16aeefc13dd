"""Residual branches removed whole: ``x + f(x)`` collapses into ``x + constant`` (graph/dropping.py)."""
import pytest
import torch

import multinet
from multinet import Budget, data, zoo
from multinet.graph import count, trace
from multinet.graph.dropping import drop_group, droppable, residual_branch
from multinet.schedule import Plan
from multinet.schedule.budget import schedulable_groups
from multinet.schedule.plan import GroupPlan


pytestmark = pytest.mark.usefixtures("quiet_calibration")


@pytest.fixture(scope="module")
def split():
    return data.load("digits")


def _group_of(graph, producer: str):
    return next(g for g in graph.groups if producer in g.producers)


def test_residual_branches_are_the_groups_inside_blocks_and_never_streams(split):
    graph = trace(zoo.create("resnet"), split.train_x[:1])
    branches = {g.producers[0] for g in graph.prunable_groups if residual_branch(graph, g)}
    assert branches == {f"blocks.{i}.conv1.0" for i in range(6)}  # every block's inner group
    assert not droppable(graph, _group_of(graph, "blocks.2.conv1.0"))  # only when asked for
    assert droppable(graph, _group_of(graph, "blocks.2.conv1.0"), branches=True)
    vgg = trace(zoo.create("vgg"), split.train_x[:1])
    assert not any(residual_branch(vgg, g) for g in vgg.prunable_groups)  # no residual additions
    mobilenet = trace(zoo.create("mobilenet"), split.train_x[:1])
    # the blocks with a residual and no squeeze-excite (an SE layer reads the group too); blocks.2 is added
    # to the previous block's projection, which stays whatever happens to the branch
    assert {g.producers[0] for g in mobilenet.prunable_groups if residual_branch(mobilenet, g)} == {
        "blocks.0.expand.0", "blocks.2.expand.0"}


def test_only_a_budget_that_allows_it_may_empty_a_branch(split):
    graph = trace(zoo.create("resnet"), split.train_x[:1])
    branch, stream = _group_of(graph, "blocks.5.conv1.0"), _group_of(graph, "blocks.4.downsample.0")
    plain = schedulable_groups(graph, Budget(flops=0.3))
    allowed = schedulable_groups(graph, Budget(flops=0.3, residual_branches=True))
    assert max(plain[branch.id]) == branch.size - 1 and max(allowed[branch.id]) == branch.size
    assert max(allowed[stream.id]) == stream.size - 1
    with pytest.raises(multinet.BudgetError, match="residual_branches"):
        Budget(flops=0.3, residual_branches="yes")


def test_a_dropped_branch_is_its_readers_bias_added_to_the_stream(split):
    """Independent reference: the original model with the reader's output replaced by the constant."""
    model = zoo.create("resnet").eval()
    graph = trace(model, split.train_x[:1])
    group = _group_of(graph, "blocks.5.conv1.0")
    reader = model.blocks[5].conv2[0]
    bias = torch.randn(reader.out_channels)
    weight = reader.weight[:, :0].detach().clone()
    dropped = drop_group(graph, group.id, {"blocks.5.conv2.0": (weight, bias)})
    layers = {n.target for n in dropped.graph.nodes if n.op == "call_module"}
    assert not {"blocks.5.conv1.0", "blocks.5.conv1.1", "blocks.5.conv2.0", "blocks.5.conv2.1"} & layers
    handle = reader.register_forward_hook(lambda m, i, o: bias.view(1, -1, 1, 1).expand_as(o))
    with torch.no_grad():
        expected = model(split.test_x)
    handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(dropped(split.test_x), expected)
    full, after = count(graph.module), count(dropped)
    block = sum(m.weight.numel() for m in (model.blocks[5].conv1[0], model.blocks[5].conv2[0]))
    assert after.params == full.params - block - 2 * 64 - 2 * 64  # both convs and both BatchNorms gone
    assert after.flops < full.flops


def test_a_plan_that_empties_a_branch_is_applied_with_reconstruction(split):
    model = zoo.create("resnet").eval()
    graph = trace(model, split.train_x[:1])
    group = _group_of(graph, "blocks.5.conv1.0")
    full = float(count(graph.module).flops)
    plan = Plan("manual", {"residual_branches": True}, "flops", full, full, full, 0.0,
                [GroupPlan(group.id, group.producers, group.size, list(range(group.size)), 0.0)], [])
    result = multinet.compress(model, split.train_x[:512], plan=plan, max_positions=16)
    assert result.removed_whole == [group.producers]
    layers = {n.target for n in result.model.graph.nodes if n.op == "call_module"}
    assert "blocks.5.conv1.0" not in layers and "blocks.5.conv2.0" not in layers
    assert result.flops_after == count(result.model).flops < result.flops_before
    with torch.no_grad():
        accuracy = float((result.model(split.test_x).argmax(1) == split.test_y).float().mean())
    assert accuracy > 0.97  # the last block's branch adds little (0.989 before; its mean alone keeps 0.989)


def test_compress_with_skip_links_keeps_the_least_error_of_its_structures(split):
    """The ResNet (no skip link helps it; its blocks' branches may go): the result's final-output error
    on the evaluation samples is the least of the plain compression's and the branch-removing one's."""
    from multinet.schedule.oneshot import output_error, run_outputs

    model, calib = zoo.create("resnet").eval(), split.train_x[:512]
    budget = Budget(flops=0.04)
    kept = multinet.compress(model, calib, budget=budget, skip_links=True, max_positions=16)
    plain = multinet.compress(model, calib, budget=budget, max_positions=16)
    branches = multinet.compress(model, calib, budget=Budget(flops=0.04, residual_branches=True), max_positions=16)
    inputs = [calib[i:i + 128] for i in range(0, 512, 128)]
    reference = run_outputs(model, inputs)
    errors = {name: output_error(run_outputs(r.model, inputs), reference)
              for name, r in [("kept", kept), ("plain", plain), ("branches", branches)]}
    assert errors["kept"] == pytest.approx(min(errors["plain"], errors["branches"]), rel=1e-6)
    assert kept.flops_after <= 0.04 * kept.flops_before


def test_a_transformer_ffn_is_a_residual_branch_and_goes_whole_dropout_included():
    """BERT's FFN (intermediate.dense -> GELU -> output.dense -> dropout -> + stream): dropped, the two
    Linear layers are gone (the dropout, a random op that dead-code elimination keeps, is erased too) and
    the block adds the reader's bias, as the original model does with that reader's output replaced."""
    pytest.importorskip("transformers")
    from multinet.calib import batches
    from test_transformers import _bert, _data, _hidden

    model, inputs = _bert(), _data(16)
    graph = trace(model, batches.model_args(model, batches.take(inputs, 0, 1)))
    ffn = [g for g in graph.prunable_groups if residual_branch(graph, g)]
    assert [g.producers for g in ffn] == [[f"encoder.layer.{i}.intermediate.dense"] for i in range(2)]
    assert not any(residual_branch(graph, g) for g in graph.prunable_groups if g.attention_heads)
    reader = model.get_submodule("encoder.layer.0.output.dense")
    bias = torch.randn(reader.out_features)
    dropped = drop_group(graph, ffn[0].id, {"encoder.layer.0.output.dense": (reader.weight[:, :0].detach(), bias)})
    layers = {n.target for n in dropped.graph.nodes if n.op == "call_module"}
    assert not {"encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense"} & layers
    handle = reader.register_forward_hook(lambda m, i, o: bias.expand_as(o))
    expected = _hidden(model, inputs)
    handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(batches.call(dropped, inputs)["last_hidden_state"], expected)


def test_a_functional_reader_is_no_residual_branch():
    """A functional layer's reader is named by its weight parameter, not a module: no branch, no error."""
    from test_hard_cases import FunctionalLayers

    graph = trace(FunctionalLayers(), torch.randn(2, 3, 4, 4))
    assert not any(residual_branch(graph, g) for g in graph.prunable_groups)


class _TwoBranches(torch.nn.Module):
    """``a(h) + b(h)``: two terms, no stream; once one is a constant the other is added to no stream."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Linear(64, 16)
        self.a1, self.a2 = torch.nn.Linear(16, 12), torch.nn.Linear(12, 16)
        self.b1, self.b2 = torch.nn.Linear(16, 12), torch.nn.Linear(12, 16)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.stem(x.flatten(1)))
        return self.head(self.a2(torch.relu(self.a1(h))) + self.b2(torch.relu(self.b1(h))))


class _DropoutBranch(torch.nn.Module):
    """``h + fc2(dropout(relu(fc1(h))))``: a dropout between the branch's producer and its reader."""

    def __init__(self):
        super().__init__()
        self.stem, self.fc1, self.fc2 = torch.nn.Linear(64, 16), torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.stem(x.flatten(1)))
        branch = torch.nn.functional.dropout(torch.relu(self.fc1(h)), 0.1, self.training)
        return self.head(h + self.fc2(branch))


def test_two_terms_of_one_sum_are_no_residual_branches(split):
    graph = trace(_TwoBranches().eval(), split.train_x[:1])
    assert not any(residual_branch(graph, g) for g in graph.prunable_groups)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_dropout_inside_a_dropped_branch_does_not_keep_its_layers_alive(split, capture):
    """Captured by torch.export the dropout is ``aten.dropout``, a random op dead-code elimination keeps
    (and with it fc1) once fc2 no longer reads it."""
    model = _DropoutBranch().eval()
    graph = trace(model, split.train_x[:1], capture=capture)
    group = _group_of(graph, "fc1")
    assert residual_branch(graph, group)
    bias = torch.randn(16)
    dropped = drop_group(graph, group.id, {"fc2": (model.fc2.weight[:, :0].detach(), bias)})
    assert {n.target for n in dropped.graph.nodes if n.op == "call_module"} == {"stem", "head"}
    with torch.no_grad():
        h = torch.relu(model.stem(split.test_x.flatten(1)))
        torch.testing.assert_close(dropped(split.test_x), model.head(h + bias))
