"""Timed fusion: sibling layers fused only where the wider layer is not slower on the batch given.

    python benchmarks/fusion_timing.py [--threads 1] [--repeats 21] [--out FILE] [--no-unified]

Part 1, single layers: two 3x3 convs reading the same 24-channel 8x8 tensor (the digit networks'
size), at several output widths and batches: the fused layer (one wider conv, split, pieces made
dense, as fusion.py runs it) over the pair one after another, and what ``fused(timed_on=...)``
decides there (its own 7-round timing, taken before the table's rounds).
Part 2, a unified network: the digit VGG and the parity ResNet of benchmarks/unify.py unified at 15 %
of their FLOPs, at batches of 1, 32 and 256: the untimed fused network (every sibling set fused)
and the timed one, each against the unfused MultiNet. Medians of paired per-round ratios with 95 %
intervals (benchmarks/unify.py's timing), torch threads set explicitly. Writes
benchmarks/results/fusion_timing.md.
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from multinet.unification.fusion import widened_call
from multinet.unification.fusion_timing import fused_over_apart
from unify import interleaved_ms, paired_ratio  # benchmarks/unify.py: the same paired timing

RESULTS = Path(__file__).parent / "results"
WIDTHS = ((16, 1), (16, 16), (8, 8), (32, 1), (32, 32), (64, 16))
BATCHES = (1, 32, 256)


def layer_rows(repeats: int) -> list[str]:
    rows = []
    torch.manual_seed(0)
    for a, b in WIDTHS:
        convs = [nn.Conv2d(24, w, 3, padding=1).eval() for w in (a, b)]
        wide = widened_call(convs)
        for n in BATCHES:
            x = torch.randn(n, 24, 8, 8)
            with torch.no_grad():
                fuses = fused_over_apart(convs, x) <= 1.0
                medians, rounds = interleaved_ms({"fused": lambda: wide(x), "apart": lambda: [c(x) for c in convs]},
                                                 repeats)
            r, lo, hi = paired_ratio(rounds["fused"], rounds["apart"])
            rows.append(f"| {a} + {b} | {n} | {medians['apart']:.3f} | {medians['fused']:.3f} | ×{r:.3f} [{lo:.3f}, {hi:.3f}] "
                        f"| {'fused' if fuses else 'apart'} |")
    return rows


def unified_rows(repeats: int) -> list[str]:
    import multinet
    from multinet import Budget, data
    import unify as U

    split = data.load("digits")
    models = {f"{a}_{t}_{s}": U.trained(a, t, s, split) for a, t, s in U.SETS["vgg+resnet"]}
    net = multinet.unify(models, split.train_x[:1024], budget=Budget(flops=0.15), speed_check=False).model.eval()
    untimed = net.fused().eval()
    rows = []
    for n in BATCHES:
        x = split.test_x[:n]
        timed = net.fused(timed_on=x).eval()
        sets = sum(1 for k, _ in untimed.named_children() if k.startswith("fused_"))
        kept = sum(1 for k, _ in timed.named_children() if k.startswith("fused_"))
        with torch.no_grad():
            medians, rounds = interleaved_ms({"unfused": lambda: net(x), "untimed": lambda: untimed(x),
                                              "timed": lambda: timed(x)}, repeats)
        u = paired_ratio(rounds["untimed"], rounds["unfused"])
        t = paired_ratio(rounds["timed"], rounds["unfused"])
        rows.append(f"| {n} | {kept} of {sets} | {medians['unfused']:.3f} | ×{u[0]:.3f} [{u[1]:.3f}, {u[2]:.3f}] "
                    f"| ×{t[0]:.3f} [{t[1]:.3f}, {t[2]:.3f}] |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--out", default=str(RESULTS / "fusion_timing.md"))
    ap.add_argument("--no-unified", action="store_true", help="part 1 only (part 2 trains and unifies: minutes)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    lines = [f"# Timed fusion ({args.threads} thread(s), {args.repeats} paired rounds, torch {torch.__version__})", "",
             "## Two 3x3 convs reading the same 24 x 8 x 8 tensor", "",
             "| output channels | batch | apart ms | fused ms | fused / apart | timed fusion decides |",
             "|---|---|---|---|---|---|", *layer_rows(args.repeats)]
    if not args.no_unified:
        lines += ["", "## Digit VGG + parity ResNet unified at 15 % of their FLOPs", "",
                  "| batch | sibling sets fused when timed | unfused ms | untimed fused / unfused | timed fused / unfused |",
                  "|---|---|---|---|---|", *unified_rows(args.repeats)]
    lines += ["", f"({time.perf_counter() - start:.0f} s)"]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
