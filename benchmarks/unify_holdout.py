"""unify's ``holdout``: deciding links on calibration samples the candidates were not fitted on.

    python benchmarks/unify_holdout.py [--points vgg-tasks:0.08 ...] [--holdouts 0 0.2 0.5] [--threads 2]

The sets and models are benchmarks/unify.py's (digits, 1,024 calibration images). For each point (set
and FLOPs budget) and each holdout fraction it runs ``multinet.unify`` and reports, per model, what it
chose (unified or separate), its accuracy on the 360 test images, and its final-output error (relative
to the original model's outputs, as unify measures it) on 773 images compression never saw (the test
images and the 413 training images the calibration set leaves out), beside the separately compressed
model's (``Unified.separate``: with a holdout, fitted again on every calibration sample, so it is
what ``compress`` gives in every column). Writes benchmarks/results/unify_holdout.md.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import unify as U  # noqa: E402  (the sets and their trained models)

import multinet  # noqa: E402
from multinet import Budget, data  # noqa: E402
from multinet.schedule.oneshot import output_error  # noqa: E402
from multinet.unification.api import member_outputs  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DEFAULT_POINTS = ["vgg-tasks:0.15", "vgg-tasks:0.08", "vgg-tasks:0.04", "mlp-triple:0.04", "mlp-triple:0.02",
                  "mlp-tasks:0.02"]


def run_point(name: str, frac: float, holdouts: list[float], split, calib) -> list[str]:
    spec = U.SETS[name]
    models = {f"{a}_{t}_{s}": U.trained(a, t, s, split) for a, t, s in spec}
    unseen = torch.cat([split.test_x, split.train_x[len(calib):]])
    plain = multinet.MultiNet(models, calib[:1])
    reference = member_outputs(plain, [unseen])
    lines = []
    for holdout in holdouts:
        start = time.perf_counter()
        u = multinet.unify(models, calib, budget=Budget(flops=frac), holdout=holdout)
        seconds = time.perf_counter() - start
        outs = member_outputs(u.model, [unseen])
        with torch.no_grad():
            test = u.model(split.test_x)
        for k, (_, task, _) in zip(models, spec):
            labels = U.TASKS[task][0](split.test_y)
            alone = u.separate[k].model
            with torch.no_grad():
                sep_test = alone(split.test_x)
            sep_out = member_outputs(multinet.MultiNet({k: alone}, calib[:1]), [unseen])[k]
            acc = float((test[k].argmax(1) == labels).float().mean())
            sep_acc = float((sep_test.argmax(1) == labels).float().mean())
            lines.append(f"| {name} | {frac:.0%} | {holdout:g} | {k} | {u.chosen[k]} | {acc:.3f} | {sep_acc:.3f} | "
                         f"{100 * (acc - sep_acc):+.1f} | {output_error(outs[k], reference[k]):.4f} | "
                         f"{output_error(sep_out, reference[k]):.4f} | {seconds:.0f} |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", nargs="+", default=DEFAULT_POINTS, help="set:budget")
    parser.add_argument("--holdouts", nargs="+", type=float, default=[0.0, 0.2, 0.5])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "unify_holdout.md"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    split = data.load("digits")
    calib = split.train_x[:1024]
    lines = ["| set | budget | holdout | model | chosen | accuracy | separate | unified − separate (pts) | "
             "error on 773 unseen | separate's | unify s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for point in args.points:
        name, frac = point.split(":")
        lines += run_point(name, float(frac), args.holdouts, split, calib)
    command = (f"python benchmarks/unify_holdout.py --points {' '.join(args.points)} --holdouts "
               f"{' '.join(map(str, args.holdouts))} --threads {args.threads}")
    text = (f"# unify's holdout: links decided on samples the candidates were not fitted on\n\n`{command}` "
            f"(torch {torch.__version__}, {args.threads} threads). Accuracy on the 360 test images (one image = "
            f"0.28 pt); errors on 773 images no compression saw.\n\n" + "\n".join(lines) + "\n")
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
