"""Save and load compressed models and MultiNets without pickle, without running code from the file.

A model file holds tensors and one JSON manifest, written with ``torch.save`` and read back with
``torch.load(weights_only=True)``: the graph (each fx node with its op, target and arguments),
every submodule as a built-in ``torch.nn`` class name plus constructor arguments read off the
module, the tensors, and a SHA-256 digest of each tensor and of the manifest.

Loading rebuilds a ``torch.fx.GraphModule`` from that description, so the manifest is checked node
by node *before* anything is built: fx turns node names, targets and keyword names into Python
source, and the graph then calls what its targets name. Only the functions, tensor methods and
tensor attributes in :mod:`multinet.io.allowlist` are accepted, no name anywhere may be a dunder,
arguments must be the encodings :func:`_encode` writes, and every tensor must match its digest.
Saving runs the same check, so a graph the loader would refuse is refused when it is written.
"""
from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import MultinetError
from ..graph import capture_graph
from .allowlist import DEVICE, FUNCTIONS, METHODS, TENSOR_ATTRIBUTES, function_name, is_dunder, is_path, is_variable
from .files import atomic_path

FORMAT = "multinet-graph/2"
_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")
_MANIFEST_KEYS = {"format", "nodes", "modules", "parameters", "buffers", "constants", "input_shapes", "meta",
                  "digests"}
_MULTINET_KEYS = {"members", "links", "outputs", "fused"}  # the optional "multinet" section of a MultiNet's file
_DTYPES = {name: value for name, value in vars(torch).items()
           if isinstance(value, torch.dtype) and not name.startswith("_")}
_LAYOUTS = {"strided": torch.strided}  # what ATen graphs name in to()/arange(): a fixed set of values, no code
_MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format, "preserve_format": torch.preserve_format}
_FUNCTIONS_HINT = "allowed: the tensor functions listed in multinet/io/allowlist.py"
_METHODS_HINT = "allowed: the tensor methods listed in multinet/io/allowlist.py"


class ModelFileError(MultinetError):
    """A model file that is missing, corrupted, or asks for something multinet will not load."""


class _Refused(Exception):
    """One check failed; the message names the node, module or tensor (the caller adds the file)."""


def _show(value, limit: int = 60) -> str:
    """Any value from the file, quoted on one short line (repr escapes newlines)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _function_label(target) -> str:
    """``torch.save`` as written (a dotted name), anything else quoted."""
    return target if isinstance(target, str) and is_path(target) and "." in target else _show(target)


# --- digests --------------------------------------------------------------------------------

def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 over dtype, shape and raw bytes (read as uint8, so bfloat16 needs no numpy dtype)."""
    h = hashlib.sha256(f"{str(tensor.dtype).removeprefix('torch.')}|{tuple(tensor.shape)}|".encode())
    flat = tensor.detach().cpu().reshape(-1).contiguous()
    h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- encoding -------------------------------------------------------------------------------

