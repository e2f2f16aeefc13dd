"""Where models come from: zoo names, ``package.module:factory`` and ``path/to/file.py:factory``
references (with keyword arguments), state dicts, saved ``.mnet`` files.

Nothing here unpickles a model: a pickled whole ``nn.Module`` (or a ``torch.export`` archive,
whose loader falls back to pickle) can run code when read, so those are refused with a hint.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import yaml

from ..errors import MultinetError

PICKLED_MODEL_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")


def first_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def resolve_path(path: str | Path, base_dir: str | Path | None) -> Path:
    """``path`` as given, or under ``base_dir`` when relative (a scenario's folder)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() or base_dir is None else Path(base_dir) / p


def is_file_ref(module_part: str) -> bool:
    """``path/to/file.py`` (a file imported by path) rather than ``package.module``."""
    return module_part.endswith(".py") or "/" in module_part or "\\" in module_part


def anchor(ref: str, base_dir: str | Path) -> str:
    """``ref`` with its file part made absolute from ``base_dir``; module and zoo names stay.

    A reference with a colon is ``module:name`` or ``file.py:name``; one without is a path.
    """
    if ":" in ref:
        module_part, name = ref.rsplit(":", 1)
        return f"{resolve_path(module_part, base_dir).resolve()}:{name}" if is_file_ref(module_part) else ref
    return str(resolve_path(ref, base_dir).resolve())


def resolve_callable(ref: str, base_dir: str | Path | None = None) -> Callable:
    """``package.module:name`` or ``path/to/file.py:name`` -> the callable it names."""
    module_part, name = ref.rsplit(":", 1)
    if is_file_ref(module_part):
        module = import_file(resolve_path(module_part, base_dir))
    else:
        try:
            module = importlib.import_module(module_part)
        except ImportError as exc:
            raise MultinetError(f"cannot import {module_part!r}: {exc}") from exc
        except Exception as exc:  # the module's own code failed (a SyntaxError, an error at import time)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "(no message)"
            raise MultinetError(f"cannot import {module_part!r}: {type(exc).__name__}: {first}") from exc
    found = getattr(module, name, None)
    if not callable(found):
        raise MultinetError(f"{module_part!r} has no callable {name!r}")
    return found


def import_file(path: Path) -> ModuleType:
    """Import a Python file by path (its folder importable meanwhile, for its own sibling imports)."""
    if not path.is_file():
        raise MultinetError(f"Python file {str(path)!r} does not exist")
    name = f"_multinet_file_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise MultinetError(f"cannot import {str(path)!r}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look a class's module up here
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise MultinetError(f"cannot import {str(path)!r}: {first_line(exc)}") from exc
    finally:
        sys.path.remove(str(path.parent))
    return module


def call(fn: Callable, ref: str, kwargs: dict[str, Any]) -> Any:
    """Call a user's factory; whatever it raises becomes one line naming the call."""
    try:
        return fn(**kwargs)
    except Exception as exc:
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise MultinetError(f"{ref}({shown}) raised {first_line(exc)}") from exc


def parse_model_args(items: list[str]) -> dict[str, Any]:
    """``["width=8", "weights=None"]`` -> ``{"width": 8, "weights": None}``.

    Values are YAML scalars (8, 0.5, true, null, text); Python's ``None`` also means None, since
    that is how a factory's documentation writes it.
    """
    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise MultinetError(f"--model-arg {item!r} must look like key=value, e.g. width=8")
        try:
            kwargs[key] = None if value == "None" else yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            raise MultinetError(f"--model-arg {item!r}: the value is not a YAML scalar") from None
    return kwargs


def load_target(target: str, checkpoint: str | None = None, dataset: str = "digits", *,
                args: dict[str, Any] | None = None, base_dir: str | Path | None = None) -> torch.nn.Module:
    """``zoo:NAME``, ``package.module:factory``, ``path/to/file.py:factory`` or a ``.mnet`` file -> a module in eval mode.

    ``args`` are keyword arguments of a factory; ``checkpoint`` a state dict (read tensors-only) to
    load into the model; relative paths resolve from ``base_dir`` when given.
    """
    args = dict(args or {})
    checkpoint = str(resolve_path(checkpoint, base_dir)) if checkpoint else None
    if ":" not in target:
        return _saved_model(str(resolve_path(target, base_dir)), checkpoint, args)
    module_part, name = target.rsplit(":", 1)
    if module_part == "zoo":
        from .. import zoo

        _no_args(args, target)
        if checkpoint:
            return _with_checkpoint(zoo.build(name, dataset), checkpoint)
        return zoo.create(name, dataset)
    model = call(resolve_callable(target, base_dir), target, args)
    if not isinstance(model, torch.nn.Module):
        raise MultinetError(f"{target} returned {type(model).__name__}, not a torch.nn.Module")
    return _with_checkpoint(model, checkpoint) if checkpoint else model.eval()


def _saved_model(path: str, checkpoint: str | None, args: dict[str, Any]) -> torch.nn.Module:
    """A model saved whole: a ``.mnet`` file is read; pickled modules and export archives are refused."""
    if path.endswith(".mnet"):
        from .modelfile import load

        if checkpoint:
            raise MultinetError("a .mnet file holds its own weights; drop --checkpoint")
        _no_args(args, path)
        return load(path)
    if path.endswith(".pt2"):
        raise MultinetError(f"{path}: torch.export archives are not read (torch.export.load falls back to "
                            f"unpickling, which can run code, and its ATen graph has no layers to compress); give "
                            f"the model's factory and a state dict, or a .mnet file (multinet.save)")
    if path.endswith(PICKLED_MODEL_SUFFIXES):
        raise MultinetError(_pickled_hint(path))
    raise MultinetError(f"model {path!r} must be zoo:NAME or module.path:factory, path/to/file.py:factory "
                        f"or a saved .mnet file")


def _pickled_hint(path: str) -> str:
    """Why a .pt model is refused, and what to give instead (a state dict is named as such)."""
    if not Path(path).is_file():
        return f"model file {path!r} does not exist"
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception:
        state = None
    if isinstance(state, dict):
        return (f"{path} holds a state dict, not a model: give the model's factory (module:factory or "
                f"file.py:factory) and pass this file as its checkpoint (--checkpoint)")
    return (f"{path}: multinet does not unpickle whole models (unpickling can run code); save "
            f"model.state_dict() and give it with the model's factory as checkpoint, or save a .mnet file "
            f"(multinet.save)")


def _no_args(args: dict[str, Any], target: str) -> None:
    if args:
        raise MultinetError(f"model arguments ({', '.join(args)}) apply to a factory, not to {target}")


def _with_checkpoint(model: torch.nn.Module, path: str) -> torch.nn.Module:
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise MultinetError(f"checkpoint {path!r} does not exist") from None
    except Exception as exc:
        raise MultinetError(f"checkpoint {path!r} cannot be read as tensors: {str(exc).splitlines()[0]}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        raise MultinetError(f"checkpoint {path!r} does not fit {type(model).__name__}: "
                            f"{str(exc).splitlines()[1 if len(str(exc).splitlines()) > 1 else 0].strip()}") from exc
    return model.eval()
