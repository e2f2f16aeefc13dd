"""The calibration rows' NaN/Inf check as a mask as large as the rows (before a2a81ba) or by their sum
(``solve.problem.all_finite``), timed in pairs in one process, in units of one plain pass.

    python benchmarks/finite_check.py zoo-resnet 1024 8 15      # model images size rounds (as scale.py builds them)
    python benchmarks/finite_check.py resnet50 64 112 3

Each round runs both checks, in alternating order; every run's removed channels are compared with the
first run's, so "same channels" covers every round of both.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import multinet
import multinet.calib.stats as calib_stats
from multinet import data
from scale import build, calibration_images

CHECKS = {"mask": lambda t: bool(torch.isfinite(t).all()), "sum": calib_stats.all_finite}


def plain_pass(model, x: torch.Tensor, repeats: int = 5) -> float:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            for i in range(0, len(x), 32):
                model(x[i:i + 32])
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("images", type=int)
    parser.add_argument("size", type=int)
    parser.add_argument("rounds", type=int)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    model, example = build(args.model, args.size)
    torch.manual_seed(0)
    x = data.load("digits").train_x[:1024] if args.model == "zoo-resnet" else calibration_images(example, args.images)
    options = dict(batch_size=32, max_positions=64, eval_samples=len(x), ratio=0.3)
    first = multinet.compress(model, x, **options).removed_channels()  # warm-up, and the channels to match
    seconds = {k: [] for k in CHECKS}
    stats_seconds = {k: [] for k in CHECKS}
    same = True
    for i in range(args.rounds):
        for name in (list(CHECKS) if i % 2 == 0 else list(CHECKS)[::-1]):
            calib_stats.all_finite = CHECKS[name]
            start = time.perf_counter()
            result = multinet.compress(model, x, **options)
            seconds[name].append(time.perf_counter() - start)
            stats_seconds[name].append(result.cost.seconds["statistics"])
            same &= result.removed_channels() == first
    calib_stats.all_finite = CHECKS["sum"]
    unit = plain_pass(model, x)
    for name in CHECKS:
        print(f"{name}: run {statistics.median(seconds[name]) / unit:.2f} passes, "
              f"statistics {statistics.median(stats_seconds[name]) / unit:.2f} passes")
    ratios = sorted(a / b for a, b in zip(seconds["sum"], seconds["mask"]))
    print(f"paired run time sum / mask: median {statistics.median(ratios):.3f}, "
          f"{sum(r < 1 for r in ratios)} of {len(ratios)} below 1; same channels in every run: {same}")


if __name__ == "__main__":
    main()
