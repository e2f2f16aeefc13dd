"""Skip links: a member's layer reads an earlier tensor of its own, so the layers in between can go whole."""
import importlib

import pytest
import torch

import multinet
from multinet import MultiNet, data, zoo
from multinet.graph import count, trace
from multinet.graph.dropping import bridged_layers
from multinet.unification import score_candidates
from multinet.unification.similarity import ancestors, linkable_layers, skip_conflicts


pytestmark = pytest.mark.usefixtures("quiet_calibration")


@pytest.fixture(scope="module")
def split():
    return data.load("digits")


def _accuracy(out, labels) -> float:
    return float((out.argmax(1) == labels).float().mean())


def test_a_skip_link_collapses_a_hidden_layer_where_narrowing_it_loses(split):
    """At 4 % of its FLOPs the digit MLP narrowed layer by layer keeps 0.91 of its accuracy; reading its
    first hidden layer directly, its head lets the second hidden layer go entirely, and it keeps more."""
    mlp = zoo.create("mlp")
    calib = split.train_x[:1024]
    unified = multinet.unify({"a": mlp}, calib, budget=0.04)
    assert unified.chosen == {"a": "unified"}
    assert unified.errors["a"]["unified"] < unified.errors["a"]["separate"]
    layers = {name for name, _ in unified.model.named_modules()}
    assert "a.hidden.2" not in layers and "a.head" in layers  # the second hidden layer is gone whole
    assert any(b.model == "a" and b.sources[0][0] == "a" for b in unified.bridges)
    assert unified.costs_after["total"]["flops"] <= 0.04 * unified.costs_before["total"]["flops"]
    with torch.no_grad():
        unified_acc = _accuracy(unified.model(split.test_x)["a"], split.test_y)
        separate_acc = _accuracy(unified.separate["a"].model(split.test_x), split.test_y)
    assert unified_acc > separate_acc + 0.01


def test_without_skip_links_a_lone_model_is_its_separate_compression(split):
    mlp = zoo.create("mlp")
    calib = split.train_x[:512]
    unified = multinet.unify({"a": mlp}, calib, budget=0.04, skip_links=False)
    assert unified.chosen == {"a": "separate"} and not unified.candidates
    with torch.no_grad():
        torch.testing.assert_close(unified.model(split.test_x)["a"], unified.separate["a"].model(split.test_x))


def test_skip_link_sources_are_earlier_tensors_of_groups_the_layer_neither_reads_nor_writes(split):
    """In a ResNet a block's input and output are one channel group (the residual stream): reading the
    earlier one cannot remove anything, and a block's last conv reading an earlier stream tensor would
    read its own output channels (surgery cannot cut a layer's input and output by one group), so
    neither is a candidate; later tensors never are either. The ResNet at 40 % with skip links used to
    fail in surgery for the second reason."""
    net = MultiNet({"r": zoo.create("resnet"), "v": zoo.create("vgg")}, split.train_x[:1])
    graph = trace(net.graph_module, split.train_x[:1])
    targets = {m: list(linkable_layers(graph, net.graph_module, m)[0]) for m in net.members}
    conflicts = skip_conflicts(graph)
    candidates = score_candidates(net.graph_module, targets, split.train_x[:128], conflicts=conflicts)
    skips = [c for c in candidates if c.model == c.source]
    assert {c.model for c in skips} == {"r", "v"}
    calls = {n.target: n for n in net.graph_module.graph.nodes if n.op == "call_module"}
    reads = {name: {g.id for g in graph.groups if name in g.consumer_names} for name in calls}
    writes = {name: {g.id for g in graph.groups if name in g.producers} for name in calls}
    for c in skips:
        assert calls[c.source_layer].args[0] in ancestors(calls[c.layer].args[0])
        assert not reads[c.source_layer] & (reads[c.layer] | writes[c.layer])
    without = score_candidates(net.graph_module, targets, split.train_x[:128])
    assert all(c.model != c.source for c in without)
    assert len(candidates) == len(without) + len(skips)
    unified = multinet.unify({"r": zoo.create("resnet")}, split.train_x[:512], budget=0.4, max_positions=16)
    assert unified.costs_after["total"]["flops"] <= 0.4 * unified.costs_before["total"]["flops"]


