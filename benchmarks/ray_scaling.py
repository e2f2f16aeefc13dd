"""Calibration and whole compression runs on Ray: 1 vs 2 workers, and Ray's overhead.

    python benchmarks/ray_scaling.py [--samples 4096] [--compress-samples 2048]
    python benchmarks/ray_scaling.py --compress-only --compress-model resnet50 --compress-samples 256

Statistics: the scheduler's one-shot statistics pass for the zoo ResNet (every consumer of every
prunable group, 256 positions per image). Whole run: ``multinet.compress(ratio=0.3)`` of the zoo
ResNet, the cached-input sequential pipeline, whose calibration batches and frontier are split over
the Ray workers (the driver adds their partial statistics and solves). Each runs in this process
(torch using both cores) and on a Ray cluster started here with 2 CPUs, as 1 worker (asking for both
CPUs) or 2 workers (one CPU each); 3 times each, the median is reported, and the Ray runs' removed
channels are checked against the in-process run. A Ray executor keeps its shard actors for its next run:
the whole-run table gives its first run (which starts them) apart from the later ones. Writes benchmarks/results/ray.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

from multinet import data, trace, zoo  # noqa: E402
from multinet.calib import consumer_specs  # noqa: E402
from multinet.calib.sharded import collect_on  # noqa: E402
from multinet.runtime.executors import LocalExecutor, RayExecutor  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def timed(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--compress-samples", type=int, default=2048)
    parser.add_argument("--compress-only", action="store_true",
                        help="measure only the whole compression run; keep the statistics table of results/ray.md")
    parser.add_argument("--compress-model", default="zoo-resnet", choices=["zoo-resnet", "resnet50"],
                        help="the whole run's model: the zoo ResNet on digits, or benchmarks/scale.py's ResNet-50 "
                             "(random weights, 112x112 images: a run of about half a minute, not a few seconds)")
    parser.add_argument("--repeats", type=int, default=3, help="runs timed per configuration (median)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)  # in-process uses both cores, as the Ray runs do (1 worker x 2 CPUs, 2 x 1)
    x = data.load("digits").train_x
    big = torch.cat([x] * (args.samples // len(x) + 1))[: args.samples]
    small = x[:256]
    graph = trace(zoo.create("resnet"), x[:1])
    specs = consumer_specs(graph, list(dict.fromkeys(n for g in graph.prunable_groups for n in g.consumer_names)))

    def job(executor, samples):
        return lambda: collect_on(executor, graph.module, specs, samples, batch_size=128, max_positions=256)

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    one, two = RayExecutor(num_cpus=2), RayExecutor(num_cpus=1)
    assert (one.workers, two.workers) == (1, 2)
    job(two, small)()  # warm the worker processes once
    rows = []
    for label, samples in () if args.compress_only else (("large", big), ("small", small)):
        local = timed(job(LocalExecutor(), samples))
        ray1 = timed(job(one, samples))
        ray2 = timed(job(two, samples))
        n = len(samples)
        rows.append(f"| {label}: {n:,} images | {n / local:,.0f} | {n / ray1:,.0f} | {n / ray2:,.0f} | "
                    f"{ray1 / local:.2f}× | {ray1 / ray2:.2f}× |")
    if args.compress_model == "resnet50":
        from scale import build, calibration_images

        model_of, example = (lambda: build("resnet50", 112)[0]), build("resnet50", 112)[1]
        samples = calibration_images(example, args.compress_samples)
    else:
        model_of = lambda: zoo.create("resnet")  # noqa: E731
        samples = torch.cat([x] * (args.compress_samples // len(x) + 1))[: args.compress_samples]
    runs = compress_rows(samples, one, two, model_of, args.repeats)
    ray.shutdown()
    statistics = ("# Calibration on Ray (zoo ResNet, all consumers, 256 positions/image; 2 cores)\n\n"
                  "Command: `python benchmarks/ray_scaling.py`\n\n"
                  "| job | in-process images/s | Ray, 1 job images/s | Ray, 2 jobs images/s | Ray 1 job / in-process "
                  "time | speed-up 1 → 2 jobs |\n|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n")
    what = "zoo ResNet" if args.compress_model == "zoo-resnet" else "ResNet-50 of benchmarks/scale.py, 112x112"
    section = (f"## A whole compression run ({what}, ratio 0.3, sequential pipeline, "
               f"{args.compress_samples:,} images)\n\n"
               "| run | first run s (starts the actors) | later runs s (median) | later / in-process | "
               "same channels as in-process |\n|---|---|---|---|---|\n"
               + "\n".join(runs) + "\n")
    kept = []  # with --compress-only: the statistics table and the other model's whole-run section stay
    if args.compress_only and (RESULTS / "ray.md").exists():
        parts = (RESULTS / "ray.md").read_text().split("\n## ")
        statistics = parts[0].rstrip("\n") + "\n\n"
        kept = ["## " + p.rstrip("\n") + "\n" for p in parts[1:] if not p.startswith(f"A whole compression run ({what},")]
    text = statistics + "\n".join(kept + [section])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ray.md").write_text(text)
    print(text)


def compress_rows(samples, one, two, model_of, repeats: int = 3) -> list[str]:
    """In-process vs 1 and 2 Ray workers for a whole compress run; the same removals are expected.
    A Ray executor keeps its shard actors between runs: its first run starts them (a process and the
    torch import each), its later runs reuse them; both are timed, the ratio is of the later runs."""
    import multinet

    def run(executor):
        return multinet.compress(model_of(), samples, ratio=0.3, batch_size=128 if len(samples) > 512 else 32,
                                 max_positions=64, eval_samples=256, executor=executor)

    reference = run(LocalExecutor())
    rows, base = [], None
    for label, executor in (("in-process", LocalExecutor()), ("Ray, 1 worker", one), ("Ray, 2 workers", two)):
        executor.release()  # no actors kept from an earlier run: the first run starts its own
        first = timed(lambda: run(executor), 1)
        seconds = timed(lambda: run(executor), repeats)
        base = base or seconds
        same = [g.removed for g in run(executor).groups] == [g.removed for g in reference.groups]
        first_cell = "–" if label == "in-process" else f"{first:.2f}"
        rows.append(f"| {label} | {first_cell} | {seconds:.2f} | {seconds / base:.2f}× | {'yes' if same else 'NO'} |")
    return rows


if __name__ == "__main__":
    main()
