"""MultiNet and Neuro Unification: exact merging, identical and permuted copies collapse, bad input."""
import copy

import pytest
import torch
import torch.nn as nn

import multinet
from multinet import MultiNet, MultinetError, data, zoo
from multinet.graph import count, trace
from multinet.zoo.models import MLP


pytestmark = pytest.mark.usefixtures("quiet_calibration")


@pytest.fixture(scope="module")
def split():
    return data.load("digits")


def test_multinet_equals_separate_execution_for_mixed_architectures(split):
    models = {name: zoo.create(name) for name in ("mlp", "vgg", "resnet", "densenet")}
    net = MultiNet(models, split.train_x[:1])
    x = split.test_x[:64]
    with torch.no_grad():
        out = net(x)
        for name, model in models.items():
            assert torch.equal(out[name], model(x))
    costs = multinet.model_costs(net)
    for name, model in models.items():
        assert costs[name]["flops"] == count(trace(model, x[:1]).module).flops
    assert costs["shared"]["flops"] == 0 and costs["total"]["flops"] == sum(costs[n]["flops"] for n in models)
    assert len(trace(net, x[:1]).prunable_groups) == sum(len(trace(m, x[:1]).prunable_groups) for m in models.values())


def test_infer_batches_a_multinet_and_a_plain_model(split):
    models = [zoo.create("mlp"), zoo.create("vgg")]
    net = MultiNet(models, split.train_x[:1])
    x = split.test_x[:100]
    outs = multinet.infer(net, x, batch_size=32)
    assert set(outs) == {"m0", "m1"}
    with torch.no_grad():
        torch.testing.assert_close(outs["m1"], models[1](x))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, split.test_y[:100]), batch_size=30)
    torch.testing.assert_close(multinet.infer(models[0], loader), models[0](x).detach())


