"""What a budget's scheduler spends before its search, in plain forward passes: the statistics pass, and
the masked evaluator's reference outputs on the evaluation samples, computed on their own (as before) or
taken from the statistics pass (``EvaluationOutputs``).

    python benchmarks/scheduler_setup.py [--images 256] [--size 224] [--threads 2] [--repeats 3]

ResNet-50 of benchmarks/scale.py (random weights, timing only), batches of 32, 64 positions per image,
every image an evaluation sample (``eval_samples`` covers the calibration set, as in scale.py). The two
ways take turns ``repeats`` times in one process; each row is the median, in units of the median plain
pass measured between them.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch

from scale import build, calibration_images

from multinet import Budget, trace
from multinet.schedule.budget import schedulable_groups
from multinet.schedule.oneshot import EvaluationOutputs, MaskedModel, evaluation_inputs, one_shot_stats

RESULTS = Path(__file__).parent / "results" / "scheduler_setup.md"


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def setup(graph, x, allowed, reuse: bool) -> tuple[float, float, list[torch.Tensor]]:
    """Seconds of the statistics pass and of the masked evaluator's construction, and its reference."""
    inputs = evaluation_inputs(x, 32, len(x))
    outputs = EvaluationOutputs(graph.module, inputs) if reuse else None
    stats_s, stats = timed(lambda: one_shot_stats(graph, list(allowed), x, 32, 64, "cpu", 0, None, outputs))
    reference = outputs.reference() if reuse else None
    masked_s, masked = timed(lambda: MaskedModel(graph, stats, list(allowed), inputs, 1e-6, "cpu", None, reference))
    return stats_s, masked_s, masked.reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    model, example = build("resnet50", args.size)
    torch.manual_seed(1)
    x = calibration_images(example, args.images)
    graph = trace(model, example)
    allowed = schedulable_groups(graph, Budget(flops=0.5))

    def plain():
        with torch.no_grad():
            for i in range(0, len(x), 32):
                graph.module(x[i:i + 32])

    plain()  # warm-up
    rows = {False: [], True: []}
    passes = []
    references = {}
    for _ in range(args.repeats):
        for reuse in (False, True):
            passes.append(timed(plain)[0])
            stats_s, masked_s, references[reuse] = setup(graph, x, allowed, reuse)
            rows[reuse].append((stats_s, masked_s))
    unit = statistics.median(passes)
    same = all(torch.equal(a, b) for a, b in zip(references[False], references[True]))
    lines = [f"# The scheduler's set-up: statistics and the masked evaluator's reference", "",
             f"`python benchmarks/scheduler_setup.py --images {args.images} --size {args.size} --threads "
             f"{args.threads} --repeats {args.repeats}` (ResNet-50 of scale.py, random weights, batches of 32, "
             f"64 positions per image, all {args.images} images evaluation samples; torch {torch.__version__}; "
             f"plain pass {unit:.2f} s, the median of {len(passes)}; medians of {args.repeats} turns each):", "",
             "| reference outputs | statistics pass | masked evaluator built | together |", "|---|---|---|---|"]
    for reuse, label in ((False, "a pass of their own (before)"), (True, "from the statistics pass")):
        stats_p = statistics.median(s for s, _ in rows[reuse]) / unit
        masked_p = statistics.median(m for _, m in rows[reuse]) / unit
        together = statistics.median(s + m for s, m in rows[reuse]) / unit
        lines.append(f"| {label} | {stats_p:.2f} | {masked_p:.2f} | {together:.2f} |")
    lines += ["", f"Reference outputs equal to the bit: {'yes' if same else 'NO'}."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
