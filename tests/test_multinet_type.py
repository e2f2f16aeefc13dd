"""The MultiNet type: what save/load/export/infer take and give back, and its fused execution."""
import json

import pytest
import torch
import torch.nn as nn

import multinet
from multinet import MultiNet, data, zoo
from multinet.io import ModelFileError, from_bytes, load, save, to_bytes

pytestmark = pytest.mark.usefixtures("quiet_calibration")


@pytest.fixture(scope="module")
def split():
    return data.load("digits")


@pytest.fixture(scope="module")
def unified(split):
    return multinet.unify({"a": zoo.create("vgg"), "b": zoo.create("vgg")}, split.train_x[:256], budget=0.4,
                          max_positions=16)


SETS = {"vgg+resnet": ("vgg", "resnet"), "mlp+mlp": ("mlp", "mlp"), "vgg+vgg+mlp": ("vgg", "vgg", "mlp"),
        "all": ("mlp", "vgg", "resnet", "mobilenet", "densenet")}


def _members(names):
    torch.manual_seed(0)
    return {f"{n}{i}": zoo.create(n) for i, n in enumerate(names)}


@pytest.mark.parametrize("names", SETS.values(), ids=SETS.keys())
def test_fused_equals_unfused_equals_members_run_separately(split, names):
    models = _members(names)
    net = MultiNet(models, split.train_x[:1])
    fused = net.fused()
    assert fused.is_fused and fused.members == net.members and not net.is_fused
    x = split.test_x[:128]
    with torch.no_grad():
        out, fast = net(x), fused(x)
        for name, model in models.items():
            assert torch.equal(out[name], model(x))
            torch.testing.assert_close(fast[name], out[name], atol=1e-5, rtol=1e-5)
    wide = [m for n, m in fused.named_children() if n.startswith("fused_")]
    # the MLPs' first layers (64 features) read the same input and become one layer; the convs' 1-channel
    # 3x3 stems (9 multiply-adds per output) stay apart: splitting a fused stem costs more than it saves
    assert bool(wide) == ("mlp" in names and names.count("mlp") > 1)


def test_deep_sibling_convs_fuse_into_one_layer_and_shallow_ones_do_not():
    from multinet.unification.fusion import FUSE_MIN_DEPTH

    def member(cin, seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(cin, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 3))

    for cin, fuses in ((2, False), (16, True)):  # 18 and 144 multiply-adds per output element
        assert (cin * 9 >= FUSE_MIN_DEPTH) == fuses
        models = {"a": member(cin, 0), "b": member(cin, 1)}
        x = torch.randn(5, cin, 6, 6)
        net = MultiNet(models, x[:1])
        fused = net.fused()
        wide = [m for n, m in fused.named_children() if n.startswith("fused_")]
        assert bool(wide) == fuses, cin
        with torch.no_grad():
            out = fused(x)
            for name, model in models.items():
                torch.testing.assert_close(out[name], model(x), atol=1e-5, rtol=1e-5)


def test_fused_linear_outputs_are_dense_so_code_that_views_them_still_runs():
    """Two members' Linears reading one input become one layer whose output is split along the features;
    a slice of it is strided, and a member that views its output (``y.view(-1)``) failed on it at any batch
    above the one the net was built with (a batch of 1 hides it: its slices view fine)."""
    class Member(nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.fc = nn.Linear(64, 8)

        def forward(self, x):
            return self.fc(x).view(-1)

    models, x = {"a": Member(0), "b": Member(1)}, torch.randn(6, 64)
    fused = MultiNet(models, x[:1]).fused()
    assert [n for n, _ in fused.named_children() if n.startswith("fused_")]
    with torch.no_grad():
        out = fused(x)
        for name, model in models.items():
            torch.testing.assert_close(out[name], model(x), atol=1e-5, rtol=1e-5)
    outs = multinet.infer(MultiNet(models, x[:1]), x, batch_size=3, overlap=False)
    torch.testing.assert_close(outs["a"], torch.cat([models["a"](x[:3]), models["a"](x[3:])]), atol=1e-5, rtol=1e-5)
    contiguous = [n for n in fused.graph.nodes if n.target == "contiguous"]
    assert len(contiguous) == 2
    # read by a ReLU that is not in place (which writes a dense output of its own), a slice stays strided:
    # no copy, on networks where an extra op is a few % of the time
    mlps = {k: nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3)) for k in "ab"}
    fused = MultiNet(mlps, x[:1]).fused()
    assert [n for n, _ in fused.named_children() if n.startswith("fused_")]
    assert not [n for n in fused.graph.nodes if n.target == "contiguous"]
    with torch.no_grad():
        out = fused(x)
        for name, model in mlps.items():
            torch.testing.assert_close(out[name], model(x), atol=1e-5, rtol=1e-5)


