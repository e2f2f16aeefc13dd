"""Export a model for deployment: ONNX (through torch's dynamo exporter) or a torch.export program."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from ..graph.tracing import as_tuple
from .files import atomic_path
from .modelfile import ModelFileError

EXPORT_FORMATS = ("torch.export", "onnx")


def export(model: nn.Module, example_inputs, path: str | os.PathLike, format: str = "onnx") -> Path:
    """Export a model (compressed, MultiNet, loaded .mnet) for deployment: ``torch.export``
    (an ExportedProgram file) or ONNX (opset from torch's exporter; the batch size is dynamic)."""
    if format not in EXPORT_FORMATS:
        raise ModelFileError(f"unknown export format {format!r}; choose from {', '.join(EXPORT_FORMATS)}")
    inputs = as_tuple(example_inputs)
    model = model.eval()
    with atomic_path(path) as tmp:
        if format == "torch.export":
            program = torch.export.export(model, inputs)
            torch.export.save(program, tmp)
        else:
            import importlib.util

            if not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript")):
                raise ModelFileError("ONNX export needs the onnx and onnxscript packages (pip install onnx "
                                     "onnxscript)")
            batch = torch.export.Dim("batch")
            shapes = tuple({0: batch} for _ in inputs)
            try:
                program = torch.onnx.export(model, inputs, dynamic_shapes=shapes, dynamo=True, verbose=False)
            except Exception as exc:
                raise ModelFileError(f"this graph does not export to ONNX: {str(exc).strip().splitlines()[0]}") from exc
            program.save(tmp)
    return Path(path)
