"""Scheduling under a FLOPs budget: auto vs exhaustive vs uniform, on every zoo model.

    python benchmarks/schedule.py [--models resnet mobilenet] [--budgets 0.7 0.5 0.3]

For each model the one-shot statistics and REAP curves are prepared once (their time is added to
every schedule's wall time); each schedule then plans each budget from scratch (auto re-measures
its amplification probes), and the plan is applied with sequential reconstruction by
``multinet.compress(plan=...)``. Accuracy is on the held-out digits test split (360 images: one
image is 0.28 pt); the final-output error is the relative squared error of the logits on the 1,024
calibration images. ResNet and MobileNet are also scheduled with residual streams left whole.
Writes benchmarks/results/schedule.{md,json,png}.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import multinet
from multinet import Budget, data, trace, zoo
from multinet.schedule import make_plan, prepare

SCHEDULES = ("uniform", "auto", "exhaustive")
RESULTS = Path(__file__).parent / "results"


def run_model(name: str, split, calib, budgets, residual_streams: bool = True) -> list[dict]:
    graph = trace(zoo.create(name), calib[:1])
    start = time.perf_counter()
    ctx = prepare(graph, calib, Budget(flops=0.5, residual_streams=residual_streams))
    prep = time.perf_counter() - start
    schedules = SCHEDULES if residual_streams else ("auto",)
    rows = []
    for frac in budgets:
        for schedule in schedules:
            start = time.perf_counter()
            plan = make_plan(ctx, schedule, budget=Budget(flops=frac, residual_streams=residual_streams))
            seconds = prep + time.perf_counter() - start
            result = multinet.compress(zoo.create(name), calib, plan=plan)
            rows.append(dict(
                model=name, budget=frac, schedule=schedule if residual_streams else "auto, residual whole",
                flops=result.flops_after / result.flops_before,
                accuracy=data.accuracy(result.model, split.test_x, split.test_y),
                error=plan.measured_error, one_shot_error=plan.predicted_error if schedule != "auto" else None,
                seconds=seconds, evaluations=plan.evaluations,
            ))
            print(f"{name:9s} {frac:.1f} {rows[-1]['schedule']:22s} flops {rows[-1]['flops']:.3f} "
                  f"acc {rows[-1]['accuracy']:.4f} err {rows[-1]['error']:.5f} {seconds:6.1f} s", flush=True)
    return rows


def table(rows: list[dict], baseline: dict[str, float]) -> str:
    lines = ["| model | FLOPs budget | schedule | FLOPs kept | accuracy (orig.) | final-output error | scheduler s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['budget']:.0%} | {r['schedule']} | {r['flops']:.3f} | "
                     f"{r['accuracy']:.4f} ({baseline[r['model']]:.4f}) | {r['error']:.5f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    lines = ["| model | FLOPs budget | auto − exhaustive (pt) | time exhaustive / auto | auto − uniform (pt) | "
             "error auto / uniform |", "|---|---|---|---|---|---|"]
    keyed = {(r["model"], r["budget"], r["schedule"]): r for r in rows}
    for (model, frac, schedule), auto in keyed.items():
        if schedule != "auto":
            continue
        ex, un = keyed[(model, frac, "exhaustive")], keyed[(model, frac, "uniform")]
        lines.append(f"| {model} | {frac:.0%} | {100 * (auto['accuracy'] - ex['accuracy']):+.1f} | "
                     f"{ex['seconds'] / auto['seconds']:.1f}× | {100 * (auto['accuracy'] - un['accuracy']):+.1f} | "
                     f"{auto['error'] / max(un['error'], 1e-12):.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict], baseline: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models), 3.4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for schedule in dict.fromkeys(r["schedule"] for r in rows if r["model"] == model):
            pts = sorted((r["flops"], r["accuracy"]) for r in rows if r["model"] == model and r["schedule"] == schedule)
            ax.plot(*zip(*pts), marker="o", label=schedule, linestyle="--" if "residual" in schedule else "-")
        ax.axhline(baseline[model], color="gray", linewidth=0.8)
        ax.set_title(model)
        ax.set_xlabel("FLOPs kept")
        ax.set_ylabel("test accuracy")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=zoo.names())
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.7, 0.5, 0.3])
    parser.add_argument("--replot", action="store_true", help="redraw the plot from results/schedule.json")
    args = parser.parse_args()
    if args.replot:
        saved = json.loads((RESULTS / "schedule.json").read_text())
        plot(saved["rows"], saved["baseline"], RESULTS / "schedule.png")
        return
    warnings.filterwarnings("ignore")
    split = data.load("digits")
    calib = split.train_x[:1024]
    rows, baseline = [], {}
    for name in args.models:
        baseline[name] = data.accuracy(zoo.create(name), split.test_x, split.test_y)
        rows += run_model(name, split, calib, args.budgets)
        if name in ("resnet", "mobilenet"):
            rows += run_model(name, split, calib, args.budgets, residual_streams=False)
    RESULTS.mkdir(exist_ok=True)
    text = ("# Scheduling under a FLOPs budget (digits, no fine-tuning)\n\nCommand: `python benchmarks/schedule.py`\n\n"
            + table(rows, baseline) + "\n\n## auto against the reference and the baseline\n\n" + summary(rows) + "\n")
    (RESULTS / "schedule.md").write_text(text)
    (RESULTS / "schedule.json").write_text(json.dumps(dict(rows=rows, baseline=baseline), indent=1))
    plot(rows, baseline, RESULTS / "schedule.png")
    print(text)


if __name__ == "__main__":
    main()
