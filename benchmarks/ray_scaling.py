"""Calibration on Ray: throughput with 1 vs 2 workers, and Ray's overhead on a small job.

    python benchmarks/ray_scaling.py [--samples 4096]

The job is the scheduler's one-shot statistics pass for the zoo ResNet (every consumer of every
prunable group, 256 positions per image): in this process (torch using both cores), and sharded
over a Ray cluster started here with 2 CPUs, as 1 job (a task asking for both CPUs) or 2 jobs
(one CPU each). Each configuration runs 3 times; the median is reported. Writes
benchmarks/results/ray.md.
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
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
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
    for label, samples in (("large", big), ("small", small)):
        local = timed(job(LocalExecutor(), samples))
        ray1 = timed(job(one, samples))
        ray2 = timed(job(two, samples))
        n = len(samples)
        rows.append(f"| {label}: {n:,} images | {n / local:,.0f} | {n / ray1:,.0f} | {n / ray2:,.0f} | "
                    f"{ray1 / local:.2f}× | {ray1 / ray2:.2f}× |")
    ray.shutdown()
    text = ("# Calibration on Ray (zoo ResNet, all consumers, 256 positions/image; 2 cores)\n\n"
            "Command: `python benchmarks/ray_scaling.py`\n\n"
            "| job | in-process images/s | Ray, 1 job images/s | Ray, 2 jobs images/s | Ray 1 job / in-process time | "
            "speed-up 1 → 2 jobs |\n|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ray.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
