"""Batch inference over a dataset: per-model outputs of a MultiNet (or the output of any model)."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from .calib import iterate_batches
from .errors import MultinetError
from .progress import Bar


def infer(net: nn.Module, data, batch_size: int = 256, device: str = "cpu", progress: bool = False):
    """Run ``net`` over ``data`` (a tensor, a list of batches or a DataLoader) in batches.

    Returns the outputs concatenated along the batch: for a MultiNet {model name: output}, for a
    plain model its output. The network is moved to ``device``; inputs are moved batch by batch.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MultinetError(f"device {device!r} requested, but this machine has no CUDA device")
    net = net.to(dev).eval()
    total = len(data) if isinstance(data, torch.Tensor) else None
    bar = Bar(progress, total or 0, "inference")
    parts, spec = [], None
    try:
        with torch.no_grad():
            for batch in iterate_batches(data, batch_size):
                out = net(batch.to(dev))
                leaves, tree = pytree.tree_flatten(out)
                if spec is None:
                    spec = tree
                    if not all(isinstance(t, torch.Tensor) for t in leaves):
                        raise MultinetError("the network returns something other than tensors; cannot collect outputs")
                parts.append([t.cpu() for t in leaves])
                bar.advance(len(batch))
    finally:
        bar.close()
    joined = [torch.cat(column) for column in zip(*parts)]
    return pytree.tree_unflatten(joined, spec)
