"""Export a model for deployment: ONNX (through torch's dynamo exporter) or a torch.export program.

Both formats get a dynamic batch dimension, and ONNX inputs and outputs are named (a MultiNet's
outputs after its member models), so a serving pipeline can address them by name. A MultiNet is
exported fused (parallel layers as one wider layer; see multinet/unification/fusion.py).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from ..graph.capture import batch_of_two
from ..graph.tracing import as_tuple
from .files import atomic_path
from .modelfile import ModelFileError

EXPORT_FORMATS = ("torch.export", "onnx")


def export(model: nn.Module, example_inputs, path: str | os.PathLike, format: str = "onnx") -> Path:
    """Export a model (compressed, MultiNet, loaded .mnet) for deployment: ``torch.export``
    (an ExportedProgram file) or ONNX (opset from torch's exporter). In both the batch size is
    dynamic; ONNX inputs are named ``input`` (``input0``, ``input1``... for several) and outputs
    ``output``, or after the keys of a dict output (a MultiNet's member models)."""
    if format not in EXPORT_FORMATS:
        raise ModelFileError(f"unknown export format {format!r}; choose from {', '.join(EXPORT_FORMATS)}")
    if format == "onnx":
        require_onnx()
    inputs = batch_of_two(as_tuple(example_inputs))
    names = output_names(model, inputs)
    model = _deployable(model).eval()
    shapes = _dynamic_batch(inputs)
    with atomic_path(path) as tmp:
        try:
            if format == "torch.export":
                torch.export.save(torch.export.export(model, inputs, dynamic_shapes=shapes), tmp)
            else:
                with _quiet_exporter():
                    program = torch.onnx.export(model, inputs, dynamic_shapes=shapes, dynamo=True, verbose=False,
                                                input_names=input_names(inputs),
                                                output_names=names)
                program.save(tmp)
        except ModelFileError:
            raise
        except Exception as exc:
            raise ModelFileError(f"this graph does not export to {format}: {_first_line(exc)}") from exc
    return Path(path)


def require_onnx() -> None:
    """Refuse ONNX export up front when its packages are missing (before any work that would feed it)."""
    if not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript")):
        raise ModelFileError("ONNX export needs the onnx and onnxscript packages (pip install onnx onnxscript)")


def input_names(inputs: tuple) -> list[str]:
    return ["input"] if len(inputs) == 1 else [f"input{i}" for i in range(len(inputs))]


def _deployable(model: nn.Module) -> nn.Module:
    """What is exported: a MultiNet's fused graph (one wide network, same outputs; pools kept as pools for
    the runtime's own kernels), else the model."""
    from ..unification.multinet import MultiNet

    return model.fused(export=True).graph_module if isinstance(model, MultiNet) else model


def output_names(model: nn.Module, inputs: tuple) -> list[str]:
    """A MultiNet's output names (its members': ``a``, ``b.0``...); else ``output`` for one tensor,
    or each leaf named by its path."""
    from ..unification.multinet import MultiNet

    if isinstance(model, MultiNet):
        return model.output_names()
    with torch.no_grad():
        leaves = pytree.tree_flatten_with_path(model(*inputs))[0]
    if len(leaves) == 1 and not leaves[0][0]:
        return ["output"]
    return [".".join(str(_key(k)) for k in path) or f"output{i}" for i, (path, _) in enumerate(leaves)]


def _key(entry) -> object:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def _dynamic_batch(inputs: tuple) -> tuple:
    batch = torch.export.Dim("batch", min=1)
    return tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() else None for x in inputs)


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide the exporter's log lines (one per torchvision op it skips) and torch's own deprecation
    warnings: noise in a user's output that they cannot act on."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