def _permuted_scaled(model: nn.Module, seed: int = 0) -> nn.Module:
    """The same function with every hidden layer's neurons permuted and positively rescaled."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    linears = [m for m in other.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for layer, nxt in zip(linears, linears[1:]):
            perm = torch.randperm(layer.out_features, generator=g)
            scale = torch.rand(layer.out_features, generator=g) + 0.5
            layer.weight.copy_(layer.weight[perm] * scale[:, None])
            layer.bias.copy_(layer.bias[perm] * scale)
            nxt.weight.copy_(nxt.weight[:, perm] / scale[None, :])
    return other


@pytest.mark.parametrize("make_copy", [copy.deepcopy, _permuted_scaled], ids=["identical", "permuted+scaled"])
def test_a_copy_collapses_to_one_model_plus_its_head_with_only_a_flops_budget(split, make_copy):
    a = zoo.create("mlp")
    b = make_copy(a)
    x = split.test_x[:128]
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), atol=1e-5, rtol=1e-5)
    head = count(trace(a, x[:1]).module).layers[-1]
    total = 2 * count(trace(a, x[:1]).module).flops
    budget = (total / 2 + head.flops) / total + 1e-6  # one model and the copy's head: no ignored layers
    unified = multinet.unify({"a": a, "b": b}, split.train_x[:512], budget=budget, damp=1e-9)
    assert unified.costs_after["total"]["flops"] <= budget * total
    assert unified.chosen == {"a": "unified", "b": "unified"}
    layers = {name for name, _ in unified.model.named_modules()}
    # which twin is kept is a tie the search breaks by float rounding (either collapse is exact): one member's
    # first layer is gone and its head reads the other's features, which the other keeps
    kept = "a" if "a.hidden.0" in layers else "b"
    gone = "b" if kept == "a" else "a"
    assert f"{gone}.hidden.0" not in layers and f"{kept}.hidden.0" in layers and f"{gone}.head" in layers
    assert all(lk.source == kept for lk in unified.model.links)
    assert any(lk.model == gone for lk in unified.model.links)
    with torch.no_grad():
        out = unified.model(x)
    torch.testing.assert_close(out["a"], a(x), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(out["b"], b(x), atol=1e-3, rtol=1e-3)
    assert unified.matches and all(m.r2 > 0.99 for m in unified.matches)
    # the twin's bridges are exact; the kept member may add a skip link of its own (judged by its error)
    assert all(b.r2 > 0.99 for b in unified.bridges if b.model == gone)
    assert any(b.model == gone for b in unified.bridges)
    b_row = next(r for r in unified.summary() if r["model"] == gone)
    assert b_row["channels_before"] == 128 + 64 + 10 and b_row["groups_removed"] >= 1
    if make_copy is copy.deepcopy:  # each removed neuron is matched to its twin
        assert all((m.other_channel == m.channel and abs(m.alpha - 1) < 1e-3) or m.other_channel == -1
                   for m in unified.matches)


class _Tuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 4)

    def forward(self, x):
        return self.fc(x.flatten(1)), 3


def test_bad_models_are_refused(split):
    x = split.train_x[:1]
    with pytest.raises(MultinetError, match="duplicate model names: a"):
        MultiNet([("a", zoo.create("mlp")), ("a", zoo.create("vgg"))], x)
    with pytest.raises(MultinetError, match="must be a Python identifier"):
        MultiNet({"a.b": zoo.create("mlp")}, x)
    with pytest.raises(MultinetError, match="model 'wide' does not accept the shared input"):
        MultiNet({"small": zoo.create("mlp"), "wide": zoo.create("mlp", "mnist")}, x)
    with pytest.raises(MultinetError, match="returns something other than tensors"):
        MultiNet({"a": zoo.create("mlp"), "odd": _Tuple()}, x)
    with pytest.raises(MultinetError, match="not a torch.nn.Module"):
        MultiNet({"a": "resnet"}, x)


def test_unifying_a_cnn_with_its_copy_keeps_its_outputs_at_one_models_cost(split):
    a = zoo.create("vgg")
    b = copy.deepcopy(a)
    x = split.test_x[:64]
    full = count(trace(a, x[:1]).module)
    head = full.layers[-1]
    budget = (full.flops + head.flops) / (2 * full.flops) + 1e-6  # only a FLOPs budget: nothing frozen
    unified = multinet.unify({"a": a, "b": b}, split.train_x[:512], budget=budget, damp=1e-9, max_positions=16)
    assert unified.costs_after["total"]["flops"] <= budget * 2 * full.flops
    assert unified.chosen == {"a": "unified", "b": "unified"}
    with torch.no_grad():
        out = unified.model(x)
    torch.testing.assert_close(out["b"], b(x), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(out["a"], a(x), atol=1e-3, rtol=1e-3)


def _accuracy(net, split) -> dict[str, float]:
    with torch.no_grad():
        out = net(split.test_x)
    return {k: float((v.argmax(1) == split.test_y).float().mean()) for k, v in out.items()}


def test_the_order_of_the_models_changes_nothing(split):
    torch.manual_seed(1)
    models = {"a": zoo.create("mlp"), "b": _permuted_scaled(zoo.create("mlp"), 3), "c": zoo.create("vgg")}
    budget = multinet.Budget(flops=0.05)
    forward = multinet.unify(models, split.train_x[:512], budget=budget, max_positions=16)
    backward = multinet.unify(dict(reversed(list(models.items()))), split.train_x[:512], budget=budget,
                              max_positions=16)
    assert forward.model.members == ["a", "b", "c"] and backward.model.members == ["c", "b", "a"]
    assert _accuracy(forward.model, split) == _accuracy(backward.model, split)
    assert forward.chosen == backward.chosen
    assert sorted(map(str, forward.model.links)) == sorted(map(str, backward.model.links))


def test_a_model_that_shares_nothing_keeps_exactly_its_separate_result(split):
    torch.manual_seed(0)
    # random weights and a narrow first layer: nothing the trained models compute explains its features, nor
    # do its 16 features explain theirs (best R² either way 0.87; 128 random ReLU features of the image
    # explain the trained model's hidden input at R² 0.94, and a link to them, kept, lowers every error)
    odd = MLP(hidden=(16, 64))
    with torch.no_grad():
        for p in odd.parameters():
            p.normal_(0, 0.3)
    a = zoo.create("mlp")
    models = {"a": a, "b": copy.deepcopy(a), "odd": odd}
    calib = split.train_x[:512]
    unified = multinet.unify(models, calib, budget=0.3, min_r2=0.9, damp=1e-9, skip_links=False)
    assert max(c.r2 for c in unified.candidates if "odd" in (c.model, c.source)) < 0.9
    assert not any("odd" in (lk.model, lk.source) for lk in unified.model.links)
    assert unified.chosen["odd"] == "separate"
    alone = multinet.compress(odd, calib, budget=multinet.Budget(flops=0.3), damp=1e-9)
    with torch.no_grad():
        assert torch.equal(unified.model(split.test_x)["odd"], alone.model(split.test_x))
    # with skip links (its own layers reading its earlier ones) it gets exactly what it gets unified alone
    unified = multinet.unify(models, calib, budget=0.3, min_r2=0.9, damp=1e-9)
    assert not any(lk.model != lk.source and "odd" in (lk.model, lk.source) for lk in unified.model.links)
    alone = multinet.unify({"odd": odd}, calib, budget=0.3, min_r2=0.9, damp=1e-9)
    assert alone.chosen["odd"] == "unified"  # its skip links help it: the case this part checks
    with torch.no_grad():
        assert torch.equal(unified.model(split.test_x)["odd"], alone.model(split.test_x)["odd"])


def test_unified_is_never_worse_than_separate_on_the_evaluation_samples(split):
    models = {"a": zoo.create("vgg"), "b": zoo.create("resnet")}
    unified = multinet.unify(models, split.train_x[:512], budget=0.1, max_positions=16)
    assert unified.costs_after["total"]["flops"] <= 0.1 * unified.costs_before["total"]["flops"]
    for name in models:
        errors = unified.errors[name]
        kept = errors["unified"] if unified.chosen[name] == "unified" else errors["separate"]
        assert kept <= errors["separate"] + 1e-12
    rows = unified.summary()
    assert [r["model"] for r in rows] == ["a", "b", "shared"] and all("chosen" in r for r in rows[:2])
    assert all(c.r2 <= 1 for c in unified.candidates) and unified.unlinkable
    acc = _accuracy(unified.model, split)
    assert min(acc.values()) > 0.85


def test_a_link_that_would_hurt_one_member_costs_the_others_nothing(split):
    """With every link a candidate (min_r2=0), the random model's links explain little; they are kept
    only where they help everyone they join, and the copies stay unified whatever happens to them."""
    torch.manual_seed(0)
    odd = zoo.create("mlp")
    with torch.no_grad():
        for p in odd.parameters():
            p.normal_(0, 0.3)
    a = zoo.create("mlp")
    models = {"a": a, "b": _permuted_scaled(a, 5), "odd": odd}
    unified = multinet.unify(models, split.train_x[:512], budget=0.1, min_r2=0.0)
    assert any("odd" in (c.model, c.source) for c in unified.candidates)  # odd's links were candidates
    assert unified.chosen["a"] == unified.chosen["b"] == "unified"
    for name, errors in unified.errors.items():
        kept = errors["unified"] if unified.chosen[name] == "unified" else errors["separate"]
        assert kept <= errors["separate"] + 1e-12


def _parity_mlp(split) -> nn.Module:
    """A digit-parity classifier trained here (the zoo holds digit classifiers only)."""
    from multinet.zoo.models import MODELS
    from multinet.zoo.train import fit

    torch.manual_seed(0)
    model = MODELS["mlp"](in_channels=1, image_size=8, num_classes=2)
    return fit(model, split.train_x, split.train_y % 2, 40, 0).eval()


def test_links_go_both_ways_and_a_member_a_link_leaves_worse_off_is_weighted_up(split):
    """A digit and a parity classifier at 4 % of their FLOPs. The digit model's features explain the
    parity model's layers less well (R²) than the other way round, so that direction used to be the
    only one tried; here it is the one that helps, and at equal weights it leaves the parity model worse
    than alone (by 66 %): the retry with more weight on parity brings it within the 10 % slack
    (``tolerance``) while the digit model halves its error. (With no slack the retry misses by 5 %:
    parity's separate compression improved when the schedule learned to spend a plan's leftover budget.)"""
    models = {"digit": zoo.create("mlp"), "parity": _parity_mlp(split)}
    # fuse_layers=False: the members' first layers stay apart (compressed fused, the digit model reading
    # parity's features is enough here: tests/test_unify.py::test_fused_first_layers_...)
    unified = multinet.unify(models, split.train_x[:1024], budget=0.04, skip_links=False, tolerance=0.1,
                             fuse_layers=False)
    assert unified.chosen == {"digit": "unified", "parity": "unified"}
    assert any(lk.model == "parity" and lk.source == "digit" for lk in unified.model.links)
    by_r2 = sorted(unified.candidates, key=lambda c: -c.r2)[0]
    assert (by_r2.model, by_r2.source) == ("digit", "parity")  # the direction the R² alone would pick
    for name, errors in unified.errors.items():
        assert errors["unified"] < 1.1 * errors["separate"]
    assert unified.errors["digit"]["unified"] < 0.6 * unified.errors["digit"]["separate"]
    assert unified.errors["parity"]["weight"] > 1 and unified.errors["digit"]["weight"] == 1


def test_links_both_ways_never_let_two_tensors_stand_in_for_each_other(split):
    from multinet.unification import choose_links, score_candidates
    from multinet.unification.similarity import canonical_order, linkable_layers

    a = zoo.create("mlp")
    models = {"a": a, "b": _permuted_scaled(a, 2)}
    net = MultiNet(models, split.train_x[:1])
    graph = trace(net.graph_module, split.train_x[:1])
    targets = {m: list(linkable_layers(graph, net.graph_module, m)[0]) for m in models}
    candidates = score_candidates(net.graph_module, targets, split.train_x[:256])
    rank = {m: i for i, m in enumerate(canonical_order(models))}
    links = choose_links(net.graph_module, candidates, rank, 0.5, {("a", "b"), ("b", "a")})
    assert {lk.model for lk in links} == {"a", "b"}  # both directions are used ...
    calls = {n.target: n for n in net.graph_module.graph.nodes if n.op == "call_module"}
    read = {(calls[lk.layer].args[0].name, calls[lk.source_layer].args[0].name) for lk in links}
    assert not any((src, own) in read for own, src in read)  # ... but never for the same pair of tensors
    one_way = choose_links(net.graph_module, candidates, rank, 0.5)
    assert len({lk.model for lk in one_way}) == 1


def test_unify_reports_its_search_with_progress(split, capsys):
    a = zoo.create("mlp")
    multinet.unify({"a": a, "b": _permuted_scaled(a, 1)}, split.train_x[:256], budget=0.3, progress=True)
    err = capsys.readouterr().err
    assert "unify: each model alone: 0/2" in err and "unify: each model alone: 2/2 (100%) done" in err
    assert "unify: link trials: 0/" in err and "reading" in err and "unify: link trials" in err.split("done")[-2]


def test_a_layer_may_read_another_members_tensor_and_its_own_earlier_one_at_once(split):
    """One link per kind and layer: a head can read the other member's features (a cross link) and its own
    first layer's (a skip link) together, each tensor once; widened with zero weights, outputs are unchanged."""
    from multinet.unification import choose_links, score_candidates
    from multinet.unification.bridges import add_bridges
    from multinet.unification.similarity import canonical_order, linkable_layers, skip_conflicts

    models = {"digit": zoo.create("mlp"), "parity": _parity_mlp(split)}
    net = MultiNet(models, split.train_x[:1])
    graph = trace(net.graph_module, split.train_x[:1])
    targets = {m: list(linkable_layers(graph, net.graph_module, m)[0]) for m in models}
    candidates = score_candidates(net.graph_module, targets, split.train_x[:256], conflicts=skip_conflicts(graph))
    rank = {m: i for i, m in enumerate(canonical_order(models))}
    links = choose_links(net.graph_module, candidates, rank, 0.5, {("digit", "parity"), ("digit", "digit")})
    kinds: dict[str, list[bool]] = {}
    for lk in links:
        kinds.setdefault(lk.layer, []).append(lk.source == lk.model)
    assert all(sorted(k) in ([False], [True], [False, True]) for k in kinds.values())
    both = [layer for layer, k in kinds.items() if len(k) == 2]
    assert "digit.head" in both
    bridged, bridges = add_bridges(net, split.train_x[:1], links)
    bridge = next(b for b in bridges if b.consumer == "digit.head")
    assert len(bridge.sources) == len(bridge.tensors) == 2
    assert {s for s, _, _ in bridge.sources} == {"digit", "parity"}
    head = bridged.get_submodule("digit.head")
    assert head.in_features == bridge.own + sum(w for _, _, w in bridge.sources)
    x = split.test_x[:64]
    with torch.no_grad():
        out, ref = bridged(x), net(x)
    for m in models:
        torch.testing.assert_close(out[m], ref[m], atol=1e-5, rtol=1e-5)


