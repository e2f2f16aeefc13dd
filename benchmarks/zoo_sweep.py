"""What the zoo-at-FLOPs-budgets benchmarks share: their arguments, the digits split, one row per
(model, budget), and the results file with the command that reproduces it."""
from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from multinet import data, zoo

RESULTS = Path(__file__).parent / "results"


def accuracy(model, split) -> float:
    """Held-out digits accuracy."""
    with torch.no_grad():
        return float((model(split.test_x).argmax(1) == split.test_y).float().mean())


def sweep(doc: str, name: str, budgets: list[float], run: Callable[..., dict],
          render: Callable[[list[dict], str], str]) -> None:
    """``run(model_name, split, calib, budget) -> row`` for every zoo model and budget asked on the command
    line; ``render(rows, preamble)`` writes benchmarks/results/<name>.md (or --out), where ``preamble``
    names the command, its time, torch, threads and the data."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=zoo.names())
    parser.add_argument("--budgets", nargs="+", type=float, default=budgets)
    parser.add_argument("--calibration", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / f"{name}.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    split = data.load("digits")
    calib = split.train_x[:args.calibration]
    rows, start = [], time.perf_counter()
    for model in args.models:
        for budget in args.budgets:
            rows.append(run(model, split, calib, budget))
            print(rows[-1], flush=True)
    command = (f"python benchmarks/{name}.py --models {' '.join(args.models)} --budgets "
               f"{' '.join(map(str, args.budgets))} --threads {args.threads}")
    preamble = (f"`{command}` ({(time.perf_counter() - start) / 60:.0f} min, torch {torch.__version__}, "
                f"{args.threads} torch thread, {args.calibration} calibration images, accuracy on the "
                f"{len(split.test_x)} held-out images; one image = {100 / len(split.test_x):.2f} pt)")
    text = render(rows, preamble)
    Path(args.out).write_text(text)
    print(text)
