"""How many timed calls ``infer``'s "auto" choices spend on the first batch.

    python benchmarks/form_timing_rounds.py [--threads 1] [--runs 5] [--out benchmarks/results/form_timing_rounds.md]

``fuse="auto"`` times a MultiNet's forms (as built, fused, fused and batched) and ``overlap="auto"`` the
chosen form with and without overlapped members, ``FUSE_TRIALS`` rounds each, stopping once the rounds so
far fix which median is lowest (runtime/infer.py: ``_decided``). This counts the timed calls (a warm-up call
per form comes on top) on the zoo's sets, with the real clock, and reports the form each run chose.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

from multinet import data, zoo
from multinet.runtime.infer import FUSE_TRIALS, faster_form, faster_overlap
from multinet.unification.multinet import MultiNet

SETS = {"VGG+ResNet": ["vgg", "resnet"], "MLP pair": ["mlp", "mlp"], "three ResNets": ["resnet"] * 3,
        "VGG+VGG+MLP": ["vgg", "vgg", "mlp"]}


def counted(choose, net, batch):
    """(the chosen form, how many calls were timed)."""
    reads = {"n": 0}

    def clock():
        reads["n"] += 1
        return time.perf_counter()
    form = choose(net, batch, torch.device("cpu"), clock=clock)
    return form, reads["n"] // 2  # a timed call reads the clock twice


def form_name(net) -> str:
    from multinet.unification.batching import batched_count

    if not net.is_fused:
        return "as built"
    return "batched" if batched_count(net.graph_module) else "fused"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results/form_timing_rounds.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    x = data.load("digits").test_x[:args.batch]
    rows = []
    for label, names in SETS.items():
        fuse_calls, overlap_calls, forms, overlapped = [], [], [], []
        for run in range(args.runs):
            torch.manual_seed(run)
            net = MultiNet({f"{n}{i}": zoo.create(n) for i, n in enumerate(names)}, x[:1])
            form, calls = counted(faster_form, net, x)
            fuse_calls.append(calls)
            forms.append(form_name(form))
            chosen, calls = counted(faster_overlap, form, x)
            overlap_calls.append(calls)
            overlapped.append("yes" if chosen.is_overlapped else "no")
        rows.append(f"| {label} | {', '.join(map(str, fuse_calls))} | {', '.join(forms)} | "
                    f"{', '.join(map(str, overlap_calls))} (of {2 * FUSE_TRIALS}) | {', '.join(overlapped)} |")
    lines = [f"# Timed calls of infer's auto choices on the first batch ({args.batch} digits, {args.threads} torch "
             f"thread(s), {args.runs} runs per set, torch {torch.__version__})", "",
             f"`python benchmarks/form_timing_rounds.py --threads {args.threads} --runs {args.runs}`. Each choice "
             f"times its forms in turns, up to {FUSE_TRIALS} rounds, and stops once one form's slowest time is "
             f"under every other form's fastest after {FUSE_TRIALS // 2 + 1} rounds (the remaining rounds cannot "
             f"change which median is lowest). All {FUSE_TRIALS} rounds: {FUSE_TRIALS} timed calls per form.", "",
             "| set | fuse=\"auto\": timed calls per run | form chosen | overlap=\"auto\": timed calls per run | "
             "overlapped |", "|---|---|---|---|---|", *rows]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
