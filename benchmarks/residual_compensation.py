"""Residual-stream writers aimed at original output + stream drift, against aimed at their own output only.

    python benchmarks/residual_compensation.py [--dataset digits] [--models resnet mobilenet] [--threads 2]

The same REAP run (sequential mode) with ``RunOptions(compensate_residuals=True)`` (the default)
and ``False``; accuracy on the held-out test split, no fine-tuning. Two tables: every prunable group
at the same ratio (every stream is then pruned first, which re-solves its readers, so the writers
keep aiming at their own outputs and nothing changes), and FLOPs budgets with the auto schedule and
``residual_streams=False`` (the streams stay whole: the writers cancel their drift). Only models
with residual streams are affected (the zoo's resnet and mobilenet).
The MiniLM side of the same switch is in ``benchmarks/transformers.py --compare-compensation``.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

import multinet
from multinet import data, zoo

RATIOS = (0.3, 0.5, 0.7, 0.8, 0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--models", nargs="*", default=["resnet", "mobilenet"])
    parser.add_argument("--calibration", type=int, default=1024)
    parser.add_argument("--ratios", nargs="*", type=float, default=RATIOS)
    parser.add_argument("--budgets", nargs="*", type=float, default=[0.5, 0.3, 0.15])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*calibration rows.*")
    split = data.load(args.dataset)
    calib = split.train_x[: args.calibration]
    print(f"{args.dataset}: {len(calib)} calibration images, {len(split.test_x)} test images, "
          f"{args.threads} threads; REAP, sequential mode, max_positions 64\n")
    print("| model | removed per group | FLOPs kept | accuracy: stream drift compensated | own output only | "
          "difference (pt) | seconds (on / off) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        model = zoo.create(name, args.dataset)
        base = data.accuracy(model, split.test_x, split.test_y)
        print(f"| {name} | 0 % | 100 % | {base:.4f} | {base:.4f} | – | – |")
        for ratio in args.ratios:
            accuracy, seconds = {}, {}
            for compensate in (True, False):
                start = time.perf_counter()
                options = multinet.RunOptions(max_positions=64, compensate_residuals=compensate)
                result = multinet.compress(model, calib, ratio=ratio, options=options)
                seconds[compensate] = time.perf_counter() - start
                accuracy[compensate] = data.accuracy(result.model, split.test_x, split.test_y)
            kept = result.flops_after / result.flops_before
            print(f"| {name} | {ratio:.0%} | {kept:.1%} | {accuracy[True]:.4f} | {accuracy[False]:.4f} | "
                  f"{(accuracy[True] - accuracy[False]) * 100:+.1f} | {seconds[True]:.1f} / {seconds[False]:.1f} |",
                  flush=True)
    print("\nFLOPs budgets, auto schedule, residual streams left whole (`Budget(flops=f, residual_streams=False)`)\n")
    print("| model | FLOPs kept | accuracy: stream drift compensated | own output only | difference (pt) |")
    print("|---|---:|---:|---:|---:|")
    for name in args.models:
        model = zoo.create(name, args.dataset)
        for fraction in args.budgets:
            accuracy = {}
            try:
                for compensate in (True, False):
                    options = multinet.RunOptions(max_positions=64, compensate_residuals=compensate)
                    budget = multinet.Budget(flops=fraction, residual_streams=False)
                    result = multinet.compress(model, calib, budget=budget, options=options)
                    accuracy[compensate] = data.accuracy(result.model, split.test_x, split.test_y)
            except multinet.BudgetError as exc:  # the streams alone cost more than the budget
                print(f"| {name} | {fraction:.0%} asked: {str(exc).split(':')[0]} | | | |")
                continue
            print(f"| {name} | {result.flops_after / result.flops_before:.1%} | {accuracy[True]:.4f} | "
                  f"{accuracy[False]:.4f} | {(accuracy[True] - accuracy[False]) * 100:+.1f} |", flush=True)


if __name__ == "__main__":
    main()
