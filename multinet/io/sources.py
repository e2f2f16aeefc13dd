"""Where models and data come from: zoo names, ``module:factory`` references, saved model files."""
from __future__ import annotations

import importlib

import torch

from ..errors import MultinetError


def load_target(target: str, checkpoint: str | None, dataset: str) -> torch.nn.Module:
    """``zoo:NAME``, ``package.module:factory`` or a saved ``.mnet`` file -> an nn.Module in eval mode."""
    if target.endswith(".mnet"):
        from .modelfile import load

        if checkpoint:
            raise MultinetError("a .mnet file holds its own weights; drop --checkpoint")
        return load(target)
    if ":" not in target:
        raise MultinetError(f"model {target!r} must be zoo:NAME or module.path:factory")
    module_name, factory_name = target.split(":", 1)
    if module_name == "zoo":
        from .. import zoo

        if checkpoint:
            return _with_checkpoint(zoo.build(factory_name, dataset), checkpoint)
        return zoo.create(factory_name, dataset)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise MultinetError(f"cannot import {module_name!r}: {exc}") from exc
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise MultinetError(f"{module_name!r} has no callable {factory_name!r}")
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise MultinetError(f"{target} returned {type(model).__name__}, not a torch.nn.Module")
    return _with_checkpoint(model, checkpoint) if checkpoint else model.eval()


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
