"""Saving and loading without pickle: identical outputs, no original class, nothing executable."""
import hashlib
import json

import pytest
import torch

import multinet
import test_hard_cases as hard
from multinet import Budget, data, zoo
from multinet.graph import trace
from multinet.graph.dropping import bridged_layers, mark_bridged
from multinet.io import ModelFileError, from_bytes, load, save, to_bytes
from multinet.io.modelfile import recorded_input_shapes


@pytest.fixture(scope="module")
def calib():
    return data.load("digits").train_x[:256]


pytestmark = pytest.mark.usefixtures("quiet_calibration")


@pytest.mark.parametrize("name", zoo.names())
def test_compressed_zoo_models_reload_to_identical_outputs(name, calib, tmp_path):
    result = multinet.compress(zoo.create(name), calib, budget=Budget(flops=0.5))
    path = save(result.model, tmp_path / f"{name}.mnet")
    loaded = load(path)
    assert type(loaded).__name__ == "LoadedModel"  # rebuilt from the file, not the zoo class
    x = calib[:32]
    with torch.no_grad():  # same tensors with the same strides: the very same numbers
        assert torch.equal(loaded(x), result.model(x))
        assert torch.equal(from_bytes(to_bytes(result.model))(x), result.model(x))
    exported = torch.export.export(loaded, (x,))  # the rebuilt graph exports
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), result.model(x))


def test_unified_multinet_and_plain_module_reload(calib, tmp_path):
    unified = multinet.unify({"a": zoo.create("vgg"), "b": zoo.create("mlp")}, calib, budget=0.4, max_positions=16)
    loaded = load(save(unified.model, tmp_path / "pair.mnet"))
    x = calib[:16]
    with torch.no_grad():
        out, ref = loaded(x), unified.model(x)
    assert set(out) == {"a", "b"}
    for k in ref:
        assert torch.equal(out[k], ref[k])
    assert isinstance(loaded, multinet.MultiNet) and loaded.members == ["a", "b"]
    model = zoo.create("resnet")
    plain = load(save(model, tmp_path / "resnet.mnet", example_inputs=x[:1]))
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))


def test_a_model_file_keeps_the_bridged_layers_and_the_input_shape(calib, tmp_path):
    """What a graph records beside its code (the bridged layers a later compression may drop groups
    from, the input shape the CLI takes an example from) comes back from a .mnet file."""
    gm = trace(zoo.create("mlp"), calib[:1]).module
    assert bridged_layers(gm) == frozenset() and recorded_input_shapes(gm) is None
    mark_bridged(gm, ["head", "hidden.2", "head"])
    loaded = load(save(gm, tmp_path / "mlp.mnet", example_inputs=calib[:1]))
    assert bridged_layers(loaded) == {"head", "hidden.2"}
    assert recorded_input_shapes(loaded) == [(1, *calib.shape[1:])]


HARD_CASES = {  # the hand-written architectures of test_hard_cases.py, with an input each takes
    hard.ConcatOffsets: (2, 3, 6, 6), hard.SplitChunkSlice: (2, 3, 5, 5), hard.ViewLiteral: (2, 1, 8, 8),
    hard.DepthwiseMultiplier: (2, 3, 5, 5), hard.Grouped: (2, 3, 5, 5), hard.ChannelShuffle: (2, 3, 4, 4),
    hard.ConvNeXtBlock: (2, 3, 5, 5), hard.FunctionalLayers: (2, 3, 4, 4), hard.SharedConv: (2, 3, 4, 4),
    hard.Transformerish: (2, 4, 5), hard.Untracked: (2, 3, 4, 4), hard.GatingAndScalars: (2, 3, 4, 4),
    hard.DictOutput: (3, 4), hard.CatOfComputedList: (1, 3, 2, 2), hard.ConcatIntoResidual: (2, 3, 3, 3),
    hard.Conv1dNet: (2, 2, 9), hard.SizeFromAnotherTensor: (2, 3, 4), hard.SizeOnOwnTensor: (2, 3, 4),
}


