"""The auto schedule's plans on every zoo model: accuracy, final-output error and masked evaluations.

    python benchmarks/auto_probes.py OUT.json

For each zoo model the one-shot statistics and curves are prepared once; the auto schedule plans
70 / 50 / 30 % of the FLOPs, each plan is applied with sequential reconstruction, and the held-out
digits accuracy (360 images: one image is 0.28 pt), the plan's evaluated final-output error and the
search's masked evaluations (in passes over the 1,024 evaluation samples) are written to OUT.json.
Run it at two commits to compare how the probes are measured (benchmarks/results/auto_probes.md).
"""
from __future__ import annotations

import json
import sys
import time
import warnings

import torch

import multinet
from multinet import Budget, data, trace, zoo
from multinet.schedule import make_plan, prepare


def main() -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    split = data.load("digits")
    calib = split.train_x[:1024]
    out = {}
    for name in zoo.names():
        start = time.perf_counter()
        ctx = prepare(trace(zoo.create(name), calib[:1]), calib, Budget(flops=0.5), batch_size=128, max_positions=64)
        for budget in (0.7, 0.5, 0.3):
            plan = make_plan(ctx, "auto", budget=Budget(flops=budget))
            model = multinet.compress(zoo.create(name), calib, plan=plan, max_positions=64).model
            # the plan's error on every evaluation sample (the search itself may check it on fewer)
            error = ctx.masked.errors_from_prefix([plan.removals()])[0]
            out[f"{name} {budget}"] = (data.accuracy(model, split.test_x, split.test_y), error, plan.evaluations)
            print(name, budget, "accuracy %.4f, error %.5f, evaluations %.1f" % out[f"{name} {budget}"], flush=True)
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
