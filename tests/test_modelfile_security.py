"""Model files that cannot run code and cannot be silently corrupted.

Each escape route is a crafted file: a real saved model whose manifest gains a payload, re-digested
so that the graph check (not the digest) is what refuses it. Where a payload can run at all, the
test first shows that a loader *without* the checks runs it (it creates a marker file), then that
``load`` refuses the file with one line naming the node and the marker never appears.
"""
import builtins
import hashlib
import importlib
import io
import json
import operator

import pytest
import torch

from multinet import zoo
from multinet.io import ModelFileError, from_bytes, load, modelfile, save, to_bytes
from multinet.io.allowlist import FUNCTIONS, METHODS


@pytest.fixture
def saved(tmp_path):
    """A real model file (the zoo MLP: placeholder x, flatten, hidden layers, head, output)."""
    return save(zoo.create("mlp", pretrained=False), tmp_path / "mlp.mnet", example_inputs=torch.zeros(1, 1, 8, 8))


@pytest.fixture
def marker(tmp_path):
    """The file every payload tries to create."""
    return tmp_path / "pwned"


def _ref(name):
    return {"$node": name}


def _node(name, op, target, *args, **kwargs):
    return {"name": name, "op": op, "target": target, "args": {"$tuple": list(args)},
            "kwargs": {"$dict": [[k, v] for k, v in kwargs.items()]}}


def _digest(text):
    return hashlib.sha256(text.encode()).hexdigest()


def _blob(path):
    return torch.load(path, weights_only=True)


def _write(blob, manifest, out, redigest=True):
    text = json.dumps(manifest)
    digest = _digest(text) if redigest else blob["manifest_sha256"]
    torch.save({"manifest": text, "manifest_sha256": digest, "tensors": blob["tensors"]}, out)
    return out


def _crafted(saved, change):
    """The saved file with ``change`` applied to its manifest, digest recomputed."""
    blob = _blob(saved)
    manifest = json.loads(blob["manifest"])
    change(manifest)
    return _write(blob, manifest, saved.with_name("crafted.mnet")), manifest, blob["tensors"]


def _inject(*entries):
    """A change that inserts payload nodes right after the input, so they run first."""
    def change(manifest):
        manifest["nodes"][1:1] = list(entries)
    return change


class _AnyFunction(dict):
    """What a loader that trusted namespaces would resolve: any dotted name at all."""

    def __missing__(self, name):
        module, _, attr = name.rpartition(".")
        return getattr(importlib.import_module(module), attr)


def _unchecked_run(manifest, tensors, monkeypatch, *inputs):
    """Build and run the crafted graph the way the loader would without its checks."""
    monkeypatch.setattr(modelfile, "FUNCTIONS", _AnyFunction())
    model = modelfile._rebuild(manifest, tensors)
    try:
        model(*inputs)
    except Exception:
        pass  # the payload runs as its arguments are evaluated; what follows may fail
    monkeypatch.undo()