@pytest.mark.parametrize("model_cls", HARD_CASES, ids=lambda c: c.__name__)
def test_hard_cases_reload_bit_identically(model_cls, tmp_path):
    """Channel shuffle, chunk/cat, view/permute/flatten, SE gating, split, slicing, attention, dict outputs:
    every call these graphs make is in the allow-list, and the reloaded graph computes the same bits."""
    torch.manual_seed(0)
    model, x = model_cls().eval(), torch.randn(HARD_CASES[model_cls])
    loaded = load(save(model, tmp_path / "m.mnet", example_inputs=x))
    traced = multinet.graph.capture_graph(model, x)  # what was saved (attention modules are decomposed)
    with torch.no_grad():
        eager, ref, out = model(x), traced(x), loaded(x)
    leaves = torch.utils._pytree.tree_leaves
    for e, a, b in zip(leaves(eager), leaves(ref), leaves(out), strict=True):
        assert torch.equal(a, b)  # the file holds the traced graph, bit for bit
        torch.testing.assert_close(b, e, atol=1e-5, rtol=1e-5)  # which computes what the model does


def _rewrite(path, tmp_path, change):
    """A copy of the model file with its manifest edited and re-digested (so the graph checks decide)."""
    blob = torch.load(path, weights_only=True)
    manifest = json.loads(blob["manifest"])
    change(manifest)
    out = tmp_path / "tampered.mnet"
    text = json.dumps(manifest)
    torch.save({"manifest": text, "manifest_sha256": hashlib.sha256(text.encode()).hexdigest(),
                "tensors": blob["tensors"]}, out)
    return out


def test_bad_model_files_are_refused(calib, tmp_path):
    path = save(zoo.create("mlp"), tmp_path / "mlp.mnet", example_inputs=calib[:1])
    with pytest.raises(ModelFileError, match="no model file"):
        load(tmp_path / "missing.mnet")
    (tmp_path / "junk.mnet").write_bytes(b"\x00not a model")
    with pytest.raises(ModelFileError, match="not a multinet model file"):
        load(tmp_path / "junk.mnet")
    torch.save(zoo.create("mlp"), tmp_path / "pickled.pt")  # a whole pickled module: never unpickled
    with pytest.raises(ModelFileError, match="not a multinet model file"):
        load(tmp_path / "pickled.pt")

    def call_os_system(m):
        node = next(n for n in m["nodes"] if n["op"] == "call_function" or n["op"] == "call_module")
        node["op"], node["target"] = "call_function", "os.system"
    with pytest.raises(ModelFileError, match="does not load"):
        load(_rewrite(path, tmp_path, call_os_system))

    def foreign_module(m):
        next(iter(m["modules"].values()))["type"] = "Evil"
    with pytest.raises(ModelFileError, match="not a torch.nn layer"):
        load(_rewrite(path, tmp_path, foreign_module))

    def drop_tensor(m):
        m["parameters"].append("no.such.weight")
    with pytest.raises(ModelFileError, match="tensor lists do not match"):
        load(_rewrite(path, tmp_path, drop_tensor))


def test_export_to_onnx_and_torch_export_match_outputs(calib, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    result = multinet.compress(zoo.create("resnet"), calib, budget=Budget(flops=0.5))
    path = multinet.export(result.model, calib[:2], tmp_path / "resnet.onnx", format="onnx")
    session = ort.InferenceSession(str(path))
    x = calib[:17]  # another batch size than the example: the batch dimension is dynamic
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), result.model(x), atol=1e-4, rtol=1e-4)
    program = torch.export.load(multinet.export(result.model, calib[:2], tmp_path / "resnet.pt2", format="torch.export"))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(calib[:2]), result.model(calib[:2]))
    unified = multinet.unify({"a": zoo.create("mlp"), "b": zoo.create("vgg")}, calib, budget=0.4, max_positions=16)
    session = ort.InferenceSession(str(multinet.export(unified.model, calib[:2], tmp_path / "pair.onnx")))
    outs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        ref = unified.model(x)
    for got, key in zip(outs, ["a", "b"]):  # a MultiNet's outputs in model order
        torch.testing.assert_close(torch.from_numpy(got), ref[key], atol=1e-4, rtol=1e-4)
    with pytest.raises(ModelFileError, match="unknown export format"):
        multinet.export(result.model, calib[:2], tmp_path / "x", format="tflite")
