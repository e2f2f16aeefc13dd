"""Two implementations of one step of a compression run, timed in pairs in one process.

The machine is shared and noisy: a change worth 5-10 % of a run is invisible between two processes.
Each round runs every variant once, in alternating order, and the verdict is the median of the
rounds' paired ratios. Every run's removed channels are compared with the warm-up run's.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch

import multinet
from multinet import data
from scale import build, calibration_images


def plain_pass(model, x: torch.Tensor, repeats: int = 5) -> float:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            for i in range(0, len(x), 32):
                model(x[i:i + 32])
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def arguments(doc: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("images", type=int)
    parser.add_argument("size", type=int)
    parser.add_argument("rounds", type=int)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def compare(args: argparse.Namespace, variants: dict[str, Callable[[], None]], before: str, after: str) -> None:
    """``variants``: name -> a function that installs that implementation. Prints each variant's run
    and statistics in plain passes and the paired ``after`` / ``before`` run-time ratio."""
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    model, example = build(args.model, args.size)
    torch.manual_seed(0)
    x = data.load("digits").train_x[:1024] if args.model == "zoo-resnet" else calibration_images(example, args.images)
    options = dict(batch_size=32, max_positions=64, eval_samples=len(x), ratio=0.3)
    variants[after]()
    first = multinet.compress(model, x, **options).removed_channels()  # warm-up, and the channels to match
    seconds = {k: [] for k in variants}
    stats_seconds = {k: [] for k in variants}
    same = True
    for i in range(args.rounds):
        for name in (list(variants) if i % 2 == 0 else list(variants)[::-1]):
            variants[name]()
            start = time.perf_counter()
            result = multinet.compress(model, x, **options)
            seconds[name].append(time.perf_counter() - start)
            stats_seconds[name].append(result.cost.seconds["statistics"])
            same &= result.removed_channels() == first
    variants[after]()
    unit = plain_pass(model, x)
    for name in variants:
        print(f"{name}: run {statistics.median(seconds[name]) / unit:.2f} passes, "
              f"statistics {statistics.median(stats_seconds[name]) / unit:.2f} passes")
    ratios = sorted(a / b for a, b in zip(seconds[after], seconds[before]))
    print(f"paired run time {after} / {before}: median {statistics.median(ratios):.3f}, "
          f"{sum(r < 1 for r in ratios)} of {len(ratios)} below 1; same channels in every run: {same}")
