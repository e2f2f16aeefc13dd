"""Small FLOPs budgets: the scheduled plan alone against compress's comparison with the uniform plan.

    python benchmarks/saturated_plans.py [--models mlp vgg resnet mobilenet densenet] [--budgets 0.25 0.15 0.08 0.04 0.02]

The auto schedule ranks plans by their one-shot error at the final outputs (every group reconstructed
from the original model's statistics); ``compress`` then applies the plan with sequential
reconstruction, which corrects much of that error downstream. Where the scheduled plan's one-shot
error reaches ``SATURATED_ERROR`` (half the outputs' energy) the two stop ranking plans alike, and
``compress`` applies the uniform plan too and keeps the one with the least measured error. Per model
and budget this prints: the scheduled plan's one-shot error, the measured (sequential) error of it and
of the uniform plan, which was kept, held-out accuracy of the scheduled plan alone (the comparison
switched off in this process) and of compress's result, and compress's run time in units of the
run without the comparison. Writes benchmarks/results/saturated_plans.md.
"""
from __future__ import annotations

import importlib
import time

import multinet
from multinet import Budget, zoo
from zoo_sweep import accuracy, sweep
compression = importlib.import_module("multinet.pipeline.compression")


def timed_compress(name: str, calib, budget: float, threshold: float):
    """compress with the comparison's threshold set to ``threshold`` (inf: the scheduled plan alone)."""
    default = compression.SATURATED_ERROR
    compression.SATURATED_ERROR = threshold
    try:
        start = time.perf_counter()
        result = multinet.compress(zoo.create(name).eval(), calib, budget=Budget(flops=budget))
        return result, time.perf_counter() - start
    finally:
        compression.SATURATED_ERROR = default


def run(name: str, split, calib, budget: float) -> dict:
    alone, alone_s = timed_compress(name, calib, budget, float("inf"))
    kept, kept_s = timed_compress(name, calib, budget, compression.SATURATED_ERROR)
    return dict(model=name, budget=budget, original=accuracy(zoo.create(name).eval(), split),
                predicted=alone.plan.predicted_error, scheduled=alone.plan.measured_error,
                uniform=kept.plan.compared.get("uniform"), kept=kept.plan.schedule if kept.plan.compared else "–",
                alone_acc=accuracy(alone.model, split), kept_acc=accuracy(kept.model, split), cost=kept_s / alone_s)


def table(rows: list[dict]) -> str:
    lines = ["| model | FLOPs budget | original | one-shot error, scheduled plan | measured: scheduled / uniform | "
             "kept | accuracy: scheduled alone | compress | difference (pts) | run time × alone |",
             "|---|---:|---:|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        uniform = f"{r['uniform']:.3f}" if r["uniform"] is not None else "not applied"
        lines.append(f"| {r['model']} | {r['budget']:.0%} | {r['original']:.3f} | {r['predicted']:.3f} | "
                     f"{r['scheduled']:.3f} / {uniform} | {r['kept']} | {r['alone_acc']:.3f} | {r['kept_acc']:.3f} | "
                     f"{100 * (r['kept_acc'] - r['alone_acc']):+.1f} | {r['cost']:.1f} |")
    return "\n".join(lines)


def render(rows: list[dict], preamble: str) -> str:
    switched = [r for r in rows if r["kept"] == "uniform"]
    return (f"# Small budgets: the scheduled plan alone and compared with the uniform plan (digits, no fine-tuning)"
            f"\n\n{preamble}. The comparison runs where the scheduled plan's one-shot error is at least "
            f"{compression.SATURATED_ERROR}; errors are relative squared errors at the final outputs on the calibration "
            f"set's evaluation samples.\n\n" + table(rows) + f"\n\nThe uniform plan was kept at {len(switched)} of "
            f"{len(rows)} points.\n")


def main() -> None:
    sweep(__doc__, "saturated_plans", [0.25, 0.15, 0.08, 0.04, 0.02], run, render)


if __name__ == "__main__":
    main()
