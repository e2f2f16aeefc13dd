"""The user's own calibration and evaluation data, named by one string (a *data spec*).

* ``digits`` / ``mnist``: the built-in sets (:mod:`multinet.io.data`), their fixed split.
* ``x.npy``: inputs only. ``x.npz``: inputs from an array named ``x``, ``inputs`` or ``images``
  (or the file's only array), labels (optional) from ``y``, ``labels`` or ``targets``.
* ``x.pt`` (read with ``weights_only=True``): a tensor, an ``(x, y)`` tuple or a dict with the
  npz names.
* a folder of images (:mod:`multinet.io.images`): a subfolder per class gives labels.
* ``package.module:function`` / ``path/to/file.py:function``: called without arguments; it
  returns a tensor, an ``(x, y)`` tuple, a map-style ``Dataset`` of samples, or an iterable of
  batches (tensors or ``(x, y)`` pairs, e.g. a DataLoader).

Arrays and tensors reach the model as they are (float32). One source is split once, seeded,
into 80 % calibration and 20 % evaluation; with a separate evaluation source each is used whole.
Without labels, evaluation compares with the original model's outputs instead of labels.
"""
from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..errors import InputShapeError, MultinetError
from . import data
from .images import ImageOptions, read_folder
from .sources import anchor, call, first_line, resolve_callable, resolve_path

INPUT_KEYS = ("x", "inputs", "images")
LABEL_KEYS = ("y", "labels", "targets")
FILE_SUFFIXES = (".npy", ".npz", ".pt", ".pth")
Samples = tuple[torch.Tensor, torch.Tensor | None]


def anchor_data(spec: str, base_dir: str | Path) -> str:
    """A spec with its path made absolute from ``base_dir``; built-in names and module references stay."""
    return spec if spec in data.DATASETS else anchor(spec, base_dir)


def is_folder(spec: str, base_dir: str | Path | None = None) -> bool:
    return spec not in data.DATASETS and ":" not in spec and resolve_path(spec, base_dir).is_dir()


def load_data(spec: str, *, eval_spec: str | None = None, base_dir: str | Path | None = None,
              images: ImageOptions = ImageOptions(), eval_fraction: float = 0.2, seed: int = 0) -> data.Split:
    """Calibration (``train_*``) and evaluation (``test_*``) data from one or two specs.

    Built-in names keep their fixed split; one user source is split once (seeded, ``eval_fraction``
    held out); with ``eval_spec`` the calibration source is used whole and so is the evaluation one.
    """
    check_image_options(images, spec, eval_spec, base_dir=base_dir)
    if eval_spec is None:
        if spec in data.DATASETS:
            return data.load(spec)
        return _split(read(spec, base_dir=base_dir, images=images), eval_fraction, seed, spec)
    calib_x, calib_y = _whole(spec, base_dir, images, part="train")
    eval_x, eval_y = _whole(eval_spec, base_dir, images, part="test")
    return data.Split(calib_x, calib_y, eval_x, eval_y, _classes(calib_y, eval_y))


def check_image_options(images: ImageOptions, *specs: str | None, base_dir: str | Path | None = None) -> None:
    """Image options only mean something for a folder of images; given for anything else, they are a mistake."""
    if images.given and not any(is_folder(s, base_dir) for s in specs if s):
        shown = " or ".join(repr(s) for s in specs if s)
        raise MultinetError(f"image options (size, channels, mean, std) apply to a folder of images; {shown} is not one")


