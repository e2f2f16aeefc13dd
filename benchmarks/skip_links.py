"""One model compressed with and without skip links, at FLOPs budgets (no fine-tuning).

    python benchmarks/skip_links.py [--models mlp vgg resnet mobilenet densenet] [--budgets 0.25 0.08 0.04 0.02]

``multinet.compress(model, data, budget=Budget(flops=f))`` (REAP, auto schedule, sequential mode)
against the same call with ``skip_links=True``: a layer may also read an earlier tensor of the model
that explains its input, so the layers in between can go whole where that beats narrowing them, and a
residual branch may collapse into its skip connection; of the three structures (narrowed, skip links,
branches allowed) the one with the least final-output error on the calibration set is kept.
Per model and budget: held-out test accuracy of both, FLOPs kept, the structure kept, and the
run time of the skip-link search in units of the plain compression's (both timed in this process,
one after another, on the same torch thread count). Writes benchmarks/results/skip_links.md.
"""
from __future__ import annotations

import time

import multinet
from multinet import Budget, BudgetError, zoo
from zoo_sweep import accuracy, sweep


def run(name: str, split, calib, budget: float) -> dict:
    model = zoo.create(name).eval()
    row = dict(model=name, budget=budget, original=accuracy(model, split))
    try:
        start = time.perf_counter()
        plain = multinet.compress(model, calib, budget=Budget(flops=budget))
        row["plain_s"] = time.perf_counter() - start
        start = time.perf_counter()
        skipped = multinet.compress(model, calib, budget=Budget(flops=budget), skip_links=True)
        row["skip_s"] = time.perf_counter() - start
    except BudgetError as exc:
        row["note"] = str(exc)
        return row
    row.update(plain=accuracy(plain.model, split), plain_flops=plain.flops_after / plain.flops_before,
               skip=accuracy(skipped.model, split), skip_flops=skipped.flops_after / skipped.flops_before,
               links=[f"{a} ← {b}" for a, b in skipped.skip_links], chosen=_chosen(skipped))
    return row


def _chosen(result) -> str:
    """Which of compress's three structures the search kept."""
    if result.skip_links:
        return "skip links: " + ", ".join(f"{a} ← {b}" for a, b in result.skip_links)
    if result.plan is not None and result.plan.budget.get("residual_branches"):
        gone = [p[0].rsplit(".", 2)[0] for p in result.removed_whole]
        return ("branches allowed: " + (", ".join(gone) + " removed whole" if gone else
                                        "none removed, a different plan (its curves reach zero)"))
    return "narrowed (the plain result)"


def table(rows: list[dict]) -> str:
    lines = ["| model | FLOPs budget | original | compress | with skip links | difference (pts) | FLOPs kept "
             "(plain / skip) | kept structure (skip link: layer ← the layer whose input it reads) | run time × plain |",
             "|---|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in rows:
        if "note" in r:
            lines.append(f"| {r['model']} | {r['budget']:.0%} | {r['original']:.3f} | – | – | – | – | {r['note']} | – |")
            continue
        lines.append(f"| {r['model']} | {r['budget']:.0%} | {r['original']:.3f} | {r['plain']:.3f} | {r['skip']:.3f} | "
                     f"{100 * (r['skip'] - r['plain']):+.1f} | {r['plain_flops']:.1%} / {r['skip_flops']:.1%} | "
                     f"{r['chosen']} | {r['skip_s'] / r['plain_s']:.1f} |")
    return "\n".join(lines)


def render(rows: list[dict], preamble: str) -> str:
    return f"# Skip links in `compress` (digits, no fine-tuning)\n\n{preamble}.\n\n" + table(rows) + "\n"


def main() -> None:
    sweep(__doc__, "skip_links", [0.25, 0.08, 0.04, 0.02], run, render)


if __name__ == "__main__":
    main()
