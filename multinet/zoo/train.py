"""Deterministic training of the zoo on a built-in dataset; writes checkpoints and a manifest.

    python -m multinet.zoo.train --dataset digits [--models resnet vgg] [--epochs 40]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from ..io import data
from . import CHECKPOINTS, build, names

EPOCHS = {"digits": 40, "mnist": 12}


def train_one(name: str, split: data.Split, dataset: str, epochs: int, seed: int = 0) -> tuple[torch.nn.Module, float]:
    torch.manual_seed(seed)
    model = fit(build(name, dataset), split.train_x, split.train_y, epochs, seed)
    return model, data.accuracy(model, split.test_x, split.test_y)


def fit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 0) -> torch.nn.Module:
    """The zoo's recipe (AdamW, one-cycle, batch 64, seeded order) for any model and labels."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * ((len(x) + 63) // 64))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", choices=data.DATASETS)
    parser.add_argument("--models", nargs="*", default=names())
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    split = data.load(args.dataset)
    out = CHECKPOINTS / args.dataset
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    epochs = args.epochs or EPOCHS[args.dataset]
    for name in args.models:
        start = time.time()
        model, acc = train_one(name, split, args.dataset, epochs)
        torch.save(model.state_dict(), out / f"{name}.pt")
        manifest[name] = {"test_accuracy": round(acc, 4), "epochs": epochs, "seed": 0,
                          "train_samples": len(split.train_x), "test_samples": len(split.test_x)}
        manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        print(f"{name:10s} test accuracy {acc:.4f}  ({time.time() - start:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