def read(spec: str, *, base_dir: str | Path | None = None, images: ImageOptions = ImageOptions()) -> Samples:
    """All samples of one user source, as (inputs, labels or None)."""
    if ":" in spec:
        fn = resolve_callable(spec, base_dir)
        return _from_object(call(fn, spec, {}), spec)
    path = resolve_path(spec, base_dir)
    if path.is_dir():
        return _checked(*read_folder(path, images), spec)
    if not path.exists():
        if path.suffix.lower() in FILE_SUFFIXES:
            raise MultinetError(f"data file {spec!r} does not exist")
        raise MultinetError(f"data {spec!r} is neither a built-in dataset ({', '.join(data.DATASETS)}) nor an "
                            f"existing file or folder")
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        return _from_numpy(path, spec)
    if suffix in (".pt", ".pth"):
        return _from_torch_file(path, spec)
    raise MultinetError(f"cannot read data from {spec!r}: give a .npy, .npz or .pt file, a folder of images, "
                        f"module:function, or a built-in name ({', '.join(data.DATASETS)})")


def check_fit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None, what: str) -> None:
    """Two samples through the model first, so a shape or label mismatch fails in one line before any work.

    ``what`` names the data in messages, e.g. "the data.npz inputs".
    """
    try:
        with torch.no_grad():
            out = model.eval()(x[:2])
    except MultinetError:
        raise
    except Exception as exc:
        shape = "x".join(str(n) for n in x.shape[1:])
        raise InputShapeError(f"{what} ({shape} per sample) do not fit the model: {first_line(exc)}") from None
    if y is None:
        return
    classes = int(y.max()) + 1
    for o in out.values() if isinstance(out, dict) else [out]:
        if not isinstance(o, torch.Tensor) or o.ndim != 2 or o.shape[1] < classes:
            shape = tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__
            raise MultinetError(f"the model's output {shape} does not fit the labels of {what} (classes "
                                f"0..{classes - 1}: it needs N x {classes} or more scores)")


def _whole(spec: str, base_dir, images: ImageOptions, part: str) -> Samples:
    """A source used whole: a built-in name gives its train or test part."""
    if spec in data.DATASETS:
        split = data.load(spec)
        return (split.train_x, split.train_y) if part == "train" else (split.test_x, split.test_y)
    return read(spec, base_dir=base_dir, images=images)


def _split(samples: Samples, fraction: float, seed: int, spec: str) -> data.Split:
    """A seeded shuffle, then the last ``fraction`` (at least one sample) held out for evaluation."""
    x, y = samples
    if len(x) < 2:
        raise MultinetError(f"{spec} holds {len(x)} sample; splitting it into calibration and evaluation needs at "
                            f"least 2 (or give evaluation data separately)")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = len(x) - max(1, round(len(x) * fraction))
    cal, ev = order[:cut], order[cut:]
    return data.Split(x[cal], y[cal] if y is not None else None, x[ev], y[ev] if y is not None else None,
                      _classes(y))


def _classes(*labels: torch.Tensor | None) -> int | None:
    present = [y for y in labels if y is not None]
    return max(int(y.max()) + 1 for y in present) if present else None


def _from_numpy(path: Path, spec: str) -> Samples:
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise MultinetError(f"cannot read {spec} as NumPy arrays: {first_line(exc)}") from None
    if isinstance(loaded, np.ndarray):
        return _checked(loaded, None, spec)
    with loaded:
        return _from_mapping({k: loaded[k] for k in loaded.files}, spec)


def _from_torch_file(path: Path, spec: str) -> Samples:
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise MultinetError(f"cannot read {spec} as tensors: it holds other pickled objects, which are not loaded "
                            f"(that can run code); save a tensor, an (x, y) tuple or a dict of tensors") from None
    except Exception as exc:
        raise MultinetError(f"cannot read {spec} as tensors: {first_line(exc)}") from None
    if isinstance(obj, (torch.Tensor, Mapping)) or (isinstance(obj, (tuple, list)) and len(obj) == 2):
        return _from_object(tuple(obj) if isinstance(obj, list) else obj, spec)
    raise MultinetError(f"{spec} holds {type(obj).__name__}; expected a tensor, an (x, y) pair or a dict with "
                        f"{'/'.join(INPUT_KEYS)} and optionally {'/'.join(LABEL_KEYS)}")