@pytest.fixture(scope="module")
def digit_pair(split):
    """The zoo's digit MLP and one trained with seed 1 (as in benchmarks/unify.py's mlp-seeds set)."""
    from multinet.zoo.models import MODELS
    from multinet.zoo.train import fit

    torch.manual_seed(1)
    other = fit(MODELS["mlp"](in_channels=1, image_size=8, num_classes=10), split.train_x, split.train_y, 40, 1)
    return {"a": zoo.create("mlp"), "b": other.eval()}


def test_a_link_to_a_tensor_whose_layer_a_skip_link_removed_is_still_listed(split, digit_pair):
    """The two digit MLPs at 2 %: one hidden layer computed once, both heads reading it. The layer whose
    input the links name is gone (collapsed), the tensor is not: the links stay in ``net.links``, and
    survive a further compression of the MultiNet."""
    unified = multinet.unify(digit_pair, split.train_x[:1024], budget=0.02)
    net = unified.model
    layers = {n.target for n in net.graph_module.graph.nodes if n.op == "call_module"}
    assert not {"a.hidden.2", "b.hidden.2"} & layers  # both second hidden layers are gone
    assert any(lk.model != lk.source for lk in net.links)  # one head reads the other model's hidden layer
    assert all(lk.layer in layers and lk.source_layer not in layers for lk in net.links)
    again = multinet.unification.compress_multinet(net, split.train_x[:256], ratio=0.2)
    assert again.model.links == net.links


def test_skip_links_do_not_depend_on_the_order_of_the_models(split, digit_pair):
    calib = split.train_x[:1024]
    forward = multinet.unify(digit_pair, calib, budget=0.02)
    backward = multinet.unify(dict(reversed(list(digit_pair.items()))), calib, budget=0.02)
    assert any(lk.model == lk.source for lk in forward.model.links)  # a skip link is part of the result
    assert sorted(map(str, forward.model.links)) == sorted(map(str, backward.model.links))
    with torch.no_grad():
        fo, bo = forward.model(split.test_x), backward.model(split.test_x)
    for name in digit_pair:
        assert _accuracy(fo[name], split.test_y) == _accuracy(bo[name], split.test_y)


def test_a_link_to_another_model_no_longer_blocks_the_layers_own_skip_link(split, digit_pair, monkeypatch):
    """The two digit MLPs at 1 %. A layer used to take one source, so a head reading the other model's
    features blocked that head's own skip link, and only the swap pass (the blocked direction tried in
    place of the one that blocked it) found the better network. A layer now takes one source of each
    kind: forward selection alone keeps the skip link, and the swap pass has nothing left to change."""
    import multinet.unification.api as api

    calib = split.train_x[:1024]
    swapped = multinet.unify(digit_pair, calib, budget=0.01)
    monkeypatch.setattr(api, "_swaps", lambda *args: [])
    forward_only = multinet.unify(digit_pair, calib, budget=0.01)
    assert any(lk.model == lk.source for lk in forward_only.model.links)
    assert any(lk.model != lk.source for lk in forward_only.model.links)
    assert sorted(map(str, forward_only.model.links)) == sorted(map(str, swapped.model.links))
    for name in digit_pair:
        assert forward_only.errors[name]["unified"] == swapped.errors[name]["unified"]
        assert forward_only.errors[name]["unified"] < 0.6 * forward_only.errors[name]["separate"]


# --- compress(..., skip_links=True): one model, its own skip links, a plain model back --------------------