def _encode(value):
    if isinstance(value, fx.Node):
        return {"$node": value.name}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {"$dict": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"$slice": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    if isinstance(value, torch.dtype):
        return {"$dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"$device": str(value)}
    if isinstance(value, torch.layout) and value in _LAYOUTS.values():
        return {"$layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format) and value in _MEMORY_FORMATS.values():
        return {"$memory_format": str(value).removeprefix("torch.")}
    if value is Ellipsis:
        return {"$ellipsis": True}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise _Refused(f"an argument of type {type(value).__name__} ({_show(value)}), which a model file cannot hold")


def _node_entry(node: fx.Node) -> dict:
    try:
        args, kwargs = _encode(node.args), _encode(node.kwargs)
    except _Refused as r:
        raise _Refused(f"node {node.name!r} has {r}") from None
    target = function_name(node.target) if node.op == "call_function" else node.target
    return {"name": node.name, "op": node.op, "target": target, "args": args, "kwargs": kwargs}


def _module_spec(path: str, module: nn.Module) -> dict:
    cls = type(module)
    if _module_class(cls.__name__) is not cls:
        raise _Refused(f"module {path!r} is a {cls.__module__}.{cls.__qualname__}: only built-in torch.nn layers "
                       f"are stored by name (trace it, or mark its parent as a leaf)")
    args = {}
    for name in _constructor_arguments(cls):
        if not hasattr(module, name):
            continue
        value = getattr(module, name)
        if name == "bias" and (value is None or isinstance(value, torch.Tensor)):
            value = value is not None
        if isinstance(value, torch.Tensor):
            continue
        try:
            args[name] = _encode(value)
        except _Refused as r:
            raise _Refused(f"module {path!r} ({cls.__name__}) has {r}") from None
    return {"type": cls.__name__, "args": args}


def save(model: nn.Module, path: str | os.PathLike, example_inputs=None) -> Path:
    """Write ``model`` (a GraphModule such as a compressed model or MultiNet, or any traceable
    module with ``example_inputs``) to ``path``, atomically; refuse what :func:`load` would refuse."""
    blob = _blob(model, example_inputs, str(path))
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)
    return Path(path)


def to_bytes(model: nn.Module, example_inputs=None) -> bytes:
    """The model file's content in memory: how a model travels to a Ray worker (tensors and JSON, no pickle)."""
    buffer = io.BytesIO()
    torch.save(_blob(model, example_inputs, "<bytes>"), buffer)
    return buffer.getvalue()


def _multinet_type() -> type:
    """The MultiNet class (imported when used: unification sits above io)."""
    from ..unification.multinet import MultiNet

    return MultiNet


def _multinet_section(model: nn.Module) -> dict | None:
    """What a MultiNet is beyond its graph, as plain strings, lists and a bool (None for other models)."""
    if not isinstance(model, _multinet_type()):
        return None
    return {"members": list(model.members), "links": [link.as_list() for link in model.links],
            "outputs": {k: list(v) for k, v in model.outputs.items()}, "fused": bool(model.is_fused)}


def _graph_module(model: nn.Module, example_inputs) -> fx.GraphModule:
    if isinstance(model, _multinet_type()):
        return model.graph_module
    if isinstance(model, fx.GraphModule):
        return model
    if example_inputs is None:
        raise ModelFileError("save() of a plain nn.Module needs example_inputs to trace it")
    return capture_graph(model, example_inputs)


def _blob(model: nn.Module, example_inputs, where: str) -> dict:
    gm = _graph_module(model, example_inputs)
    try:
        nodes = [_node_entry(node) for node in gm.graph.nodes]
        modules = {n.target: _module_spec(n.target, gm.get_submodule(n.target))
                   for n in gm.graph.nodes if n.op == "call_module"}
        tensors, constants = _tensors(gm)
        params = sorted(name for name, _ in gm.named_parameters())
        buffers = sorted(name for name, _ in gm.named_buffers())
        shapes = [list(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
                  if n.op == "placeholder" and hasattr(n.meta.get("tensor_meta"), "shape")]
        manifest = {"format": FORMAT, "nodes": nodes, "modules": modules, "parameters": params,
                    "buffers": buffers, "constants": constants, "input_shapes": shapes,
                    "meta": {k: v for k, v in gm.meta.items() if _jsonable(v)},
                    "digests": {name: tensor_digest(t) for name, t in tensors.items()}}
        section = _multinet_section(model)
        if section is not None:
            manifest["multinet"] = section  # inside the manifest text, so manifest_sha256 covers it
        _check_manifest(manifest, tensors)
    except _Refused as r:
        raise ModelFileError(f"{where}: not saved: {r}") from None
    text = json.dumps(manifest)
    return {"manifest": text, "manifest_sha256": _text_digest(text), "tensors": tensors}


def _tensors(gm: fx.GraphModule) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Parameters, buffers and the graph's tensor constants (get_attr of a plain tensor attribute)."""
    tensors = {name: _compact(t) for name, t in [*gm.named_parameters(), *gm.named_buffers()]}
    constants = []
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in tensors:
            value = _resolve(gm, node.target)
            if not isinstance(value, torch.Tensor):
                raise _Refused(f"node {node.name!r} reads attribute {node.target!r} of type "
                               f"{type(value).__name__}; a model file holds only tensors")
            tensors[node.target] = _compact(value)
            constants.append(node.target)
    return tensors, sorted(constants)


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy that keeps the strides (a transposed head stays transposed, so outputs stay
    bit-identical) but not a larger storage it is a view of (torch.save writes whole storages)."""
    tensor = tensor.detach().cpu()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone(memory_format=torch.preserve_format)
    return tensor


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _resolve(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


# --- checking: the one gate for save, load, to_bytes and from_bytes ---------------------------

def _check_manifest(manifest: dict, tensors: dict) -> None:
    """Refuse (with :class:`_Refused`) anything but a graph of allow-listed calls over the file's tensors."""
    if not isinstance(manifest, dict) or set(manifest) - {"multinet"} != _MANIFEST_KEYS:
        raise _Refused("the manifest does not have the entries of a multinet model file")
    names = _check_tensor_names(manifest, tensors)
    modules = _check_modules(manifest["modules"])
    _check_nodes(manifest["nodes"], modules, names)
    if "multinet" in manifest:
        _check_multinet(manifest["multinet"], manifest["nodes"][-1], modules)
    _check_input_shapes(manifest["input_shapes"])
    if not isinstance(manifest["meta"], dict):
        raise _Refused("the manifest's meta is not a mapping")


def _check_multinet(section, output: dict, modules: dict) -> None:
    """The MultiNet section: members (identifiers, the keys of the graph's output mapping, in
    order), links between their layers (module paths the file defines), output names (strings),
    and a fused flag; nothing else. (A fused graph may have merged a linked layer into a wider one.)"""
    if not (isinstance(section, dict) and set(section) == _MULTINET_KEYS):
        raise _Refused(f"the manifest's multinet section does not have exactly {', '.join(sorted(_MULTINET_KEYS))}")
    members = section["members"]
    if not (isinstance(members, list) and members and all(is_variable(m) for m in members)
            and len(set(members)) == len(members)):
        raise _Refused(f"the multinet section's members {_show(members)} are not distinct plain identifiers")
    returned = output["args"]["$tuple"][0] if output["args"]["$tuple"] else None
    keys = [pair[0] for pair in returned["$dict"]] if isinstance(returned, dict) and "$dict" in returned else None
    if keys != members:
        raise _Refused(f"the multinet section names members {_show(members)}, but the graph returns {_show(keys)}")
    for link in section["links"] if isinstance(section["links"], list) else [None]:
        if not (isinstance(link, list) and len(link) == 4 and all(isinstance(v, str) for v in link)
                and link[0] in members and link[2] in members and is_path(link[1]) and is_path(link[3])
                and (section["fused"] is True or _named_in(link[1], modules))):
            raise _Refused(f"the multinet section has a link {_show(link)} that is not [member, its layer, "
                           f"member, its layer] of this file")
    outputs = section["outputs"]
    if not (isinstance(outputs, dict) and list(outputs) == members and all(
            isinstance(v, list) and v and all(isinstance(n, str) and is_path(n) for n in v) for v in outputs.values())):
        raise _Refused(f"the multinet section's outputs {_show(outputs)} are not lists of names per member")
    if not isinstance(section["fused"], bool):
        raise _Refused("the multinet section's fused flag is not true or false")


def _check_tensor_names(manifest: dict, tensors: dict) -> set[str]:
    names = []
    for kind in ("parameters", "buffers", "constants"):
        if not isinstance(manifest[kind], list):
            raise _Refused(f"the manifest's {kind} are not a list")
        names += manifest[kind]
    for name in names:
        if not is_path(name):
            raise _Refused(f"tensor name {_show(name)} is not a plain attribute path (no dunder names)")
    if len(set(names)) != len(names):
        raise _Refused("a tensor is listed twice")
    digests = manifest["digests"]
    if not (isinstance(tensors, dict) and isinstance(digests, dict) and set(tensors) == set(digests) == set(names)):
        raise _Refused("the tensors, their digests and the manifest's tensor lists do not match")
    for name, tensor in tensors.items():
        if type(tensor) not in (torch.Tensor, nn.Parameter) or tensor.layout != torch.strided:
            raise _Refused(f"tensor {name!r} is a {type(tensor).__name__}, not a dense tensor")
    return set(names)


def _check_input_shapes(shapes) -> None:
    if not (isinstance(shapes, list) and all(isinstance(s, list) and all(type(d) is int for d in s) for s in shapes)):
        raise _Refused("the manifest's input shapes are not lists of integers")


def _constructor_arguments(cls: type) -> list[str]:
    """What a layer's constructor takes by name (device and dtype excluded: a file holds CPU tensors)."""
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.name not in ("self", "device", "dtype")
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _module_class(name) -> type | None:
    """The torch.nn layer class ``name`` names, or None: ``torch.nn.<name>``, defined in torch.nn.modules."""
    if not isinstance(name, str) or not name.isidentifier() or is_dunder(name):
        return None
    cls = getattr(nn, name, None)
    if isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__.startswith("torch.nn.modules."):
        return cls
    return None


def _check_modules(modules) -> dict[str, type]:
    if not isinstance(modules, dict):
        raise _Refused("the manifest's modules are not a mapping")
    classes = {}
    for path, spec in modules.items():
        if not is_path(path):
            raise _Refused(f"module path {_show(path)} is not a plain attribute path (no dunder names)")
        if not (isinstance(spec, dict) and set(spec) == {"type", "args"} and isinstance(spec["args"], dict)):
            raise _Refused(f"module {path!r} is not described by a type and arguments")
        cls = _module_class(spec["type"])
        if cls is None:
            raise _Refused(f"module {path!r} is a {_show(spec['type'])}, which is not a torch.nn layer")
        _check_module_arguments(path, cls, spec["args"])
        classes[path] = cls
    return classes


def _check_module_arguments(path: str, cls: type, args: dict) -> None:
    allowed = _constructor_arguments(cls)
    for name, value in args.items():
        if name not in allowed:
            raise _Refused(f"module {path!r} passes {_show(name)} to {cls.__name__}, which is not one of its "
                           f"constructor arguments")
        if not _is_plain(value):
            raise _Refused(f"module {path!r} ({cls.__name__}) has {name} = {_show(value)}, which is not a plain "
                           f"value (numbers, strings, booleans, None, lists and tuples of them)")


def _is_plain(value) -> bool:
    if value is None or isinstance(value, (bool, int, float)):
        return True
    if isinstance(value, str):
        return not is_dunder(value)
    if isinstance(value, dict) and set(value) == {"$tuple"}:
        value = value["$tuple"]
    return isinstance(value, list) and all(_is_plain(v) for v in value)


def _check_nodes(nodes, modules: dict, tensors: set[str]) -> None:
    if not isinstance(nodes, list) or not nodes:
        raise _Refused("the graph has no nodes")
    seen: set[str] = set()
    for entry in nodes:
        name = _check_entry(entry, seen)
        _check_argument_shape(name, entry["args"], entry["kwargs"])
        _check_target(name, entry, modules, tensors)  # before the values: the message names the call
        _check_value(name, entry["args"], seen)
        _check_value(name, entry["kwargs"], seen)
        seen.add(name)
    if [e["op"] for e in nodes].count("output") != 1 or nodes[-1]["op"] != "output":
        raise _Refused("the graph does not end in exactly one output node")


def _check_entry(entry, seen: set[str]) -> str:
    if not isinstance(entry, dict) or set(entry) != {"name", "op", "target", "args", "kwargs"}:
        raise _Refused(f"a node is not described by name, op, target, args and kwargs ({_show(entry)})")
    name = entry["name"]
    if not is_variable(name):
        raise _Refused(f"node {_show(name)} has a name multinet does not load (a plain identifier, no dunder)")
    if name in seen:
        raise _Refused(f"node {name!r} is defined twice")
    if entry["op"] not in _OPS:
        raise _Refused(f"node {name!r} has op {_show(entry['op'])}, which is not an fx op multinet loads")
    return name


def _check_argument_shape(name: str, args, kwargs) -> None:
    if not (isinstance(args, dict) and set(args) == {"$tuple"} and isinstance(args["$tuple"], list)):
        raise _Refused(f"node {name!r} has arguments that are not a tuple")
    if not (isinstance(kwargs, dict) and set(kwargs) == {"$dict"} and isinstance(kwargs["$dict"], list)):
        raise _Refused(f"node {name!r} has keyword arguments that are not a mapping")
    for pair in kwargs["$dict"]:
        if not (isinstance(pair, list) and len(pair) == 2 and is_variable(pair[0])):
            raise _Refused(f"node {name!r} has a keyword argument named {_show(pair)}, which is not a plain "
                           f"identifier")


def _check_value(name: str, value, seen: set[str]) -> None:
    """Only what :func:`_encode` writes: node references to earlier nodes and plain data."""
    if value is None or isinstance(value, (bool, int, float)):
        return
    if isinstance(value, str):
        if is_dunder(value):
            raise _Refused(f"node {name!r} passes the string {_show(value)}; dunder names are not loaded")
        return
    if isinstance(value, list):
        for v in value:
            _check_value(name, v, seen)
        return
    if isinstance(value, dict) and len(value) == 1:
        ((tag, body),) = value.items()
        check = _TAGS.get(tag)
        if check is not None and check(name, body, seen):
            return
    raise _Refused(f"node {name!r} has an argument multinet does not write ({_show(value)})")


def _check_node_ref(name: str, body, seen: set[str]) -> bool:
    if not _named_in(body, seen):
        raise _Refused(f"node {name!r} uses {_show(body)}, which is not an earlier node")
    return True


def _check_sequence(name: str, body, seen: set[str]) -> bool:
    if not isinstance(body, list):
        return False
    _check_value(name, body, seen)
    return True


def _check_mapping(name: str, body, seen: set[str]) -> bool:
    if not isinstance(body, list):
        return False
    for pair in body:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], (str, int))):
            return False
        _check_value(name, pair, seen)
    return True