def test_unified_network_fuses_to_the_same_outputs(split, unified):
    net = unified.model
    assert isinstance(net, MultiNet) and net.members == ["a", "b"]
    across = [lk for lk in net.links if lk.model != lk.source]  # the others are a member's skip links
    assert across and all(lk.model == "b" and lk.source == "a" for lk in across)
    x = split.test_x[:128]
    with torch.no_grad():
        out, fast = net(x), net.fused()(x)
    for k in out:
        torch.testing.assert_close(fast[k], out[k], atol=1e-5, rtol=1e-5)
    assert set(net.costs()) == {"a", "b", "shared", "total"}


@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused"])
def test_type_round_trips_through_save_load_and_bytes(split, unified, tmp_path, fuse):
    net = unified.model.fused() if fuse else unified.model
    x = split.test_x[:32]
    for loaded in (load(save(net, tmp_path / "net.mnet")), from_bytes(to_bytes(net))):
        assert isinstance(loaded, MultiNet)
        assert (loaded.members, loaded.links, loaded.outputs, loaded.is_fused) == (
            net.members, net.links, net.outputs, net.is_fused)
        with torch.no_grad():
            ref, out = net(x), loaded(x)
        for k in ref:
            assert torch.equal(out[k], ref[k])


def test_compressing_a_multinet_gives_a_multinet(split):
    net = MultiNet({"a": zoo.create("mlp"), "b": zoo.create("vgg")}, split.train_x[:1])
    result = multinet.unification.compress_multinet(net, split.train_x[:256], ratio=0.25)
    assert isinstance(result.model, MultiNet) and result.model.members == ["a", "b"]
    with pytest.raises(multinet.MultinetError, match="fused"):
        multinet.unification.compress_multinet(net.fused(), split.train_x[:256], ratio=0.25)


def test_infer_returns_per_member_outputs_through_the_fused_network(split):
    models = _members(("vgg", "resnet"))
    net = MultiNet(models, split.train_x[:1])
    x = split.test_x[:100]
    outs = multinet.infer(net, x, batch_size=32)
    plain = multinet.infer(net, x, batch_size=32, fuse=False)
    assert list(outs) == net.members
    with torch.no_grad():
        for name, model in models.items():
            torch.testing.assert_close(outs[name], model(x), atol=1e-5, rtol=1e-5)
            # unfused, the members' own layers on the same batches: bit for bit (a conv over 100 samples at
            # once may round differently from one over 32, so the reference runs the same batches)
            assert torch.equal(plain[name], torch.cat([model(x[i:i + 32]) for i in range(0, len(x), 32)]))


@pytest.mark.parametrize("costs, chosen", [((1.0, 2.0, 3.0), "unfused"), ((1.0, 0.5, 0.7), "fused"),
                                           ((1.0, 0.7, 0.5), "batched")],
                         ids=["unfused fastest", "fused fastest", "batched fastest"])
def test_auto_fusion_takes_the_form_that_runs_the_batch_fastest(split, costs, chosen):
    """The three forms (as built, fused, fused and batched) take turns on a clock that charges each
    call its form's cost: the cheapest is returned, and infer(fuse="auto") gives the members' outputs."""
    from multinet.runtime.infer import faster_form
    from multinet.unification.batching import batched_count

    models = {"a": zoo.create("mlp"), "b": zoo.create("mlp")}
    net = MultiNet(models, split.train_x[:1])
    charges = iter(list(costs) * 50)
    now = {"t": 0.0, "started": False}

    def clock():  # each timed call reads the clock twice: before (start) and after (start + its cost)
        if now["started"]:
            now["t"] += next(charges)
        now["started"] = not now["started"]
        return now["t"]

    form = faster_form(net, split.test_x[:64], torch.device("cpu"), trials=3, clock=clock)
    got = "unfused" if not form.is_fused else "batched" if batched_count(form.graph_module) else "fused"
    assert got == chosen
    out = multinet.infer(net, split.test_x[:100], fuse="auto")
    with torch.no_grad():
        for name, model in models.items():
            torch.testing.assert_close(out[name], model(split.test_x[:100]), atol=1e-5, rtol=1e-5)
    with pytest.raises(multinet.MultinetError, match="fuse must be True, False, 'batched' or 'auto'"):
        multinet.infer(net, split.test_x[:10], fuse="yes")


