"""Save and load compressed models and MultiNets without pickle.

A model file holds tensors and one JSON manifest, written with ``torch.save`` and read back with
``torch.load(weights_only=True)``: the graph (each fx node with its op, target and arguments),
every submodule as a built-in ``torch.nn`` class name plus constructor arguments read off the
module, and the tensors. Loading rebuilds a ``torch.fx.GraphModule`` from that description: it
needs neither the original model class nor any code from the file, and it refuses functions
outside torch, torch.nn.functional and operator, and modules outside torch.nn.
"""
from __future__ import annotations

import builtins
import inspect
import json
import math
import operator
import os
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import MultinetError
from .files import atomic_path
from ..graph import trace

FORMAT = "multinet-graph/1"
_FUNCTION_SPACES = {"torch": torch, "torch.nn.functional": F, "operator": operator, "math": math,
                    "builtins": builtins}
_BUILTINS = {"getattr"}  # the only builtin an fx graph needs (x.shape, x.size)


class ModelFileError(MultinetError):
    """A model file that is missing, corrupted, or asks for something multinet will not load."""


# --- encoding -------------------------------------------------------------------------------

def _function_name(fn) -> str:
    for space, namespace in _FUNCTION_SPACES.items():
        name = getattr(fn, "__name__", None)
        if name is not None and getattr(namespace, name, None) is fn:
            if space == "builtins" and name not in _BUILTINS:
                break
            return f"{space}.{name}"
    raise ModelFileError(f"cannot save a call to {getattr(fn, '__qualname__', fn)!r}: only functions from torch, "
                         f"torch.nn.functional and operator are stored (no code is ever saved)")


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
    if value is Ellipsis:
        return {"$ellipsis": True}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ModelFileError(f"cannot save an argument of type {type(value).__name__} ({value!r})")


def _module_spec(module: nn.Module) -> dict:
    cls = type(module)
    if cls.__module__.split(".")[:3] != ["torch", "nn", "modules"] or getattr(nn, cls.__name__, None) is not cls:
        raise ModelFileError(f"cannot save module {cls.__module__}.{cls.__name__}: only built-in torch.nn layers are "
                             f"stored by name (trace it, or mark its parent as a leaf)")
    args = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name in ("self", "device", "dtype") or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if not hasattr(module, name):
            continue
        value = getattr(module, name)
        if name == "bias" and (value is None or isinstance(value, torch.Tensor)):
            value = value is not None
        if isinstance(value, torch.Tensor):
            continue
        args[name] = _encode(value)
    return {"type": cls.__name__, "args": args}


def save(model: nn.Module, path: str | os.PathLike, example_inputs=None) -> Path:
    """Write ``model`` (a GraphModule such as a compressed model or MultiNet, or any traceable
    module with ``example_inputs``) to ``path``, atomically."""
    blob = _blob(model, example_inputs)
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)
    return Path(path)


def to_bytes(model: nn.Module, example_inputs=None) -> bytes:
    """The model file's content in memory: how a model travels to a Ray worker (tensors and JSON, no pickle)."""
    import io

    buffer = io.BytesIO()
    torch.save(_blob(model, example_inputs), buffer)
    return buffer.getvalue()


def from_bytes(data: bytes) -> fx.GraphModule:
    import io

    return _from_blob(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), "<bytes>")