def test_compress_with_skip_links_returns_the_model_with_its_own_names_and_a_lower_error(split, tmp_path):
    """The digit MLP at 4 % of its FLOPs: the search keeps the head reading the first hidden layer (the
    second goes whole), and compress hands back a plain GraphModule: the model's own layer names and
    output, the same network unify builds for the model alone, saved and reloaded like any other."""
    mlp, calib = zoo.create("mlp"), split.train_x[:1024]
    budget = multinet.Budget(flops=0.04)
    skipped = multinet.compress(mlp, calib, budget=budget, skip_links=True)
    plain = multinet.compress(mlp, calib, budget=budget)
    assert skipped.skip_links == [("head", "hidden.2")] and plain.skip_links == []
    assert not isinstance(skipped.model, MultiNet)
    layers = {n.target for n in skipped.model.graph.nodes if n.op == "call_module"}
    assert "hidden.2" not in layers and {"hidden.0", "head"} <= layers
    assert skipped.flops_before == plain.flops_before and skipped.flops_after <= 0.04 * skipped.flops_before
    assert skipped.flops_after == count(skipped.model).flops
    assert skipped.plan.original == skipped.flops_before and skipped.plan.measured_cost == skipped.flops_after
    assert all(not p.startswith("model.") for g in skipped.plan.groups for p in g.producers)
    alone = multinet.unify({"model": mlp}, calib, budget=budget)
    with torch.no_grad():
        out = skipped.model(split.test_x)
        torch.testing.assert_close(out, alone.model(split.test_x)["model"])
        assert _accuracy(out, split.test_y) > _accuracy(plain.model(split.test_x), split.test_y) + 0.01
    multinet.save(skipped.model, tmp_path / "m.mnet", example_inputs=calib[:1])
    with torch.no_grad():
        torch.testing.assert_close(multinet.load(tmp_path / "m.mnet")(split.test_x), out)


