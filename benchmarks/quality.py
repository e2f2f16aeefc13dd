"""Accuracy kept without fine-tuning: REAP vs magnitude vs magnitude+LS vs random vs Torch-Pruning.

    python benchmarks/quality.py [--dataset digits] [--models resnet vgg] [--plot benchmarks/results/quality.png]

Every prunable group of each zoo model loses the same fraction of channels, from 30 % up to 95 %;
calibration uses training images, accuracy is measured on the held-out test split. Torch-Pruning's
magnitude pruner (L1, same per-group ratio, logits layer ignored) runs beside it where it installs.
The summary gives, per method, the fewest FLOPs kept while losing at most 1 and 5 points.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

import multinet
from multinet import data, zoo

RATIOS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
METHODS = ("reap", "magnitude+ls", "magnitude", "random")


def torch_pruning_run(model, example, ratio: float):
    """Torch-Pruning's MagnitudePruner (L1), or None where it is not installed or fails."""
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    import copy

    model = copy.deepcopy(model).eval()
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    try:
        pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=ratio, ignored_layers=[last])
        pruner.step()
        macs, _ = tp.utils.count_ops_and_params(model, example)
        return model, macs
    except Exception as exc:  # report, do not hide
        print(f"    torch-pruning failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--models", nargs="*", default=zoo.names())
    parser.add_argument("--calibration", type=int, default=1024)
    parser.add_argument("--out", default="benchmarks/results/quality.json")
    parser.add_argument("--plot", default="benchmarks/results/quality.png")
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from --out")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(Path(args.out).read_text()), args.plot)
        return
    warnings.filterwarnings("ignore", message=".*calibration rows.*")
    split = data.load(args.dataset)
    calib = split.train_x[: args.calibration]
    results = {}
    for name in args.models:
        model = zoo.create(name, args.dataset)
        base = data.accuracy(model, split.test_x, split.test_y)
        base_flops = multinet.count(multinet.trace(model, calib[:1]).module).flops
        rows = []
        print(f"\n{name} ({args.dataset}): accuracy {base:.3f}, {base_flops / 1e6:.2f} MFLOPs")
        print(f"{'removed':>8s} " + " ".join(f"{m:>14s}" for m in (*METHODS, "torch-pruning")) + "   (accuracy @ FLOPs kept)")
        for ratio in RATIOS:
            row = {"ratio": ratio}
            for method in METHODS:
                start = time.time()
                res = multinet.compress(model, calib, ratio=ratio, method=method, max_positions=64)
                row[method] = (data.accuracy(res.model, split.test_x, split.test_y), res.flops_after / res.flops_before,
                               time.time() - start)
            tp_run = torch_pruning_run(model, calib[:1], ratio)
            if tp_run is not None:
                row["torch-pruning"] = (data.accuracy(tp_run[0], split.test_x, split.test_y), tp_run[1] / base_flops, 0.0)
            rows.append(row)
            cells = [f"{row[m][0]:.3f}@{row[m][1]:.2f}" if m in row else "-" for m in (*METHODS, "torch-pruning")]
            print(f"{ratio:8.0%} " + " ".join(f"{c:>14s}" for c in cells), flush=True)
        results[name] = {"base": base, "rows": rows}
        print(iso_accuracy_lines(base, rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(goals(results))
    if args.plot:
        plot(results, args.plot)


def fewest_flops(base: float, rows: list[dict], method: str, points: float) -> float | None:
    ok = [r[method][1] for r in rows if method in r and base - r[method][0] <= points / 100 + 1e-9]
    return min(ok) if ok else None


def iso_accuracy_lines(base: float, rows: list[dict]) -> str:
    lines = ["  fewest FLOPs kept within 1 pt / 5 pt:"]
    for m in (*METHODS, "torch-pruning"):
        f1, f5 = fewest_flops(base, rows, m, 1), fewest_flops(base, rows, m, 5)
        show = lambda f: "-" if f is None else f"{f:.0%}"  # noqa: E731
        lines.append(f"    {m:14s} {show(f1):>6s} / {show(f5):>6s}")
    return "\n".join(lines)


def goals(results: dict) -> str:
    lines = ["\ngoals: REAP's drop at 50 % <= 1/5 of magnitude's; compression at 1 pt >= 2x magnitude+ls's"]
    for name, res in results.items():
        base, rows = res["base"], res["rows"]
        half = next(r for r in rows if r["ratio"] == 0.5)
        d_reap, d_mag = base - half["reap"][0], base - half["magnitude"][0]
        f_reap, f_ls = fewest_flops(base, rows, "reap", 1), fewest_flops(base, rows, "magnitude+ls", 1)
        ratio = (f_ls / f_reap) if f_reap and f_ls else float("nan")
        lines.append(f"  {name:10s} drop at 50 %: REAP {d_reap * 100:5.1f} pt vs magnitude {d_mag * 100:5.1f} pt | "
                     f"FLOPs within 1 pt: REAP {f_reap if f_reap is None else f'{f_reap:.0%}'} vs magnitude+ls "
                     f"{f_ls if f_ls is None else f'{f_ls:.0%}'} ({ratio:.1f}x)")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.4), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        for m in (*METHODS, "torch-pruning"):
            pts = sorted((r[m][1], r[m][0]) for r in res["rows"] if m in r)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax.axhline(res["base"], color="gray", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(name)
        ax.set_xlabel("FLOPs kept")
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("test accuracy (no fine-tuning)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