def _from_mapping(arrays: Mapping, spec: str) -> Samples:
    """Inputs and optional labels by name (or a mapping's only array as the inputs)."""
    x_key = next((k for k in INPUT_KEYS if k in arrays), None)
    if x_key is None and len(arrays) == 1:
        x_key = next(iter(arrays))
    if x_key is None:
        raise MultinetError(f"{spec} has {', '.join(map(str, arrays)) or 'no arrays'}; multinet reads inputs from "
                            f"{', '.join(INPUT_KEYS)} and labels (optional) from {', '.join(LABEL_KEYS)}")
    y_key = next((k for k in LABEL_KEYS if k in arrays), None)
    return _checked(arrays[x_key], arrays[y_key] if y_key else None, spec)


def _from_object(obj, spec: str) -> Samples:
    """What a data function returned (or a .pt file held) -> samples."""
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return _checked(obj, None, spec)
    if isinstance(obj, Mapping):
        return _from_mapping(obj, spec)
    if isinstance(obj, tuple) and len(obj) == 2:
        return _checked(obj[0], obj[1], spec)
    if isinstance(obj, torch.utils.data.Dataset) and hasattr(obj, "__len__"):
        return _stacked([obj[i] for i in range(len(obj))], spec, torch.stack)
    if hasattr(obj, "__iter__"):
        return _stacked(list(obj), spec, torch.cat)
    raise MultinetError(f"{spec} returned {type(obj).__name__}; expected a tensor, an (x, y) tuple, a Dataset or "
                        f"an iterable of batches")


def _stacked(items: list, spec: str, join) -> Samples:
    """Samples (``join=torch.stack``) or batches (``torch.cat``), each a tensor or an (x, y) pair."""
    if not items:
        raise MultinetError(f"{spec} gave no samples")
    pairs = [tuple(i) if isinstance(i, (tuple, list)) else (i, None) for i in items]
    if any(len(p) != 2 for p in pairs) or len({p[1] is None for p in pairs}) > 1:
        raise MultinetError(f"{spec}: every item must be inputs or an (inputs, label) pair, all alike")
    try:
        x = join([torch.as_tensor(p[0]) for p in pairs])
        y = None if pairs[0][1] is None else join([torch.as_tensor(p[1]).reshape(-1 if join is torch.cat else ())
                                                   for p in pairs])
    except (RuntimeError, TypeError, ValueError) as exc:
        raise MultinetError(f"{spec}: its items cannot be put in one tensor ({first_line(exc)})") from None
    return _checked(x, y, spec)


def _checked(x, y, spec: str) -> Samples:
    """Float32 inputs with a batch dimension, and int64 labels of the same length (or None)."""
    x = _tensor(x, spec, "inputs")
    if x.ndim < 2 or len(x) == 0 or x.is_complex():
        raise MultinetError(f"inputs in {spec} have shape {tuple(x.shape)} ({x.dtype}); they need real numbers, "
                            f"a batch dimension first and at least one sample (N x ...)")
    if y is None:
        return x.float(), None
    y = _tensor(y, spec, "labels")
    if y.ndim != 1 or len(y) != len(x):
        raise MultinetError(f"labels in {spec} have shape {tuple(y.shape)} for {len(x)} inputs; they need one "
                            f"class index per input")
    if y.is_complex() or (y.is_floating_point() and not torch.equal(y, y.round())) or (y < 0).any():
        raise MultinetError(f"labels in {spec} must be class indices 0, 1, 2, ...")
    return x.float(), y.long()


def _tensor(value, spec: str, what: str) -> torch.Tensor:
    """A tensor of ``value`` (NumPy arrays copied, so read-only arrays are fine); text is refused."""
    try:
        return torch.as_tensor(np.array(value) if isinstance(value, np.ndarray) else value)
    except (TypeError, RuntimeError, ValueError):
        raise MultinetError(f"{what} in {spec} must be numbers, got {getattr(value, 'dtype', type(value).__name__)}") \
            from None