def test_members_first_layers_fuse_for_compression_and_a_members_own_layers_do_not(split):
    from multinet.unification.fusion import fuse_across_members

    a, b = zoo.create("mlp"), _permuted_scaled(zoo.create("mlp"), 3)
    net = MultiNet({"a": a, "b": b}, split.train_x[:1])
    fused = fuse_across_members(net.graph_module, ["a", "b"])
    shared = [n for n, _ in fused.named_children() if n.startswith("shared_")]
    assert shared == ["shared_a_hidden_0_0"] and fused.get_submodule(shared[0]).out_features == 256
    layers = {n for n, _ in fused.named_modules()}
    assert "a.hidden.0" not in layers and "b.hidden.0" not in layers and "a.hidden.2" in layers
    x = split.test_x[:64]
    with torch.no_grad():
        out, ref = fused(x), net(x)
    for m in ("a", "b"):
        torch.testing.assert_close(out[m], ref[m], atol=1e-5, rtol=1e-5)
    # the fused layer is one channel group of both members' channels
    graph = trace(fused, split.train_x[:1])
    assert graph.group_of_layer(shared[0]).size == 256
    kept = fuse_across_members(net.graph_module, ["a", "b"], keep=("b.hidden.*",))
    assert not any(n.startswith("shared_") for n, _ in kept.named_children())
    alone = fuse_across_members(MultiNet({"a": a}, split.train_x[:1]).graph_module, ["a"])
    assert not any(n.startswith("shared_") for n, _ in alone.named_children())