def _check_slice(name: str, body, seen: set[str]) -> bool:
    if not (isinstance(body, list) and len(body) == 3):
        return False
    for part in body:
        if not (part is None or type(part) is int or _is_ref(part)):
            return False
        _check_value(name, part, seen)
    return True


_TAGS = {
    "$node": _check_node_ref,
    "$tuple": _check_sequence,
    "$dict": _check_mapping,
    "$slice": _check_slice,
    "$dtype": lambda name, body, seen: isinstance(body, str) and body in _DTYPES,
    "$device": lambda name, body, seen: isinstance(body, str) and DEVICE.fullmatch(body) is not None,
    "$ellipsis": lambda name, body, seen: body is True,
    "$layout": lambda name, body, seen: isinstance(body, str) and body in _LAYOUTS,
    "$memory_format": lambda name, body, seen: isinstance(body, str) and body in _MEMORY_FORMATS,
}


def _named_in(value, names) -> bool:
    """``value in names`` for a value from the file, which may be unhashable."""
    return isinstance(value, str) and value in names


def _is_ref(value) -> bool:
    return isinstance(value, dict) and set(value) == {"$node"}


def _check_target(name: str, entry: dict, modules: dict, tensors: set[str]) -> None:
    op, target = entry["op"], entry["target"]
    args, kwargs = entry["args"]["$tuple"], entry["kwargs"]["$dict"]
    if op == "placeholder":
        if not is_variable(target) or any(_has_ref(a) for a in args) or len(args) > 1 or kwargs:
            raise _Refused(f"input node {name!r} is named {_show(target)}; inputs are plain identifiers")
    elif op == "get_attr":
        if not _named_in(target, tensors) or args or kwargs:
            raise _Refused(f"node {name!r} reads {_show(target)}, which is not a tensor in the file")
    elif op == "call_module":
        if not _named_in(target, modules):
            raise _Refused(f"node {name!r} calls module {_show(target)}, which the file does not define")
    elif op == "call_method":
        _check_method(name, target, args)
    elif op == "call_function":
        _check_function(name, target, args, kwargs)
    elif target != "output" or len(args) != 1 or kwargs:
        raise _Refused(f"output node {name!r} does not return exactly one value")


