"""The REAP greedy on ResNet-50's largest problems, at a ratio and at full depth (the scheduler's curves).

    python benchmarks/greedy_speed.py [--threads 2] [--rows 4096] [--repeats 3]

Statistics are random (a Gram of ``--rows`` samples, a random weight), shaped like ResNet-50's groups
that dominate its solves at 64 calibration images (the input of a stage-4 3x3 conv, 512 channels x 9
columns; the 2,048- and 1,024-wide residual streams with their readers), and a few mid-sized ones
around the solver's switch between its two weight forms. Each problem runs, in this process and
interleaved, with the solver as it is (``default``), with its weight updated in place (``in place``:
no W0 - Y Z form), and with neither that form nor restarts (``plain``: the steps of the solver
before both). The table gives the median seconds of the greedy steps (the Gram's inverse is factored
beforehand and handed in, as the pipeline does), each variant's time over ``plain``, and whether all
three remove the same channels.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from multinet.solve import ConsumerProblem, reap, reap_greedy_multi
from multinet.solve.problem import blocked_columns, prepare_gram

PROBLEMS = {  # name -> (channels, columns per channel, outputs of each consumer)
    "ResNet-50 stage-4 3x3 input (512 x 9 -> 512)": (512, 9, [512]),
    "ResNet-50 2,048 stream (3 readers)": (2048, 1, [512, 512, 1000]),
    "ResNet-50 1,024 stream (7 readers)": (1024, 1, [256, 256, 256, 256, 256, 512, 2048]),
    "3x3 input 256 x 9 -> 256": (256, 9, [256]),
    "3x3 input 128 x 9 -> 512": (128, 9, [512]),
    "Linear 512 -> 512": (512, 1, [512]),
    "3x3 input 64 x 9 -> 64 (the zoo's size)": (64, 9, [64]),
}
VARIANTS = {  # name -> (LAZY_FROM, RESTART_AFTER)
    "default": (reap.LAZY_FROM, reap.RESTART_AFTER),
    "in place": (1 << 62, reap.RESTART_AFTER),
    "plain": (1 << 62, 1 << 62),
}


def problems_for(channels: int, block: int, outputs: list[int], rows: int, seed: int) -> list[ConsumerProblem]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for d in outputs:
        x = torch.randn(max(rows, 2 * channels * block), channels * block + 1, generator=gen, dtype=torch.float64)
        x[:, -1] = 1.0
        gram = x.T @ x
        inverse = reap.invert(prepare_gram(gram, 1e-6)[0])
        weight = torch.randn(len(gram), d, generator=gen, dtype=torch.float64)
        out.append(ConsumerProblem(gram, weight, torch.arange(channels), blocked_columns(channels, block),
                                   1.0, inverse))
    return out


def timed(problems, channels: int, n_remove: int, variant: str) -> tuple[float, list[int]]:
    reap.LAZY_FROM, reap.RESTART_AFTER = VARIANTS[variant]
    start = time.perf_counter()
    result = reap_greedy_multi(problems, channels, n_remove)
    return time.perf_counter() - start, result.removed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=4096, help="calibration rows behind each Gram")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    saved = reap.LAZY_FROM, reap.RESTART_AFTER
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rows} rows per Gram, median of "
          f"{args.repeats} interleaved rounds; seconds of greedy steps\n")
    print("| problem | removed | default | in place | plain | default / plain | in place / plain | same channels |")
    print("|---|---|---|---|---|---|---|---|")
    try:
        for seed, (name, (channels, block, outputs)) in enumerate(PROBLEMS.items()):
            problems = problems_for(channels, block, outputs, args.rows, seed)
            for label, n_remove in (("30 %", int(0.3 * channels)), ("all but 1", channels - 1)):
                times = {v: [] for v in VARIANTS}
                removed = {}
                for _ in range(args.repeats):
                    for variant in VARIANTS:
                        seconds, removed[variant] = timed(problems, channels, n_remove, variant)
                        times[variant].append(seconds)
                med = {v: statistics.median(t) for v, t in times.items()}
                same = removed["default"] == removed["in place"] == removed["plain"]
                cells = [name, label, *(f"{med[v]:.3f}" for v in VARIANTS), f"{med['default'] / med['plain']:.2f}",
                         f"{med['in place'] / med['plain']:.2f}", "yes" if same else "NO"]
                print("| " + " | ".join(cells) + " |", flush=True)
    finally:
        reap.LAZY_FROM, reap.RESTART_AFTER = saved


if __name__ == "__main__":
    main()
