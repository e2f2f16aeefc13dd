"""Batched members: same-shaped layers of different members run as one batched or grouped op."""
import pytest
import torch
import torch.nn as nn

import multinet
from multinet import MultiNet, data, zoo
from multinet.io import load, save
from multinet.unification.batching import batch_members, batched_count

pytestmark = pytest.mark.usefixtures("quiet_calibration")


@pytest.fixture(scope="module")
def split():
    return data.load("digits")


def _members(names):
    torch.manual_seed(0)
    return {f"{n}{i}": zoo.create(n).eval() for i, n in enumerate(names)}


def _assert_members(net_out, models, x):
    with torch.no_grad():
        for name, model in models.items():
            torch.testing.assert_close(net_out[name], model(x), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("names, batched", [(("mlp", "mlp"), 2), (("vgg", "vgg", "vgg"), 5),
                                            (("resnet", "resnet"), 14), (("mlp", "vgg", "resnet"), 0)],
                         ids=["mlp pair", "vgg triple", "resnet pair", "three architectures"])
def test_batched_form_equals_the_members(split, names, batched):
    """Every same-shaped layer set of the ensemble becomes one op (counted); the outputs stay the members'."""
    models = _members(names)
    net = MultiNet(models, split.train_x[:1]).eval()
    form = net.fused(batched=True)
    assert form.is_fused and batched_count(form.graph_module) == batched
    assert batched_count(net.fused().fused(batched=True).graph_module) == batched  # a fused net batches later
    layers_before = sum(1 for n in net.graph.nodes if n.op == "call_module")
    layers_after = sum(1 for n in form.graph.nodes if n.op == "call_module")
    assert (layers_after < layers_before) == (batched > 0)
    x = split.test_x[:64]
    with torch.no_grad():
        _assert_members(form(x), models, x)


class _Chain(nn.Module):
    def __init__(self, first_bias: bool, second_bias: bool, tokens: bool = False):
        super().__init__()
        self.first = nn.Linear(32, 32, bias=first_bias)
        self.second = nn.Linear(32, 32, bias=second_bias)
        self.tokens = tokens

    def forward(self, x):
        h = x.reshape(x.shape[0], 2, 32) if self.tokens else x
        return self.second(torch.relu(self.first(h)))


def test_token_inputs_and_bias_free_layers_batch_through_flattened_rows():
    torch.manual_seed(0)
    models = {"a": _Chain(False, True, tokens=True).eval(), "b": _Chain(False, True, tokens=True).eval()}
    x = torch.randn(8, 64)
    net = MultiNet(models, x[:1]).eval()
    form = net.fused(batched=True)
    assert batched_count(form.graph_module) == 2
    _assert_members(form(x), models, x)


def test_batched_form_of_a_unified_network_saves_and_reloads(split, tmp_path):
    """Links make members read each other; the batched form keeps the outputs and round-trips a file."""
    models = _members(("vgg", "vgg"))
    net = multinet.unify(models, split.train_x[:256], budget=0.6, max_positions=16).model.eval()
    form = net.fused(batched=True)
    x = split.test_x[:64]
    with torch.no_grad():
        ref, out = net(x), form(x)
    for name in ref:
        torch.testing.assert_close(out[name], ref[name], atol=2e-5, rtol=1e-5)
    save(form, tmp_path / "batched.mnet")
    loaded = load(tmp_path / "batched.mnet")
    assert loaded.is_fused and loaded.members == form.members
    with torch.no_grad():
        again = loaded(x)
    for name in ref:
        assert torch.equal(again[name], out[name])


def test_infer_runs_the_batched_form_on_request(split):
    models = _members(("mlp", "mlp"))
    net = MultiNet(models, split.train_x[:1]).eval()
    x = split.test_x[:100]
    _assert_members(multinet.infer(net, x, batch_size=32, fuse="batched"), models, x)


def test_batched_form_exports_to_onnx(split, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    models = _members(("resnet", "resnet", "mlp", "mlp"))
    form = MultiNet(models, split.train_x[:1]).eval().fused(batched=True)
    assert batched_count(form.graph_module) > 0
    multinet.export(form, split.train_x[:4], tmp_path / "batched.onnx")
    session = ort.InferenceSession(str(tmp_path / "batched.onnx"))
    x = split.test_x[:16]
    outs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert [o.name for o in session.get_outputs()] == list(models)
    with torch.no_grad():
        for out, name in zip(outs, models):
            torch.testing.assert_close(torch.from_numpy(out), models[name](x), atol=1e-4, rtol=1e-4)


class _Reads(nn.Module):
    """A member whose layer reads another member's layer output directly (as a bridge can after compression)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        return self.fc(x)


def test_a_set_whose_layers_feed_each_other_is_left_apart():
    torch.manual_seed(0)
    a, b = _Reads().eval(), _Reads().eval()

    class Stacked(nn.Module):  # b's layer reads a's layer: batching them would make the op its own input
        def __init__(self):
            super().__init__()
            self.a, self.b = a, b

        def forward(self, x):
            h = self.a(x)
            return {"a": h, "b": self.b(h)}

    x = torch.randn(8, 64)
    net = MultiNet.from_graph(multinet.trace(Stacked(), x[:1]).module, ["a", "b"]).eval()
    gm = batch_members(net.graph_module)
    assert batched_count(gm) == 0
    with torch.no_grad():
        torch.testing.assert_close(gm(x)["b"], b(a(x)))


def test_batched_form_counts_the_same_flops(split):
    for names in (("mlp", "mlp"), ("resnet", "resnet")):
        net = MultiNet(_members(names), split.train_x[:1]).eval()
        assert net.fused(batched=True).costs()["total"]["flops"] == net.costs()["total"]["flops"]


class _Rows(nn.Module):
    """(2N, 32) rows from an (N, 64) input: the same shape as _Fixed's at N = 1 only."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 32)

    def forward(self, x):
        return self.fc(x.reshape(-1, 32).contiguous())  # at the depth of _Fixed's layer


class _Fixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 32)

    def forward(self, x):
        return self.fc(x.reshape(2, -1)[:, :32])


def test_auto_form_skips_a_batched_form_that_does_not_run_the_batch():
    """Shapes that match only at the recorded input size: the batched form fails on a larger batch;
    fuse="auto" warns, leaves it out and still gives the members' outputs."""
    torch.manual_seed(0)
    models = {"a": _Rows().eval(), "b": _Fixed().eval()}
    x = torch.randn(6, 64)
    net = MultiNet(models, x[:1]).eval()
    assert batched_count(net.fused(batched=True).graph_module) == 1
    with pytest.warns(UserWarning, match="batched form does not run this batch"):
        out = multinet.infer(net, x, batch_size=6, fuse="auto")
    _assert_members(out, models, x)


def test_an_ensemble_of_exported_encoders_batches_its_layers():
    """Three BERT-shaped encoders (captured with torch.export; q/k/v fused per member first): their
    projections and FFN layers batch across members at equal depth; outputs and FLOPs unchanged."""
    transformers = pytest.importorskip("transformers")
    from multinet.calib import batches

    def bert(seed):
        cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, max_position_embeddings=32, attn_implementation="sdpa")
        torch.manual_seed(seed)
        return transformers.BertModel(cfg, add_pooling_layer=False).eval()

    ids = torch.randint(0, 100, (8, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[:, 20:] = 0
    data = {"input_ids": ids, "attention_mask": mask}
    models = {name: bert(seed) for seed, name in enumerate("abc")}
    with pytest.warns(UserWarning):  # the torch.export fallback notice
        net = MultiNet(models, batches.take(data, 0, 1)).eval()
    form = net.fused(batched=True)
    assert batched_count(form.graph_module) == 8  # per block: fused q/k/v, attention output, FFN in, FFN out
    assert form.costs()["total"]["flops"] == net.costs()["total"]["flops"]
    with torch.no_grad():
        out = batches.call(form, data)
        for name, model in models.items():
            torch.testing.assert_close(out[name]["last_hidden_state"], model(**data).last_hidden_state,
                                       atol=1e-5, rtol=1e-5)