def _has_ref(value) -> bool:
    if _is_ref(value):
        return True
    if isinstance(value, dict):
        return any(_has_ref(v) for v in value.values())
    return isinstance(value, list) and any(_has_ref(v) for v in value)


def _check_method(name: str, target, args: list) -> None:
    if not _named_in(target, METHODS):
        raise _Refused(f"node {name!r} calls method {_show(target)}, which multinet does not load ({_METHODS_HINT})")
    if not args or not _is_ref(args[0]):
        raise _Refused(f"node {name!r} calls method {target!r} on {_show(args[0] if args else None)}, "
                       f"which is not a node")


def _check_function(name: str, target, args: list, kwargs: list) -> None:
    if not _named_in(target, FUNCTIONS):
        raise _Refused(f"node {name!r} calls {_function_label(target)}, which multinet does not load "
                       f"({_FUNCTIONS_HINT})")
    if target == "builtins.getattr":
        attribute = args[1] if len(args) == 2 else None
        if not _is_ref(args[0] if args else None) or not _named_in(attribute, TENSOR_ATTRIBUTES) or kwargs:
            raise _Refused(f"node {name!r} reads attribute {_show(attribute)} with getattr, which multinet does "
                           f"not load (allowed: {', '.join(sorted(TENSOR_ATTRIBUTES))} of a node)")
    elif target == "operator.getitem":
        if len(args) != 2 or not _is_ref(args[0]) or not _is_index(args[1]) or kwargs:
            raise _Refused(f"node {name!r} indexes with {_show(args[1] if len(args) == 2 else args)}, which "
                           f"multinet does not load "
                           f"(allowed: a node indexed by integers, slices, None, ... or nodes)")


