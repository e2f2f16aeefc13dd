"""Trace every torchvision classifier (random weights), prune 30 % of each prunable group, run it.

Needs torchvision, which here means its own environment (PyPI's torchvision does not import
beside the CPU torch 2.13 wheel):

    python -m venv .venv-tv && .venv-tv/bin/pip install torch==2.14.1 torchvision==0.29.1 -e .
    .venv-tv/bin/python benchmarks/torchvision_zoo.py [--models resnet18 vit_b_16] [--out benchmarks/results/torchvision.md]

Prints one row per model: traced / groups / prunable groups / pruned model runs with the
original output shape / FLOPs (MACs) and params before -> after. A failure is reported in its
row with the first line of the error, never hidden.
"""
from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

import multinet

INPUT_SIDE = {"inception_v3": 299}


def classifiers() -> list[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def run_one(name: str, ratio: float, seed: int) -> dict:
    import torchvision.models as tvm

    row = {"model": name, "traced": "no", "groups": "-", "prunable": "-", "channels": "-", "runs": "-",
           "flops": "-", "params": "-", "note": ""}
    torch.manual_seed(seed)
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
    model = tvm.get_model(name, weights=None, **kwargs).eval()
    side = INPUT_SIDE.get(name, 224)
    x = torch.randn(1, 3, side, side)
    start = time.time()
    try:
        graph = multinet.trace(model, x)
    except multinet.MultinetError as exc:
        row["note"] = str(exc).split(": ", 1)[-1][:90]
        return row
    row["traced"] = "yes"
    row["groups"] = str(len(graph.groups))
    prunable = graph.prunable_groups
    row["prunable"] = str(len(prunable))
    row["channels"] = f"{sum(g.size for g in prunable)}/{sum(g.size for g in graph.groups)}"
    if not prunable:
        reasons = {g.reasons[0].split(" at ")[0] for g in graph.groups if g.reasons}
        row["note"] = "; ".join(sorted(reasons))[:90]
    before = multinet.count(graph.module)
    gen = torch.Generator().manual_seed(seed)
    keep = {g.id: torch.randperm(g.size, generator=gen)[: max(1, round(g.size * (1 - ratio)))].sort().values
            for g in prunable}
    try:
        with torch.no_grad():
            reference = graph.module(x)
            pruned = multinet.prune(graph, keep)
            out = pruned(x)
        same = [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out)] == [
            tuple(t.shape) for t in torch.utils._pytree.tree_leaves(reference)]
        row["runs"] = "yes" if same else "shape changed"
        after = multinet.count(pruned, (x,))
        row["flops"] = f"{before.flops / 1e6:,.0f}M -> {after.flops / 1e6:,.0f}M"
        row["params"] = f"{before.params / 1e6:.1f}M -> {after.params / 1e6:.1f}M"
    except Exception as exc:  # report, do not hide: this is what the benchmark measures
        row["runs"] = "no"
        row["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    row["seconds"] = f"{time.time() - start:.1f}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/torchvision.md")
    args = parser.parse_args()
    names = args.models or classifiers()
    cols = ["model", "traced", "groups", "prunable", "channels", "runs", "flops", "params", "seconds", "note"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    print(lines[0], flush=True)
    rows = []
    for name in names:
        row = run_one(name, args.ratio, args.seed)
        rows.append(row)
        lines.append("| " + " | ".join(str(row.get(c, "-")) for c in cols) + " |")
        print(lines[-1], flush=True)
        gc.collect()
    traced = sum(r["traced"] == "yes" for r in rows)
    with_groups = sum(r["prunable"] not in ("-", "0") for r in rows)
    runs = sum(r["runs"] == "yes" for r in rows)
    summary = (f"\n{len(rows)} classifiers: {traced} traced, {with_groups} with prunable groups, "
               f"{runs} pruned models ran with unchanged output shapes "
               f"(random {args.ratio:.0%} of every prunable group, torch {torch.__version__}).")
    print(summary)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n" + summary + "\n")


if __name__ == "__main__":
    main()
