"""Latency budgets, measured: does a compressed model meet the median latency it was asked for?

    python benchmarks/latency_budget.py [--threads 1]

Latency is a clock reading, so it is checked here and not in the tests (a busy CI box would make
a timed assertion flaky). For each model and target (a fraction of the original's median latency)
the table shows the target, what the plan measured, a longer re-measurement in this process, and
whether that lies within the budget's tolerance. Writes benchmarks/results/latency_budget.md.
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
import torch.nn as nn

import multinet
from multinet import Budget, data, trace, zoo
from multinet.schedule.latency import measure_ms


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 768), nn.ReLU(), nn.Linear(768, 768), nn.ReLU(), nn.Linear(768, 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*calibration rows.*")  # 512 samples on purpose: a quick check
    split = data.load("digits")
    cases = [("mlp-768", _mlp(), torch.randn(512, 256)), ("zoo vgg", zoo.create("vgg"), split.train_x[:512])]
    rows = []
    for name, model, x in cases:
        original = measure_ms(trace(model, x[:1]).module, x[: args.batch], repeats=51)
        for fraction in (0.7, 0.5):
            budget = Budget(latency_ms=fraction * original, latency_batch=args.batch, latency_tolerance=0.3)
            result = multinet.compress(model, x, budget=budget, eval_samples=256)
            again = measure_ms(result.model, x[: args.batch], repeats=51)
            ok = again <= budget.latency_ms * (1 + budget.latency_tolerance)
            rows.append((name, f"{original:.3f}", f"{budget.latency_ms:.3f}", f"{result.plan.measured_cost:.3f}",
                         f"{again:.3f}", f"{result.flops_after / result.flops_before:.0%}", "yes" if ok else "NO"))
    header = ("model", "original ms", "target ms", "plan measured ms", "re-measured ms", "FLOPs kept", "within tolerance")
    lines = [f"# Latency budgets, measured (batch {args.batch}, {args.threads} torch thread(s), CPU)", "",
             f"Command: `python benchmarks/latency_budget.py --threads {args.threads} --batch {args.batch}` "
             f"(torch {torch.__version__}); median milliseconds per batch; tolerance 30 %.", "",
             f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    out = Path(__file__).parent / "results" / "latency_budget.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
