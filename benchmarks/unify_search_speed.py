"""A unify run's time against an earlier commit's, in the same session: the search's cost questions.

    python benchmarks/unify_search_speed.py --baseline 8a0a76f [--repeats 3] [--threads 2]

Two digit MLPs (one a permuted, rescaled copy) and the zoo VGG, at 5 % of their FLOPs, 512 calibration
images (the set of tests/test_unify.py's order test): every link trial plans a budget on a unified network,
and the greedy asks the cost model what each candidate move saves. Each repeat runs the unify once at the
baseline (a ``git worktree`` of that commit, put first on ``PYTHONPATH``) and once at the working tree, in
fresh processes, alternating, so that machine load falls on both. The table gives the median seconds, the
cost model's term evaluations (``CostModel.term_size`` calls) and whether the two unified networks give the
same accuracy on the 360 held-out digits.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(threads: int) -> dict:
    import time
    import warnings

    import torch

    import multinet
    from multinet import data, zoo
    from multinet.schedule import costs

    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    calls = [0]
    term_size = costs.CostModel.term_size

    def counted(*args, **kwargs):
        calls[0] += 1
        return term_size(*args, **kwargs)

    costs.CostModel.term_size = staticmethod(counted)
    split = data.load("digits")
    torch.manual_seed(1)
    sys.path.insert(0, str(ROOT / "tests"))
    from test_unify import _permuted_scaled  # the order test's set, exactly

    models = {"a": zoo.create("mlp"), "b": _permuted_scaled(zoo.create("mlp"), 3), "c": zoo.create("vgg")}
    start = time.perf_counter()
    unified = multinet.unify(models, split.train_x[:512], budget=multinet.Budget(flops=0.05), max_positions=16)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        out = unified.model(split.test_x)
    accuracy = {k: float((v.argmax(1) == split.test_y).float().mean()) for k, v in out.items()}
    return {"seconds": seconds, "terms": calls[0], "accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="the commit to compare with")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.threads)))
        return
    if not args.baseline:
        parser.error("--baseline COMMIT is required")
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.baseline],
                       check=True, capture_output=True)
        try:
            runs: dict[str, list[dict]] = {"baseline": [], "now": []}
            for _ in range(args.repeats):
                for label, path in (("baseline", tree), ("now", ROOT)):
                    env = {**os.environ, "PYTHONPATH": f"{path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
                    out = subprocess.run([sys.executable, __file__, "--worker", "--threads", str(args.threads)],
                                         env=env, cwd=path, capture_output=True, text=True)
                    if out.returncode != 0:
                        sys.exit(f"the {label} run failed:\n{out.stderr[-2000:]}")
                    runs[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
    base = statistics.median(r["seconds"] for r in runs["baseline"])
    same = all(r["accuracy"] == runs["baseline"][0]["accuracy"] for r in runs["baseline"] + runs["now"])
    print(f"unify of two digit MLPs and the VGG at 5 % of FLOPs, 512 images, {args.threads} threads, "
          f"median of {args.repeats}\n")
    print("| code | seconds | × baseline | term evaluations | same accuracies |")
    print("|---|---|---|---|---|")
    for label, name in (("baseline", args.baseline), ("now", "working tree")):
        seconds = statistics.median(r["seconds"] for r in runs[label])
        print(f"| {name} | {seconds:.1f} | {seconds / base:.2f} | {runs[label][0]['terms']:,} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
