"""Grouped convolutions without accuracy labels: output error of REAP vs magnitude on random ResNeXt/RegNetY.

    python benchmarks/grouped_conv.py [--out benchmarks/results/grouped_conv.md]

Two small models written out with the real topologies (He-initialised random weights, BatchNorm
statistics measured on random images and random BatchNorm affine parameters, so that activations keep
their scale through the depth as in a trained network): a ResNeXt (1x1 -> grouped 3x3 (8 groups) -> 1x1
bottlenecks with projection shortcuts, three stages) and a RegNetY (1x1 -> grouped 3x3 (group width 8)
-> squeeze-and-excitation -> 1x1). Calibration on random low-frequency images, error on other such
images: the squared error of the logits as a fraction of their variation around the mean logit. Each
method removes the same fraction of (a) only the groups that a grouped conv reads or writes, (b) only
the other groups (what compress could prune before), (c) every prunable group; and a FLOPs budget (auto
schedule, REAP) for comparison.
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import multinet

METHODS = ("reap", "magnitude+ls", "magnitude", "random")


def conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class ResNeXtBlock(nn.Module):
    def __init__(self, cin: int, width: int, cout: int, stride: int, groups: int):
        super().__init__()
        self.a, self.b, self.c = conv_bn(cin, width), conv_bn(width, width, 3, stride, groups), conv_bn(width, cout)
        self.down = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        y = self.c(F.relu(self.b(F.relu(self.a(x)))))
        return F.relu(y + (self.down(x) if self.down is not None else x))


class RegNetYBlock(nn.Module):
    def __init__(self, cin: int, width: int, stride: int, group_width: int):
        super().__init__()
        self.a, self.b = conv_bn(cin, width), conv_bn(width, width, 3, stride, width // group_width)
        self.se_reduce, self.se_expand = nn.Conv2d(width, max(cin // 4, 4), 1), nn.Conv2d(max(cin // 4, 4), width, 1)
        self.c = conv_bn(width, width)
        self.down = conv_bn(cin, width, 1, stride) if stride != 1 or cin != width else None

    def forward(self, x):
        y = F.relu(self.b(F.relu(self.a(x))))
        y = y * torch.sigmoid(self.se_expand(F.relu(self.se_reduce(F.adaptive_avg_pool2d(y, 1)))))
        return F.relu(self.c(y) + (self.down(x) if self.down is not None else x))


class Net(nn.Module):
    def __init__(self, blocks: list[nn.Module], width: int, classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 16, 3)
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.blocks(F.relu(self.stem(x))), 1).flatten(1))


def resnext() -> Net:
    g = 8
    blocks = [ResNeXtBlock(16, 32, 64, 1, g), ResNeXtBlock(64, 32, 64, 1, g),
              ResNeXtBlock(64, 64, 128, 2, g), ResNeXtBlock(128, 64, 128, 1, g),
              ResNeXtBlock(128, 128, 256, 2, g)]
    return Net(blocks, 256)


def regnety() -> Net:
    blocks = [RegNetYBlock(16, 32, 1, 8), RegNetYBlock(32, 32, 1, 8), RegNetYBlock(32, 64, 2, 8),
              RegNetYBlock(64, 64, 1, 8), RegNetYBlock(64, 128, 2, 8)]
    return Net(blocks, 128)


def randomized(model: nn.Module, seed: int, data: torch.Tensor) -> nn.Module:
    """He-initialised convs, BatchNorm statistics measured on ``data`` (so activations keep their scale,
    as in a trained network), then random BatchNorm affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=gen)
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the batches below
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for batch in data.split(128):
            model(batch)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.randn(m.weight.shape, generator=gen) * 0.3 + 1.0
            m.bias.data = torch.randn(m.bias.shape, generator=gen) * 0.3
    return model.eval()


def images(n: int, size: int) -> torch.Tensor:
    """Random low-frequency images (4x4 noise, bilinearly upsampled): unlike white noise they give a
    random network outputs that vary from image to image."""
    return F.interpolate(torch.randn(n, 3, 4, 4), size=size, mode="bilinear", align_corners=False)


def error(model: nn.Module, reference: torch.Tensor, x: torch.Tensor) -> float:
    """Squared error of the logits as a fraction of their variation around the mean logit (a constant
    output would score 1)."""
    with torch.no_grad():
        out = model(x)
    return float(((out - reference) ** 2).sum() / ((reference - reference.mean(0)) ** 2).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--held-out", type=int, default=512)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.25, 0.5])
    parser.add_argument("--out", default="benchmarks/results/grouped_conv.md")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*calibration rows.*")
    torch.manual_seed(0)
    calib, test = images(args.calibration, args.size), images(args.held_out, args.size)
    lines = [f"# Grouped convolutions: REAP vs magnitude, random weights ({args.calibration} calibration / "
             f"{args.held_out} held-out random low-frequency {args.size}x{args.size} images)", "",
             "Squared error of the logits on the held-out images as a fraction of their variation around the "
             "mean logit (lower is better; a constant output scores 1); sequential mode unless stated.", ""]
    for name, build in (("ResNeXt (8 conv groups)", resnext), ("RegNetY (group width 8, SE)", regnety)):
        torch.manual_seed(1)
        model = randomized(build(), 2, images(512, args.size))
        graph = multinet.trace(model, calib[:1])
        grouped = [g for g in graph.prunable_groups if g.grouped_conv]
        with torch.no_grad():
            reference = model(test)
        lines += [f"## {name}", "", f"{len(graph.prunable_groups)} prunable groups of {len(graph.groups)}, "
                  f"{len(grouped)} through grouped convs (before this change: left whole).", ""]
        lines += ["| groups | removed | FLOPs kept | " + " | ".join(METHODS) + " | REAP one-shot |",
                  "|---|---|---|" + "---|" * (len(METHODS) + 1)]
        others = [g for g in graph.prunable_groups if not g.grouped_conv]
        for scope in ("grouped only", "others only", "all"):
            for ratio in args.ratios:
                ratios = ({g.id: ratio for g in grouped} if scope == "grouped only" else
                          {g.id: ratio for g in others} if scope == "others only" else ratio)
                row, kept = [], None
                for method in METHODS:
                    start = time.perf_counter()
                    result = multinet.compress(model, calib, ratio=ratios, method=method, max_positions=64)
                    row.append(f"{error(result.model, reference, test):.4f}")
                    kept = result.flops_after / result.flops_before
                    print(f"{name} {scope} {ratio} {method}: {row[-1]} ({time.perf_counter() - start:.1f} s)",
                          flush=True)
                result = multinet.compress(model, calib, ratio=ratios, mode="oneshot", max_positions=64)
                row.append(f"{error(result.model, reference, test):.4f}")
                lines.append(f"| {scope} | {ratio:.0%} | {kept:.1%} | " + " | ".join(row) + " |")
        start = time.perf_counter()
        result = multinet.compress(model, calib, budget=multinet.Budget(flops=0.5), max_positions=64)
        sched = {gp.group: len(gp.removed) for gp in result.plan.groups}
        lines += ["", f"FLOPs budget 50 % (auto schedule, REAP): {result.flops_after / result.flops_before:.1%} kept, "
                  f"error {error(result.model, reference, test):.4f}; channels removed from the grouped-conv groups: "
                  + ", ".join(f"{sched.get(g.id, 0)}/{g.size}" for g in grouped)
                  + f" ({time.perf_counter() - start:.1f} s).", ""]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
