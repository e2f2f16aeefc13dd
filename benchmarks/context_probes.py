"""What the auto schedule's in-context re-probes cost, with and without the floor on a share's precision.

    python benchmarks/context_probes.py [--images 256] [--size 224] [--threads 2]

ResNet-50 (torchvision's topology, random weights: the groups' errors do not add, so the auto plan misses
its additive prediction and every group's share of it is measured again in its context). The scheduling
is prepared once (statistics, curves, the budget-independent probes); the auto plan for 50 % of the FLOPs
is then made twice from the same probes: with each share measured to 20 % of itself or of the plan's
error spread evenly over the groups (``CONTEXT_FLOOR_SHARE = 1``, the default), and to 20 % of itself
only (0). The table gives each search in units of one plain forward pass over the same images, the
masked evaluations in passes over the evaluation samples, and the plan's error on all of them.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

from multinet import Budget, trace
from multinet.schedule import make_plan, prepare, scheduler
from scale import build, calibration_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    model, example = build("resnet50", args.size)
    x = calibration_images(example, args.images)
    with torch.no_grad():
        start = time.perf_counter()
        for i in range(0, args.images, 32):
            model(x[i:i + 32])
        forward = time.perf_counter() - start
    ctx = prepare(trace(model, x[:1]), x, Budget(flops=0.5), batch_size=32, max_positions=64,
                  eval_samples=args.images)
    make_plan(ctx, "auto")  # the budget-independent probes, measured once for both rows
    print(f"ResNet-50, {args.images} images at {args.size}x{args.size}, {args.threads} threads; plain pass "
          f"{forward:.1f} s\n\n| in-context precision | search (passes) | masked evaluations | plan's error | "
          f"FLOPs kept |\n|---|---|---|---|---|", flush=True)
    for label, share in (("of the share or the average share", 1.0), ("of the share only", 0.0)):
        scheduler.CONTEXT_FLOOR_SHARE = share
        before, start = ctx.evaluations, time.perf_counter()
        plan = make_plan(ctx, "auto")
        seconds = time.perf_counter() - start
        error = ctx.masked.errors_from_prefix([plan.removals()])[0]
        print(f"| 20 % {label} | {seconds / forward:.1f} | {ctx.evaluations - before:.1f} | {error:.4e} | "
              f"{plan.predicted_cost / plan.original:.1%} |", flush=True)


if __name__ == "__main__":
    main()