def test_fused_first_layers_let_one_trunk_serve_a_digit_and_a_parity_model(split):
    """At 2 % of their FLOPs a digit and a parity MLP keep a trunk of a few first-layer neurons. Apart,
    each member's first layer is its own channel group and the schedule's greedy path spends the trunk
    on one member's neurons; fused, REAP picks among both members' neurons for both heads at once. unify
    keeps whichever variant has the lower summed error, never leaving a member worse than alone."""
    models = {"digit": zoo.create("mlp"), "parity": _parity_mlp(split)}
    calib = split.train_x[:1024]
    fused = multinet.unify(models, calib, budget=0.02)
    apart = multinet.unify(models, calib, budget=0.02, fuse_layers=False)
    for u in (fused, apart):
        assert u.chosen == {"digit": "unified", "parity": "unified"}
        for m, e in u.errors.items():
            assert e["unified"] <= e["separate"]
    assert any(n.startswith("shared_") for n, _ in fused.model.named_children())
    assert not any(n.startswith("shared_") for n, _ in apart.model.named_children())
    rows = {r["model"]: r for r in fused.summary()}
    width = fused.model.get_submodule(next(n for n, _ in fused.model.named_children() if n.startswith("shared_")))
    assert rows["shared"]["channels_after"] == width.out_features > 0
    # a member's first layer went into the shared one, not away: only its second hidden layer may be gone
    layers = {n for n, _ in fused.model.named_modules()}
    for m in models:
        assert rows[m]["groups_removed"] == (f"{m}.hidden.2" not in layers)
    assert apart.summary()[-1]["channels_after"] == 0
    total = lambda u: sum(e["unified"] for e in u.errors.values())  # noqa: E731
    assert total(fused) < 0.9 * total(apart)
    x = split.test_x
    with torch.no_grad():
        digit = lambda u: (u.model(x)["digit"].argmax(1) == split.test_y).float().mean().item()  # noqa: E731
        assert digit(fused) > digit(apart) + 0.05
        assert fused.costs_after["total"]["flops"] <= 0.02 * sum(count(trace(m, x[:1]).module).flops
                                                                  for m in models.values())
        torch.testing.assert_close(fused.model.fused()(x[:32])["digit"], fused.model(x[:32])["digit"],
                                   atol=1e-5, rtol=1e-5)
        from multinet.io import from_bytes, to_bytes
        again = from_bytes(to_bytes(fused.model))  # the shared layer and its split pass the model-file checks
        torch.testing.assert_close(again(x[:32])["parity"], fused.model(x[:32])["parity"])
