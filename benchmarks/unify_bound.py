"""What a network of the unified budget's cost can reach on digits when *trained*: a reference for
issue 13's "where separate compression loses ≥ 15 pts, unified loses ≤ 5" at the smallest budgets.

    python benchmarks/unify_bound.py [--budgets 0.02 0.01] [--seeds 3] [--threads 1]

At a budget of f of a set's FLOPs, the whole unified network may cost f × (the set's FLOPs). This
script trains, from scratch with the zoo's recipe and the digit labels, every MLP of one or two hidden
layers (widths from a small grid) that fits in that cost when it spends *all* of it on the digit task
alone, and reports the best test accuracy over the widths and seeds. A digit model of the set must keep
its original accuracy minus 5 pts for the goal; where no trained network of the whole budget gets
there, no compression of the set without retraining can be expected to (it has less: the same cost,
the other members to serve, and no labels). This is evidence from training, not a proof: a better
recipe could do a little better. Writes benchmarks/results/unify_bound.md.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from unify import SETS, TASKS, flops, trained  # noqa: E402  (the same models and FLOPs count)

from multinet import data  # noqa: E402
from multinet.zoo.models import MODELS  # noqa: E402
from multinet.zoo.train import fit  # noqa: E402

RESULTS = Path(__file__).parent / "results"
WIDTHS = [2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32]


def candidates(cost: int, x1: torch.Tensor) -> list[tuple[tuple[int, ...], int]]:
    """Every hidden-width tuple (one layer, or two narrowing) of an MLP whose FLOPs fit in ``cost``, with its FLOPs."""
    out = []
    for hidden in [(w,) for w in WIDTHS] + [(a, b) for a, b in itertools.product(WIDTHS, WIDTHS) if b <= a]:
        f = flops(MODELS["mlp"](in_channels=1, image_size=8, num_classes=10, hidden=hidden), x1)
        if f <= cost:
            out.append((hidden, f))
    return out


def best_trained(cost: int, split, seeds: int, x1) -> tuple[float, tuple[int, ...], int] | None:
    """The best test accuracy of a digit MLP trained from scratch within ``cost`` FLOPs (widths, seeds)."""
    best = None
    for hidden, f in candidates(cost, x1):
        for seed in range(seeds):
            torch.manual_seed(seed)
            model = MODELS["mlp"](in_channels=1, image_size=8, num_classes=10, hidden=hidden)
            fit(model, split.train_x, split.train_y, 80, seed)
            with torch.no_grad():
                acc = float((model(split.test_x).argmax(1) == split.test_y).float().mean())
            if best is None or acc > best[0]:
                best = (acc, hidden, f)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["mlp-seeds", "mlp-tasks", "mlp-triple"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.02, 0.01])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    split = data.load("digits")
    x1 = split.train_x[:1]
    start = time.perf_counter()
    lines = ["| set | budget | the set's FLOPs × budget | best digit MLP trained within it (hidden widths, FLOPs) | "
             "its test accuracy | the set's digit models: original − 5 pts | reachable |",
             "|---|---:|---:|---|---:|---|---|"]
    for name in args.sets:
        spec = SETS[name]
        models = {f"{a}_{t}_{s}": trained(a, t, s, split) for a, t, s in spec}
        total = sum(flops(m, x1) for m in models.values())
        digits = {}
        for key, (_, task, _) in zip(models, spec):
            if task == "digit":
                with torch.no_grad():
                    out = models[key](split.test_x).argmax(1)
                digits[key] = float((out == TASKS[task][0](split.test_y)).float().mean())
        for frac in args.budgets:
            cost = int(frac * total)
            got = best_trained(cost, split, args.seeds, x1)
            need = {k: v - 0.05 for k, v in digits.items()}
            if got is None:
                lines.append(f"| {name} | {frac:.0%} | {cost} | none fits | — | "
                             + ", ".join(f"{k} {v:.3f}" for k, v in need.items()) + " | no |")
                continue
            acc, hidden, f = got
            ok = all(acc >= v for v in need.values())
            lines.append(f"| {name} | {frac:.0%} | {cost} | {hidden}, {f} | {acc:.3f} | "
                         + ", ".join(f"{k} {v:.3f}" for k, v in need.items()) + f" | {'yes' if ok else 'no'} |")
            print(lines[-1], flush=True)
    command = (f"python benchmarks/unify_bound.py --sets {' '.join(args.sets)} --budgets "
               f"{' '.join(map(str, args.budgets))} --seeds {args.seeds} --threads {args.threads}")
    text = ("# Digit MLPs trained within the unified budget (a reference for issue 13's ≤ 5 pts goal)\n\n"
            f"`{command}` ({(time.perf_counter() - start) / 60:.1f} min, torch {torch.__version__}). For each set and "
            "budget: the cost the whole unified network may have, the best test accuracy (360 held-out digits) of "
            f"an MLP with one or two (narrowing) hidden layers (widths from {WIDTHS}) trained from scratch on the digit labels "
            f"within that cost (zoo recipe, 80 epochs, best of {args.seeds} seeds and all widths that fit), and "
            "the accuracy each digit model of the set must keep for the goal. *reachable: no* means a network that "
            "spends the whole budget on the digit task alone, trained with labels, stays below the goal.\n\n"
            + "\n".join(lines) + "\n")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "unify_bound.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