def _refused(path, node, match):
    with pytest.raises(ModelFileError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    assert f"{node!r}" in message and match in message, message
    return message


def _escapes_only_unchecked(path, manifest, tensors, monkeypatch, marker, node, match, *inputs):
    """The payload runs (the marker file appears) without the loader's checks; with them ``load``
    refuses in one line naming ``node`` and the payload never runs."""
    _unchecked_run(manifest, tensors, monkeypatch, *inputs)
    assert marker.exists()
    marker.unlink()
    _refused(path, node, match)
    assert not marker.exists()


X = torch.zeros(1, 1, 8, 8)


def _code(marker):
    return f"open({str(marker)!r}, 'w').close()"


# --- escape routes, each shown to run without the checks and refused with them ---------------

def test_getattr_to_globals_and_builtins(saved, marker, monkeypatch):
    path, manifest, tensors = _crafted(saved, _inject(
        _node("cls", "call_function", "builtins.getattr", _ref("x"), "__class__"),
        _node("fn", "call_function", "builtins.getattr", _ref("cls"), "__repr__"),
        _node("glob", "call_function", "builtins.getattr", _ref("fn"), "__globals__"),
        _node("bi", "call_function", "operator.getitem", _ref("glob"), "__builtins__"),
        _node("ex", "call_function", "operator.getitem", _ref("bi"), "exec"),
        _node("run", "call_method", "__call__", _ref("ex"), _code(marker))))
    _escapes_only_unchecked(path, manifest, tensors, monkeypatch, marker,
                            "cls", "reads attribute '__class__' with getattr",
                            X)


@pytest.mark.parametrize("attribute", ["__globals__", "__builtins__", "__dict__", "data", "grad_fn", "storage"])
def test_getattr_reads_only_tensor_shape_attributes(saved, attribute):
    path, _, _ = _crafted(saved, _inject(_node("g", "call_function", "builtins.getattr", _ref("x"), attribute)))
    _refused(path, "g", "with getattr")


def test_getattr_on_a_literal_is_refused(saved):
    path, _, _ = _crafted(saved, _inject(_node("g", "call_function", "builtins.getattr", "text", "shape")))
    _refused(path, "g", "with getattr")


def test_getitem_chain_to_eval(saved, marker, monkeypatch):
    """Indexing by strings walks dicts (globals -> __builtins__ -> eval); only numeric indexing loads."""
    path, manifest, tensors = _crafted(saved, _inject(
        _node("bi", "call_function", "operator.getitem", _ref("x"), "__builtins__"),
        _node("ev", "call_function", "operator.getitem", _ref("bi"), "eval"),
        _node("run", "call_method", "__call__", _ref("ev"), _code(marker))))
    _escapes_only_unchecked(path, manifest, tensors, monkeypatch, marker, "bi", "indexes with",
                            {"__builtins__": vars(builtins)})


@pytest.mark.parametrize("index", ["eval", {"$tuple": [0, "eval"]}, {"$dict": [["a", 1]]}, 1.5])
def test_getitem_index_must_be_numeric(saved, index):
    path, _, _ = _crafted(saved, _inject(_node("g", "call_function", "operator.getitem", _ref("x"), index)))
    _refused(path, "g", "indexes with")


def test_getitem_on_a_literal_is_refused(saved):
    path, _, _ = _crafted(saved, _inject(_node("g", "call_function", "operator.getitem", "abc", 0)))
    _refused(path, "g", "indexes with")


def test_dunder_method_chain(saved, marker, monkeypatch):
    """__getattribute__ and __getitem__ as call_method targets reach exec without any getattr node."""
    path, manifest, tensors = _crafted(saved, _inject(
        _node("fn", "call_method", "__getattribute__", _ref("x"), "__repr__"),
        _node("raw", "call_method", "__getattribute__", _ref("fn"), "__func__"),
        _node("glob", "call_method", "__getattribute__", _ref("raw"), "__globals__"),
        _node("bi", "call_method", "__getitem__", _ref("glob"), "__builtins__"),
        _node("ex", "call_method", "__getitem__", _ref("bi"), "exec"),
        _node("run", "call_method", "__call__", _ref("ex"), _code(marker))))
    _escapes_only_unchecked(path, manifest, tensors, monkeypatch, marker, "fn", "calls method '__getattribute__'",
                            X)


@pytest.mark.parametrize("method", ["__reduce_ex__", "__class__", "__init_subclass__", "__setattr__"])
def test_dunder_methods_are_refused(saved, method):
    path, _, _ = _crafted(saved, _inject(_node("m", "call_method", method, _ref("x"), 2)))
    _refused(path, "m", "which multinet does not load")


# numpy/tolist/item leave the tensor world (and break export); type() imports dotted names; the
# rest reach storage, hooks, autograd or take callables. None of them is a tensor program step.
@pytest.mark.parametrize("method", ["numpy", "tolist", "item", "type", "storage", "untyped_storage", "data_ptr",
                                    "register_hook", "apply_", "backward", "share_memory_", "set_"])
def test_methods_outside_the_allow_list_are_refused(saved, method):
    path, _, _ = _crafted(saved, _inject(_node("m", "call_method", method, _ref("x"))))
    _refused(path, "m", f"calls method '{method}', which multinet does not load")


def test_method_on_a_literal_is_refused(saved):
    """call_method's receiver must be a node: no str.format("{0.__class__}") style tricks."""
    path, _, _ = _crafted(saved, _inject(_node("m", "call_method", "split", "a{0.__class__}b", "a")))
    _refused(path, "m", "which is not a node")


def test_torch_save_is_refused(saved, marker, monkeypatch):
    path, manifest, tensors = _crafted(saved, _inject(
        _node("w", "call_function", "torch.save", _ref("x"), str(marker))))
    _escapes_only_unchecked(path, manifest, tensors, monkeypatch, marker,
                            "w", "calls torch.save, which multinet does not load",
                            X)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_torch_load_of_a_pickle_is_refused(saved, marker, monkeypatch, tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save(_Payload(marker), evil)
    path, manifest, tensors = _crafted(saved, _inject(
        _node("r", "call_function", "torch.load", str(evil), weights_only=False)))
    _escapes_only_unchecked(path, manifest, tensors, monkeypatch, marker,
                            "r", "calls torch.load, which multinet does not load",
                            X)


@pytest.mark.parametrize("target", [
    "torch.hub.load", "torch.ops.aten.add", "torch.compile", "torch.jit.load", "torch.jit.script",
    "torch.from_file", "torch.serialization.load", "torch.set_default_dtype", "torch.manual_seed",
    "torch._C._set_grad_enabled", "torch.utils.cpp_extension.load_inline", "torch.nn.functional.__dict__",
    "builtins.eval", "builtins.exec", "builtins.__import__", "builtins.open", "builtins.setattr",
    "os.system", "subprocess.run", "math.__loader__", "operator.attrgetter", "operator.methodcaller",
    "operator.setitem", "operator.delitem",
])
def test_functions_outside_the_allow_list_are_refused(saved, target):
    path, _, _ = _crafted(saved, _inject(_node("f", "call_function", target, _ref("x"))))
    _refused(path, "f", "which multinet does not load")


def test_attrgetter_chain_is_refused(saved, marker, monkeypatch):
    path, manifest, tensors = _crafted(saved, _inject(
        _node("get", "call_function", "operator.attrgetter", "__repr__.__globals__"),
        _node("glob", "call_method", "__call__", _ref("get"), _ref("x")),
        _node("bi", "call_function", "operator.getitem", _ref("glob"), "__builtins__"),
        _node("ex", "call_function", "operator.getitem", _ref("bi"), "exec"),
        _node("run", "call_method", "__call__", _ref("ex"), _code(marker))))
    _escapes_only_unchecked(path, manifest, tensors, monkeypatch, marker,
                            "get", "calls operator.attrgetter, which multinet does not load",
                            X)


def test_methodcaller_is_refused(saved):
    path, _, _ = _crafted(saved, _inject(_node("mc", "call_function", "operator.methodcaller", "numpy")))
    _refused(path, "mc", "calls operator.methodcaller")


# --- fx writes names into Python source: each of these ran code while the file was *loaded* ---

def test_placeholder_name_cannot_inject_code(saved, marker, monkeypatch):
    def change(manifest):
        manifest["nodes"][0]["target"] = f"x={_code(marker)}"
    path, manifest, tensors = _crafted(saved, change)
    _escapes_only_unchecked(path, manifest, tensors, monkeypatch, marker, "x", "inputs are plain identifiers",
                            X)  # a default argument runs when forward is defined


def test_keyword_name_cannot_inject_code(saved, marker, monkeypatch):
    key = f"inplace={_code(marker)} or False, _"
    path, manifest, tensors = _crafted(saved, _inject(
        {**_node("r", "call_function", "torch.nn.functional.relu", _ref("x")), "kwargs": {"$dict": [[key, 0]]}}))
    _escapes_only_unchecked(path, manifest, tensors, monkeypatch, marker, "r", "not a plain identifier",
                            X)


@pytest.mark.parametrize("name", ["a = 1; import os", "__class__", "self", "None", "class", "1x", ""])
def test_node_names_are_plain_identifiers(saved, name):
    path, _, _ = _crafted(saved, _inject(_node(name, "call_function", "torch.relu", _ref("x"))))
    with pytest.raises(ModelFileError, match="has a name multinet does not load"):
        load(path)


@pytest.mark.parametrize("target", ["__class__", "head.__dict__", "forward.__globals__",
                                    'head")+__import__("os").system("true")+getattr(self, "a', "head.weight.T"])
def test_get_attr_targets_are_stored_tensors_without_dunders(saved, target):
    path, _, _ = _crafted(saved, _inject(_node("c", "get_attr", target)))
    _refused(path, "c", "which is not a tensor in the file")


@pytest.mark.parametrize("name", ["head.in_features", "head.weight.T", "training", "hidden.0.forward"])
def test_tensor_named_after_a_non_tensor_attribute_is_refused(saved, name):
    """A 'constant' that names a layer setting, a tensor property or a method is not a stored tensor."""
    blob = _blob(saved)
    manifest = json.loads(blob["manifest"])
    blob["tensors"][name] = torch.zeros(1)
    manifest["constants"].append(name)
    manifest["digests"][name] = modelfile.tensor_digest(torch.zeros(1))
    manifest["nodes"][1:1] = [_node("c", "get_attr", name)]
    path = _write(blob, manifest, saved.with_name("crafted.mnet"))
    with pytest.raises(ModelFileError, match=f"'{name}' names an attribute of its module that is not a tensor"):
        load(path)


def test_call_module_needs_a_module_of_the_file(saved):
    path, _, _ = _crafted(saved, _inject(_node("m", "call_module", "__class__", _ref("x"))))
    _refused(path, "m", "which the file does not define")


@pytest.mark.parametrize("module_type", ["Evil", "__class__", "Parameter", "functional", "Tensor", "os.system",
                                         "init", "utils"])
def test_module_types_are_torch_nn_layers(saved, module_type):
    def change(manifest):
        manifest["modules"]["head"]["type"] = module_type
    path, _, _ = _crafted(saved, change)
    with pytest.raises(ModelFileError, match="module 'head' is a .*which is not a torch.nn layer"):
        load(path)


@pytest.mark.parametrize("path_", ["__class__", "head.__dict__", "a.__init__"])
def test_module_paths_have_no_dunders(saved, path_):
    def change(manifest):
        manifest["modules"][path_] = {"type": "ReLU", "args": {}}
    path, _, _ = _crafted(saved, change)
    with pytest.raises(ModelFileError, match="is not a plain attribute path"):
        load(path)


@pytest.mark.parametrize("name, value, match", [
    ("in_features", {"$node": "x"}, "not a plain value"),
    ("in_features", {"$dict": [["a", 1]]}, "not a plain value"),
    ("in_features", {"$device": "cpu"}, "not a plain value"),
    ("in_features", {"$slice": [0, 1, None]}, "not a plain value"),
    ("in_features", "__class__", "not a plain value"),
    ("__class__", 1, "not one of its constructor arguments"),
    ("device", "cpu", "not one of its constructor arguments"),
])
def test_module_constructor_arguments_are_plain(saved, name, value, match):
    def change(manifest):
        manifest["modules"]["head"]["args"][name] = value
    path, _, _ = _crafted(saved, change)
    with pytest.raises(ModelFileError, match=match):
        load(path)


@pytest.mark.parametrize("argument", [
    {"$code": "print(1)"}, {"$node": "head"}, {"$node": "nowhere"}, {"$dtype": "__class__"}, {"$dtype": "Tensor"},
    {"$device": "file:///etc/passwd"}, {"$slice": [0, "a", None]}, {"$node": "x", "$tuple": []}, "__globals__",
    {"$dict": [[["a"], 1]]},
])
def test_arguments_are_the_encodings_multinet_writes(saved, argument):
    path, _, _ = _crafted(saved, _inject(_node("r", "call_function", "torch.relu", _ref("x"), argument)))
    with pytest.raises(ModelFileError, match="node 'r' "):
        load(path)


def test_unknown_ops_and_graph_shape_are_refused(saved):
    path, _, _ = _crafted(saved, _inject(_node("r", "call_code", "torch.relu", _ref("x"))))
    _refused(path, "r", "which is not an fx op multinet loads")

    def two_outputs(manifest):
        manifest["nodes"].insert(1, _node("output_0", "output", "output", _ref("x")))
    with pytest.raises(ModelFileError, match="exactly one output node"):
        load(_crafted(saved, two_outputs)[0])


def test_tensor_names_have_no_dunders(saved):
    blob = _blob(saved)
    manifest = json.loads(blob["manifest"])
    blob["tensors"]["head.__dict__"] = blob["tensors"].pop("head.bias")
    manifest["parameters"] = ["head.__dict__" if n == "head.bias" else n for n in manifest["parameters"]]
    manifest["digests"]["head.__dict__"] = manifest["digests"].pop("head.bias")
    with pytest.raises(ModelFileError, match="tensor name '?head.__dict__'? is not a plain attribute path"):
        load(_write(blob, manifest, saved.with_name("crafted.mnet")))


# --- integrity ------------------------------------------------------------------------------

def test_flipped_byte_in_a_tensor_is_refused(saved):
    blob = _blob(saved)
    weight = blob["tensors"]["head.weight"]
    weight.view(torch.uint8).view(-1)[7] ^= 0x10
    torch.save(blob, saved.with_name("flipped.mnet"))
    with pytest.raises(ModelFileError, match=r"tensor 'head.weight' does not match its digest \(the file is "
                                             r"corrupted or was edited\)$"):
        load(saved.with_name("flipped.mnet"))


def test_tensor_with_another_shape_or_dtype_is_refused(saved):
    blob = _blob(saved)
    blob["tensors"]["head.bias"] = blob["tensors"]["head.bias"].view(2, 5)  # same bytes, other shape
    torch.save(blob, saved.with_name("reshaped.mnet"))
    with pytest.raises(ModelFileError, match="tensor 'head.bias' does not match its digest"):
        load(saved.with_name("reshaped.mnet"))
    blob["tensors"]["head.bias"] = blob["tensors"]["head.bias"].view(torch.int32).view(10)
    torch.save(blob, saved.with_name("retyped.mnet"))
    with pytest.raises(ModelFileError, match="tensor 'head.bias' does not match its digest"):
        load(saved.with_name("retyped.mnet"))


def test_bfloat16_tensors_are_digested(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).to(torch.bfloat16)
    path = save(model, tmp_path / "bf16.mnet", example_inputs=torch.zeros(1, 4, dtype=torch.bfloat16))
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    assert torch.equal(load(path)(x), model(x))
    blob = _blob(path)
    blob["tensors"]["0.weight"].view(torch.uint8).view(-1)[0] ^= 1
    torch.save(blob, tmp_path / "flipped.mnet")
    with pytest.raises(ModelFileError, match="tensor '0.weight' does not match its digest"):
        load(tmp_path / "flipped.mnet")


def test_edited_manifest_is_refused(saved):
    blob = _blob(saved)
    manifest = json.loads(blob["manifest"])
    manifest["modules"]["head"]["args"]["out_features"] = 11
    with pytest.raises(ModelFileError, match=r"the manifest does not match its digest \(the file is corrupted"):
        load(_write(blob, manifest, saved.with_name("edited.mnet"), redigest=False))


def test_missing_digest_and_old_format_are_refused(saved):
    blob = _blob(saved)
    torch.save({"manifest": blob["manifest"], "tensors": blob["tensors"]}, saved.with_name("nodigest.mnet"))
    with pytest.raises(ModelFileError, match="the manifest does not match its digest"):
        load(saved.with_name("nodigest.mnet"))
    manifest = json.loads(blob["manifest"])
    manifest["format"] = "multinet-graph/1"
    with pytest.raises(ModelFileError, match="older multinet.*save the model again"):
        load(_write(blob, manifest, saved.with_name("old.mnet")))


def test_bytes_go_through_the_same_checks(saved, marker):
    model = load(saved)
    assert isinstance(from_bytes(to_bytes(model)), torch.fx.GraphModule)
    blob = _blob(saved)
    blob["tensors"]["head.bias"][0] += 1
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    with pytest.raises(ModelFileError, match="<bytes>: tensor 'head.bias' does not match its digest"):
        from_bytes(buffer.getvalue())
    manifest = json.loads(_blob(saved)["manifest"])
    manifest["nodes"][-1:-1] = [_node("w", "call_function", "torch.save", _ref("x"), str(marker))]
    text = json.dumps(manifest)
    buffer = io.BytesIO()
    torch.save({"manifest": text, "manifest_sha256": _digest(text), "tensors": _blob(saved)["tensors"]}, buffer)
    with pytest.raises(ModelFileError, match="<bytes>: node 'w' calls torch.save"):
        from_bytes(buffer.getvalue())
    assert not marker.exists()


# --- save refuses what load would refuse ----------------------------------------------------

class _Spectral(torch.nn.Module):
    def forward(self, x):
        return torch.fft.rfft(x).abs()


class _ReadsGrad(torch.nn.Module):
    def forward(self, x):
        return x * x.requires_grad


class _ToList(torch.nn.Module):
    def forward(self, x):
        return x.tolist()


@pytest.mark.parametrize("model, match", [
    (_Spectral(), "node 'fft_rfft' calls torch._C._fft.fft_rfft, which multinet does not load"),
    (_ReadsGrad(), "reads attribute 'requires_grad' with getattr"),
    (_ToList(), "calls method 'tolist', which multinet does not load"),
])
def test_save_refuses_what_load_would_refuse(model, match, tmp_path):
    with pytest.raises(ModelFileError, match=match) as info:
        save(model, tmp_path / "m.mnet", example_inputs=torch.zeros(2, 4))
    assert str(info.value).startswith(f"{tmp_path / 'm.mnet'}: not saved: ")
    assert not (tmp_path / "m.mnet").exists()
    with pytest.raises(ModelFileError, match=match):
        to_bytes(model, torch.zeros(2, 4))


# --- the allow-list itself ------------------------------------------------------------------

def test_allow_list_has_no_dangerous_or_dunder_names():
    names = set(FUNCTIONS) | METHODS
    assert not [n for n in names if any(part.startswith("__") for part in n.split("."))]
    for bad in ("torch.load", "torch.save", "torch.from_file", "torch.compile", "operator.attrgetter",
                "operator.methodcaller", "builtins.eval", "builtins.exec", "builtins.__import__"):
        assert bad not in FUNCTIONS
    assert not {"numpy", "tolist", "item", "type", "storage", "register_hook", "apply_"} & METHODS
    assert FUNCTIONS["builtins.getattr"] is builtins.getattr and FUNCTIONS["operator.getitem"] is operator.getitem