@pytest.mark.parametrize("fuse", ["auto", "batched"])
def test_cli_infer_runs_the_chosen_form(split, tmp_path, capsys, fuse):
    from multinet.cli import main

    net = MultiNet({"a": zoo.create("mlp"), "b": zoo.create("mlp")}, split.train_x[:1])
    path = save(net, tmp_path / "pair.mnet", split.train_x[:1])
    assert main(["infer", str(path), "--fuse", fuse, "--quiet"]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_onnx_outputs_are_the_members(split, unified, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    net = unified.model
    session = ort.InferenceSession(str(multinet.export(net, split.train_x[:1], tmp_path / "net.onnx")))
    assert [o.name for o in session.get_outputs()] == net.output_names() == ["a", "b"]
    x = split.test_x[:7]
    got = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        ref = net(x)
    for value, name in zip(got, net.members):
        torch.testing.assert_close(torch.from_numpy(value), ref[name], atol=1e-4, rtol=1e-4)


def _resave(path, tmp_path, change):
    """The file with its manifest's multinet section edited and re-digested (so the checks decide)."""
    import hashlib

    blob = torch.load(path, weights_only=True)
    manifest = json.loads(blob["manifest"])
    change(manifest["multinet"])
    blob["manifest"] = json.dumps(manifest)
    blob["manifest_sha256"] = hashlib.sha256(blob["manifest"].encode()).hexdigest()
    out = tmp_path / "crafted.mnet"
    torch.save(blob, out)
    return out


BAD_SECTIONS = {
    "extra key": (lambda s: s.update(code="import os"), "does not have exactly"),
    "member not an identifier": (lambda s: s["members"].__setitem__(0, "__class__"), "not distinct plain identifiers"),
    "members reordered": (lambda s: s["members"].reverse(), "but the graph returns"),
    "link to a missing layer": (lambda s: s["links"].append(["b", "os.system", "a", "a.x"]), "link"),
    "outputs not names": (lambda s: s["outputs"].__setitem__("a", [{"$node": "x"}]), "outputs"),
    "outputs not the graph's": (lambda s: s["outputs"].__setitem__("a", ["a.0"]), "not the graph's"),
    "fused not a bool": (lambda s: s.__setitem__("fused", "yes"), "fused flag"),
}


@pytest.mark.parametrize("case", BAD_SECTIONS, ids=BAD_SECTIONS.keys())
def test_a_bad_multinet_section_is_refused_in_one_line(split, tmp_path, case):
    change, message = BAD_SECTIONS[case]
    net = MultiNet({"a": zoo.create("mlp"), "b": zoo.create("mlp")}, split.train_x[:1])
    path = _resave(save(net, tmp_path / "net.mnet"), tmp_path, change)
    with pytest.raises(ModelFileError, match=message) as info:
        load(path)
    assert "\n" not in str(info.value)


def test_a_plain_graph_is_not_a_multinet(split, tmp_path):
    """The type, not strings in gm.meta, says what a MultiNet is: a graph that returns a dict is
    still a plain model once saved without the type."""
    net = MultiNet({"a": zoo.create("mlp"), "b": zoo.create("mlp")}, split.train_x[:1])
    plain = load(save(net.graph_module, tmp_path / "plain.mnet"))
    assert not isinstance(plain, MultiNet)
    with pytest.raises(multinet.MultinetError, match="not a MultiNet"):
        multinet.model_costs(plain)
    plain.meta["multinet_models"] = ["a", "b"]  # the old convention means nothing now
    with pytest.raises(multinet.MultinetError, match="not a MultiNet"):
        multinet.model_costs(plain)
    assert isinstance(load(save(net, tmp_path / "net.mnet")), MultiNet)


def test_forward_reaches_layers_through_the_module_dicts_and_follows_replacements(split):
    """MultiNet.forward runs fx's code with layer lookups rewritten to dict reads (no nn.Module
    __getattr__ per layer call): same outputs bit for bit, and a layer replaced afterwards runs."""
    from multinet.unification.direct_call import direct_source

    net = MultiNet(_members(("mlp", "vgg")), split.train_x[:1]).eval()
    x = split.test_x[:16]
    gm = net.graph_module
    with torch.no_grad():
        expected = gm.forward(x)
        got = net(x)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    source = direct_source(gm)
    assert "getattr(self" not in source and "self.mlp0" not in source and "self._modules['mlp0']" in source
    layer = next(n.target for n in gm.graph.nodes if n.op == "call_module" and n.target.endswith("head"))
    parent, name = layer.rsplit(".", 1)
    old = gm.get_submodule(layer)
    setattr(gm.get_submodule(parent), name, torch.nn.Linear(old.in_features, old.out_features))
    with torch.no_grad():
        member = layer.split(".")[0]
        assert torch.equal(net(x)[member], gm.forward(x)[member])
        assert not torch.equal(net(x)[member], expected[member])
    with torch.no_grad():
        before = net(x)[member]
    node = next(n for n in gm.graph.nodes if n.op == "output")  # a graph edited and recompiled: code rebuilt
    with gm.graph.inserting_before(node):
        doubled = gm.graph.call_function(torch.mul, (node.args[0][member], 2.0))
    node.args = ({**node.args[0], member: doubled},)
    gm.recompile()
    with torch.no_grad():
        assert torch.equal(net(x)[member], 2 * before)