def test_compress_with_skip_links_and_nothing_to_skip_is_plain_compress(split):
    """A one-hidden-layer MLP has no earlier tensor of another group for its head to read: the result is
    exactly compress without skip links."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    calib = split.train_x[:256]
    skipped = multinet.compress(net, calib, budget=multinet.Budget(flops=0.5), skip_links=True)
    plain = multinet.compress(net, calib, budget=multinet.Budget(flops=0.5))
    assert skipped.skip_links == []
    assert [g.removed for g in skipped.groups] == [g.removed for g in plain.groups]
    with torch.no_grad():
        torch.testing.assert_close(skipped.model(split.test_x), plain.model(split.test_x))


@pytest.mark.parametrize("kwargs, message", [
    (dict(ratio=0.5), "skip_links need a budget="),
    (dict(budget=multinet.Budget(latency_ms=1.0)), "FLOPs or parameter budget"),
    (dict(budget=multinet.Budget(flops=0.5), plan_path="p.json"), "cannot be saved for plan="),
    (dict(budget=multinet.Budget(flops=0.5), run_dir="run"), "one run_dir cannot hold"),
    (dict(budget=multinet.Budget(flops=0.5), method="magnitude"), "takes ratio= only"),
])
def test_compress_with_skip_links_refuses_what_it_cannot_do(split, kwargs, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(multinet.MultinetError, match=message):
        multinet.compress(zoo.create("mlp"), split.train_x[:64], skip_links=True, **kwargs)
    assert not list(tmp_path.iterdir())  # refused before any work


def test_a_multinet_is_not_compressed_with_skip_links(split):
    net = MultiNet({"a": zoo.create("mlp"), "b": zoo.create("mlp")}, split.train_x[:1])
    with pytest.raises(multinet.MultinetError, match="chosen by unify"):
        multinet.unification.compress_multinet(net, split.train_x[:64], budget=multinet.Budget(flops=0.5),
                                               skip_links=True)


def test_skip_links_from_the_cli_and_their_refusals(capsys):
    from multinet.cli import main

    assert main(["compress", "zoo:mlp", "--flops", "0.04", "--skip-links", "--quiet", "--calibration", "512"]) == 0
    assert "skip link: head reads the input of hidden.2" in capsys.readouterr().out
    assert main(["compress", "zoo:mlp", "--ratio", "0.3", "--skip-links", "--quiet"]) == 2
    assert "--skip-links needs a --flops or --params budget" in capsys.readouterr().err


def test_a_trial_whose_surgery_misses_the_budget_is_not_kept(split, monkeypatch):
    """The ResNet's skip-link trial at 4 %: the schedule lets two bridged groups vanish, surgery keeps a
    channel of the second (its readers read only it once the first is gone) and the part measures
    66,812 FLOPs against a 65,930 target. However good its error looked, it is no result at this budget."""
    import multinet.unification.api as api

    trials = []
    real = api._unify_part

    def recording(*args, **kwargs):
        trials.append(real(*args, **kwargs))
        return trials[-1]

    monkeypatch.setattr(api, "_unify_part", recording)
    # the auto plan is the one that overshoots: without the uniform plan compared beside it (saturated errors)
    monkeypatch.setattr(importlib.import_module("multinet.pipeline.compression"), "SATURATED_ERROR", float("inf"))
    # every trial (a network with links) looks perfect, the model alone does not: only the budget stops it
    monkeypatch.setattr(api, "member_errors",
                        lambda net, inputs, reference: {m: 0.0 if net.links else 1.0 for m in net.members})
    unified = multinet.unify({"r": zoo.create("resnet")}, split.train_x[:512], budget=0.04, max_positions=16)
    assert any(api.over_budget(t.result.plan) for t in trials)
    assert unified.chosen == {"r": "separate"}
    assert unified.costs_after["total"]["flops"] <= 0.04 * unified.costs_before["total"]["flops"]


def test_compress_with_skip_links_that_cannot_reach_the_budget_says_what_plain_compress_says(split):
    budget = multinet.Budget(flops=0.01, min_channels=32)
    with pytest.raises(multinet.BudgetError) as plain:
        multinet.compress(zoo.create("mlp"), split.train_x[:128], budget=budget)
    with pytest.raises(multinet.BudgetError) as skipped:
        multinet.compress(zoo.create("mlp"), split.train_x[:128], budget=budget, skip_links=True)
    assert str(skipped.value) == str(plain.value) and "another model" not in str(skipped.value)


def test_skip_links_reach_a_budget_that_narrowing_cannot(split):
    """The digit MLP keeps at least one channel per group when narrowed: 64 + 1 + 10 = 75 FLOPs. With the
    head reading the first hidden layer, the second goes whole and 74 FLOPs are within reach."""
    budget = multinet.Budget(flops=74.5 / 17024)
    with pytest.raises(multinet.BudgetError):
        multinet.compress(zoo.create("mlp"), split.train_x[:256], budget=budget)
    result = multinet.compress(zoo.create("mlp"), split.train_x[:256], budget=budget, skip_links=True)
    assert result.skip_links == [("head", "hidden.2")] and result.flops_after <= 74
    assert result.plan.original == result.flops_before == 17024
    assert all(not n.startswith("model.") for n in bridged_layers(result.model))


def test_ignore_patterns_name_the_models_own_layers_with_skip_links(split):
    """The first hidden layer ignored (its outputs stay): the head may still read it and the second hidden
    layer go whole; inside the search the layers carry the member's prefix, the patterns too."""
    budget = multinet.Budget(flops=0.6, ignore=("hidden.0",))
    result = multinet.compress(zoo.create("mlp"), split.train_x[:512], budget=budget, skip_links=True)
    assert result.skip_links == [("head", "hidden.2")]
    assert result.model.get_submodule("hidden.0").out_features == 128


@pytest.mark.parametrize("budget", [multinet.Budget(flops=0.5, min_channels={0: 2}),
                                    multinet.Budget(flops=0.5, output_weights=(2.0,))])
def test_skip_links_refuse_per_group_minimums_and_output_weights(split, budget):
    with pytest.raises(multinet.MultinetError, match="min_channels as one number and no output_weights"):
        multinet.compress(zoo.create("mlp"), split.train_x[:64], budget=budget, skip_links=True)
