"""Compress one submodule of a model that does not trace as a whole (a detector's backbone and FPN).

A torchvision detector's forward resizes and batches its images, makes anchors and runs NMS: data-dependent
Python that neither torch.fx nor torch.export captures, so the model cannot be compressed as one graph.
Its backbone and FPN, where nearly all of its FLOPs are, trace like any CNN. ``compress(detector, images,
submodule="backbone")`` runs the whole model once over the calibration data with a hook that records
what the submodule receives (the resized, normalised, padded images), compresses the submodule on those
inputs, and puts the result into a copy of the model. The submodule's outputs, which the rest of the model
reads, keep every channel (they are its model outputs), so the rest needs no change.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..calib import batches
from ..calib.stats import iterate_batches
from ..errors import MultinetError

# attribute types copied from the submodule onto the compressed graph (what the rest of a model may read
# from it: torchvision's BackboneWithFPN.out_channels)
_PLAIN = (int, float, str, bool)


def find_submodule(model: nn.Module, path: str) -> nn.Module:
    """``model``'s submodule at ``path`` (dotted), or an error that lists the top-level children."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        children = ", ".join(name for name, _ in model.named_children()) or "none"
        raise MultinetError(f"the model has no submodule {path!r} (its children: {children})") from None


def submodule_inputs(model: nn.Module, path: str, data, batch_size: int) -> list:
    """What submodule ``path`` receives while ``model`` runs on each calibration batch: one batch each (its
    positional inputs; a tuple where it takes several). The model runs in eval mode and without gradients,
    and must call the submodule exactly once per batch."""
    target = find_submodule(model, path)
    captured: list = []

    def record(module, args, kwargs):
        if kwargs:
            raise MultinetError(f"`{path}` is called with keyword arguments ({', '.join(kwargs)}): only positional "
                                f"inputs can be recorded for its calibration")
        inputs = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        captured.append(inputs[0] if len(inputs) == 1 else inputs)

    training = [m.training for m in model.modules()]
    handle = target.register_forward_pre_hook(record, with_kwargs=True)
    model.eval()
    try:
        with torch.no_grad():
            for batch in iterate_batches(data, batch_size):
                before = len(captured)
                batches.call(model, batch)
                calls = len(captured) - before
                if calls != 1:
                    raise MultinetError(f"`{path}` ran {calls} times on one calibration batch; compress a submodule "
                                        f"the model calls once per input")
    finally:
        handle.remove()
        for module, was in zip(model.modules(), training):
            module.train(was)
    for inputs in captured:
        if not batches.is_batch(inputs):
            raise MultinetError(f"`{path}` receives {type(inputs).__name__} inputs, not tensors (or tuples of "
                                f"tensors): its calibration inputs cannot be recorded")
        batches.check_batch(inputs)
    return captured


def with_submodule(model: nn.Module, path: str, compressed: nn.Module) -> nn.Module:
    """A copy of ``model`` with ``compressed`` at ``path``; the plain attributes (numbers, strings) of the
    submodule it replaces are copied onto ``compressed`` where it has none of that name."""
    original = find_submodule(model, path)
    for name, value in vars(original).items():
        if not name.startswith("_") and isinstance(value, _PLAIN) and not hasattr(compressed, name):
            setattr(compressed, name, value)
    whole = copy.deepcopy(model)
    parent_path, _, leaf = path.rpartition(".")
    parent = whole.get_submodule(parent_path) if parent_path else whole
    setattr(parent, leaf, compressed)
    return whole
