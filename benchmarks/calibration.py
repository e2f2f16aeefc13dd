"""Calibration cost: peak memory and throughput against the number of samples.

    python benchmarks/calibration.py [--model resnet] [--samples 256 1024 4096 16384] [--unfold]

Each size runs in a fresh process that accumulates the statistics of every consumer of every
prunable group (streamed in batches of 128); the table shows the process's peak resident
memory above its state before calibrating, and samples per second. Statistics are O(columns^2)
per consumer, so memory must stay flat as samples grow.

``--unfold`` also times the conv rows of one batch (32 images, 64 sampled output positions each,
ResNet-50-sized 3x3 convs): the whole im2col matrix then the sampled rows, against gathering only
the sampled positions' patches (what ``collect`` does), in this process, one thread.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def worker(model_name: str, n: int) -> dict:
    import torch

    import multinet
    from multinet import data, zoo
    from multinet.calib import collect, consumer_specs

    split = data.load("digits")
    reps = -(-n // len(split.train_x))
    x = split.train_x.repeat(reps, 1, 1, 1)[:n]
    x = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    graph = multinet.trace(zoo.create(model_name), x[:2])
    names = sorted({c for g in graph.prunable_groups for c in g.consumer_names})
    specs = consumer_specs(graph, names)
    collect(graph.module, specs, x[:128])  # warm-up: allocator and kernels
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    stats = collect(graph.module, specs, x, batch_size=128)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stat_bytes = sum(s.gram.numel() * 8 for s in stats.values())
    return {"samples": n, "peak_mb": (peak - before) / 1024, "stats_mb": stat_bytes / 2**20,
            "input_mb": x.numel() * 4 / 2**20, "per_s": n / seconds, "consumers": len(stats)}


def unfold_speed() -> None:
    import torch

    from multinet.calib.unfold import unfold_conv_input

    torch.set_num_threads(1)
    geom = dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1))
    print("conv rows of 32 images, 64 sampled positions each (3x3 conv, one thread)")
    print(f"{'input':>14s} {'im2col then pick ms':>20s} {'gather picked ms':>17s} {'speed-up':>9s}")
    for channels, size in [(64, 56), (128, 28), (256, 14), (512, 7)]:
        x = torch.randn(32, channels, size, size)
        pick = torch.randperm(size * size, generator=torch.Generator().manual_seed(0))[:64]

        def whole():
            rows = unfold_conv_input(x, geom)
            return rows.view(32, size * size, -1)[:, pick].reshape(-1, rows.shape[1])

        timings = []
        for fn in (whole, lambda: unfold_conv_input(x, geom, pick)):
            fn()
            start = time.perf_counter()
            for _ in range(5):
                fn()
            timings.append((time.perf_counter() - start) / 5 * 1e3)
        print(f"{f'{channels}x{size}x{size}':>14s} {timings[0]:20.1f} {timings[1]:17.1f} {timings[0] / timings[1]:8.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet")
    parser.add_argument("--samples", nargs="*", type=int, default=[256, 1024, 4096, 16384])
    parser.add_argument("--unfold", action="store_true", help="also time sampled unfolding against whole im2col")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.model, args.worker)))
        return
    print(f"{args.model}: statistics of every consumer, batches of 128")
    print(f"{'samples':>8s} {'input MB':>9s} {'stats MB':>9s} {'peak extra MB':>14s} {'samples/s':>10s}")
    for n in args.samples:
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--worker", str(n)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['samples']:8d} {r['input_mb']:9.1f} {r['stats_mb']:9.1f} {r['peak_mb']:14.1f} {r['per_s']:10.0f}",
              flush=True)
    if args.unfold:
        unfold_speed()


if __name__ == "__main__":
    main()