def _blob(model: nn.Module, example_inputs=None) -> dict:
    gm = model if isinstance(model, fx.GraphModule) else None
    if gm is None:
        if example_inputs is None:
            raise ModelFileError("save() of a plain nn.Module needs example_inputs to trace it")
        gm = trace(model, example_inputs).module
    nodes, modules, tensors = [], {}, {}
    for node in gm.graph.nodes:
        entry = {"name": node.name, "op": node.op, "args": _encode(node.args), "kwargs": _encode(node.kwargs)}
        if node.op == "call_function":
            entry["target"] = _function_name(node.target)
        else:
            entry["target"] = node.target
        if node.op == "call_module" and node.target not in modules:
            modules[node.target] = _module_spec(gm.get_submodule(node.target))
        nodes.append(entry)
    attributes = {}
    for name, p in gm.named_parameters():
        tensors[name] = p.detach().cpu()
    for name, b in gm.named_buffers():
        tensors[name] = b.detach().cpu()
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in tensors:
            value = _resolve(gm, node.target)
            if not isinstance(value, torch.Tensor):
                raise ModelFileError(f"cannot save attribute `{node.target}` of type {type(value).__name__}")
            tensors[node.target] = value.detach().cpu()
            attributes[node.target] = "constant"
    params = {name for name, _ in gm.named_parameters()}
    buffers = {name for name, _ in gm.named_buffers()}
    shapes = [list(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
              if n.op == "placeholder" and hasattr(n.meta.get("tensor_meta"), "shape")]
    manifest = {"format": FORMAT, "nodes": nodes, "modules": modules, "parameters": sorted(params),
                "input_shapes": shapes,
                "buffers": sorted(buffers), "constants": sorted(attributes),
                "meta": {k: v for k, v in gm.meta.items() if _jsonable(v)}}
    return {"manifest": json.dumps(manifest), "tensors": tensors}


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


def _resolve(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


# --- decoding -------------------------------------------------------------------------------

def _decode(value, env: dict[str, fx.Node]):
    if isinstance(value, list):
        return [_decode(v, env) for v in value]
    if isinstance(value, dict):
        if "$node" in value:
            return env[value["$node"]]
        if "$tuple" in value:
            return tuple(_decode(v, env) for v in value["$tuple"])
        if "$dict" in value:
            return {_decode(k, env): _decode(v, env) for k, v in value["$dict"]}
        if "$slice" in value:
            return slice(*(_decode(v, env) for v in value["$slice"]))
        if "$dtype" in value:
            dtype = getattr(torch, value["$dtype"], None)
            if not isinstance(dtype, torch.dtype):
                raise ModelFileError(f"unknown dtype {value['$dtype']!r}")
            return dtype
        if "$device" in value:
            return torch.device(value["$device"])
        if "$ellipsis" in value:
            return Ellipsis
        raise ModelFileError(f"unknown argument encoding {sorted(value)}")
    return value


def _function(name: str):
    space, _, attr = name.rpartition(".")
    namespace = _FUNCTION_SPACES.get(space)
    fn = getattr(namespace, attr, None) if namespace is not None else None
    if fn is None or not callable(fn) or (space == "builtins" and attr not in _BUILTINS):
        raise ModelFileError(f"the model file calls {name!r}, which multinet does not load "
                             f"(only torch, torch.nn.functional and operator functions)")
    return fn


def _module(spec: dict) -> nn.Module:
    cls = getattr(nn, spec.get("type", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)
            and cls.__module__.split(".")[:3] == ["torch", "nn", "modules"]):
        raise ModelFileError(f"the model file asks for module {spec.get('type')!r}, which is not a torch.nn layer")
    args = {k: _decode(v, {}) for k, v in spec["args"].items()}
    return cls(**args)


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


def load(path: str | os.PathLike, map_location: str = "cpu") -> fx.GraphModule:
    """Rebuild a model written by :func:`save` (tensors only, ``weights_only=True``; no code runs)."""
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ModelFileError(f"no model file at {path}") from None
    except Exception as exc:
        raise ModelFileError(f"{path} is not a multinet model file (or it is corrupted): "
                             f"{str(exc).strip().splitlines()[0][:200]}") from None
    return _from_blob(blob, path)


def _from_blob(blob, path) -> fx.GraphModule:
    try:
        manifest = json.loads(blob["manifest"])
        tensors = blob["tensors"]
        if manifest.get("format") != FORMAT:
            raise ModelFileError(f"{path}: unknown format {manifest.get('format')!r} (this multinet reads {FORMAT})")
        return _rebuild(manifest, tensors)
    except ModelFileError:
        raise
    except (KeyError, TypeError, ValueError, json.JSONDecodeError, AttributeError, RuntimeError) as exc:
        raise ModelFileError(f"{path} is not a valid multinet model file: {type(exc).__name__}: {exc}") from None


def _rebuild(manifest: dict, tensors: dict) -> fx.GraphModule:
    root = nn.Module()
    for name, spec in manifest["modules"].items():
        _place(root, name, _module(spec))
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for entry in manifest["nodes"]:
        op, target = entry["op"], entry["target"]
        args, kwargs = _decode(entry["args"], env), _decode(entry["kwargs"], env)
        if op == "call_function":
            target = _function(target)
        elif op not in ("placeholder", "get_attr", "call_module", "call_method", "output"):
            raise ModelFileError(f"unknown node op {op!r}")
        if op == "output":
            node = graph.output(args[0])
        else:
            node = graph.create_node(op, target, tuple(args), kwargs, name=entry["name"])
        env[entry["name"]] = node
    for name in manifest["parameters"]:
        if not _has(root, name):
            _place(root, name, nn.Parameter(tensors[name].clone()))
    for name in manifest["buffers"] + manifest["constants"]:
        if not _has(root, name):
            _place(root, name, tensors[name].clone())
    gm = fx.GraphModule(root, graph, "LoadedModel")
    state = {k: tensors[k] for k in manifest["parameters"] + manifest["buffers"]}
    gm.load_state_dict(state, strict=True)
    gm.meta.update(manifest.get("meta", {}))
    if manifest.get("input_shapes"):
        gm.meta["input_shapes"] = [tuple(s) for s in manifest["input_shapes"]]
    return gm.eval()


def _has(root: nn.Module, path: str) -> bool:
    try:
        _resolve(root, path)
        return True
    except AttributeError:
        return False