def _is_index(value) -> bool:
    """x[0], x[:, 2:6], x[..., None], x[idx], x[:, [0, 2]]: no strings, so no route to attributes."""
    if value is None or type(value) in (bool, int) or _is_ref(value):
        return True
    if isinstance(value, dict) and len(value) == 1:
        tag, body = next(iter(value.items()))
        if tag in ("$slice", "$ellipsis"):
            return True  # their contents are checked by _check_value
        if tag == "$tuple":
            value = body
    return isinstance(value, list) and all(_is_index(v) for v in value)


# --- decoding -------------------------------------------------------------------------------

def _decode(value, env: dict[str, fx.Node]):
    if isinstance(value, list):
        return [_decode(v, env) for v in value]
    if not isinstance(value, dict):
        return value
    ((tag, body),) = value.items()
    if tag == "$node":
        return env[body]
    if tag == "$tuple":
        return tuple(_decode(v, env) for v in body)
    if tag == "$dict":
        return {_decode(k, env): _decode(v, env) for k, v in body}
    if tag == "$slice":
        return slice(*(_decode(v, env) for v in body))
    if tag == "$dtype":
        return _DTYPES[body]
    if tag == "$device":
        return torch.device(body)
    if tag == "$layout":
        return _LAYOUTS[body]
    if tag == "$memory_format":
        return _MEMORY_FORMATS[body]
    return Ellipsis


