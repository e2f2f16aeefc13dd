"""The reference model zoo, with checkpoints trained on the built-in datasets.

``create("resnet")`` returns the ResNet trained on digits; ``create("vgg", "mnist")`` the VGG
trained on MNIST (where that checkpoint was trained); ``pretrained=False`` gives random weights.
Checkpoints hold tensors only and load with ``weights_only=True``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import MultinetError
from .models import MODELS

CHECKPOINTS = Path(__file__).parent / "checkpoints"
IMAGE_SIZE = {"digits": 8, "mnist": 28}


def names() -> list[str]:
    return list(MODELS)


def example_input(dataset: str = "digits", batch: int = 2) -> torch.Tensor:
    side = _image_size(dataset)
    return torch.zeros(batch, 1, side, side)


def _image_size(dataset: str) -> int:
    if dataset not in IMAGE_SIZE:
        raise MultinetError(f"unknown dataset {dataset!r}; choose from {', '.join(IMAGE_SIZE)}")
    return IMAGE_SIZE[dataset]


def build(name: str, dataset: str = "digits") -> torch.nn.Module:
    """An untrained zoo model sized for ``dataset``."""
    if name not in MODELS:
        raise MultinetError(f"unknown zoo model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name](in_channels=1, image_size=_image_size(dataset), num_classes=10)


def checkpoint_path(name: str, dataset: str = "digits") -> Path:
    return CHECKPOINTS / dataset / f"{name}.pt"


def create(name: str, dataset: str = "digits", pretrained: bool = True) -> torch.nn.Module:
    model = build(name, dataset)
    if pretrained:
        path = checkpoint_path(name, dataset)
        if not path.exists():
            raise MultinetError(f"no trained checkpoint for {name!r} on {dataset!r} ({path}); "
                                f"run `python -m multinet.zoo.train --dataset {dataset}`")
        model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    return model.eval()


def recorded_accuracy(dataset: str = "digits") -> dict[str, float]:
    """Test accuracies written by the training script next to the checkpoints."""
    path = CHECKPOINTS / dataset / "manifest.json"
    return {k: v["test_accuracy"] for k, v in json.loads(path.read_text()).items()} if path.exists() else {}