def _place(root: nn.Module, path: str, value) -> None:
    parts = path.split(".")
    owner = root
    for part in parts[:-1]:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    if isinstance(value, nn.Module):
        owner.add_module(parts[-1], value)
    elif isinstance(value, nn.Parameter):
        owner.register_parameter(parts[-1], value)
    else:
        owner.register_buffer(parts[-1], value)


def load(path: str | os.PathLike, map_location: str = "cpu") -> nn.Module:
    """Rebuild a model written by :func:`save` (tensors only, ``weights_only=True``; checked and
    digest-verified before anything is built; no code from the file runs): a ``GraphModule``, or
    a :class:`multinet.MultiNet` when the file holds one."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelFileError(f"no model file at {path}") from None
    except Exception as exc:
        raise ModelFileError(f"{path} is not a multinet model file (or it is corrupted): "
                             f"{str(exc).strip().splitlines()[0][:200]}") from None
    model = _from_blob(blob, str(path))
    return model if str(map_location) == "cpu" else model.to(map_location)


def from_bytes(data: bytes) -> nn.Module:
    """The inverse of :func:`to_bytes`, through the same checks as :func:`load`."""
    try:
        blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFileError(f"<bytes> are not a multinet model: {str(exc).strip().splitlines()[0][:200]}") from None
    return _from_blob(blob, "<bytes>")


def _from_blob(blob, where: str) -> nn.Module:
    try:
        manifest = _verified_manifest(blob)
        _check_manifest(manifest, blob["tensors"])
        _verify_tensors(manifest["digests"], blob["tensors"])
        return _as_multinet(_rebuild(manifest, blob["tensors"]), manifest.get("multinet"))
    except _Refused as r:
        raise ModelFileError(f"{where}: {r}") from None
    except Exception as exc:  # a layer refusing its arguments, a malformed structure: not a model we can build
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ModelFileError(f"{where} is not a valid multinet model file: {type(exc).__name__}: {detail}") from None


def _verified_manifest(blob) -> dict:
    """The manifest, once its format is this one and its text matches its digest."""
    if not (isinstance(blob, dict) and isinstance(blob.get("manifest"), str)):
        raise _Refused("not a multinet model file (no manifest)")
    manifest = json.loads(blob["manifest"])
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found == "multinet-graph/1":
        raise _Refused("written by an older multinet (multinet-graph/1, without digests); this multinet reads "
                       f"{FORMAT}: save the model again with this version")
    if found != FORMAT:
        raise _Refused(f"unknown format {_show(found)} (this multinet reads {FORMAT})")
    if set(blob) != {"manifest", "manifest_sha256", "tensors"} or blob["manifest_sha256"] != _text_digest(
            blob["manifest"]):
        raise _Refused("the manifest does not match its digest (the file is corrupted or was edited)")
    return manifest


def _verify_tensors(digests: dict, tensors: dict) -> None:
    for name, tensor in tensors.items():
        if digests[name] != tensor_digest(tensor):
            raise _Refused(f"tensor {name!r} does not match its digest (the file is corrupted or was edited)")


def _rebuild(manifest: dict, tensors: dict) -> fx.GraphModule:
    """Build the GraphModule from a manifest that passed :func:`_check_manifest`."""
    root = nn.Module()
    for path, spec in manifest["modules"].items():
        _place(root, path, getattr(nn, spec["type"])(**{k: _decode(v, {}) for k, v in spec["args"].items()}))
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for entry in manifest["nodes"]:
        args, kwargs = _decode(entry["args"], env), _decode(entry["kwargs"], env)
        target = FUNCTIONS[entry["target"]] if entry["op"] == "call_function" else entry["target"]
        if entry["op"] == "output":
            env[entry["name"]] = graph.output(args[0])
        else:
            env[entry["name"]] = graph.create_node(entry["op"], target, args, kwargs, name=entry["name"])
    _place_tensors(root, manifest, tensors)
    gm = fx.GraphModule(root, graph, "LoadedModel")
    state = {k: tensors[k] for k in manifest["parameters"] + manifest["buffers"]}
    gm.load_state_dict(state, strict=True, assign=True)  # the stored tensors, strides and all
    gm.meta.update(manifest["meta"])
    if manifest["input_shapes"]:
        gm.meta[_INPUT_SHAPES] = [tuple(s) for s in manifest["input_shapes"]]
    return gm.eval()


_INPUT_SHAPES = "input_shapes"  # where a loaded graph keeps the input shapes its file recorded (its meta)


def recorded_input_shapes(model: nn.Module) -> list[tuple[int, ...]] | None:
    """The input shapes a loaded .mnet file recorded (batch dimension first), None for a model that
    records none: what the CLI takes an example input from and checks data against."""
    meta = getattr(model, "meta", None)  # a loaded GraphModule's, or a MultiNet's (its graph's)
    shapes = meta.get(_INPUT_SHAPES) if isinstance(meta, dict) else None
    return [tuple(s) for s in shapes] if shapes else None


def _as_multinet(gm: fx.GraphModule, section: dict | None) -> nn.Module:
    """The rebuilt graph, as a MultiNet when the file holds one (its output names must be the graph's)."""
    if section is None:
        return gm
    net = _multinet_type().from_graph(gm, section["members"], [tuple(link) for link in section["links"]],
                                      section["fused"])
    if net.outputs != section["outputs"]:
        raise _Refused(f"the multinet section's outputs {_show(section['outputs'])} are not the graph's")
    return net.eval()


def _place_tensors(root: nn.Module, manifest: dict, tensors: dict) -> None:
    """Tensors the layers did not create (load_state_dict fills the others); a name that is already
    some other attribute (``head.in_features``, ``head.weight.T``) is refused."""
    owned = {name for name, _ in [*root.named_parameters(), *root.named_buffers()]}
    for kind in ("parameters", "buffers", "constants"):
        for name in manifest[kind]:
            if name in owned:
                continue
            if _has(root, name):
                raise _Refused(f"tensor {name!r} names an attribute of its module that is not a tensor")
            _place(root, name, nn.Parameter(tensors[name]) if kind == "parameters" else tensors[name])


def _has(root: nn.Module, path: str) -> bool:
    try:
        _resolve(root, path)
        return True
    except AttributeError:
        return False
