"""GPU check for the device machine: the Gram-Schmidt solver and calibration on CUDA.

    python benchmarks/gpu_check.py

Prints, for growing problem sizes, the REAP inverse form on CPU vs the Gram-Schmidt form on
CUDA (same removal order? max error difference? times), then calibrates a zoo model on CUDA and
compares the statistics with the CPU ones. Exits 1 on any mismatch, 0 when all agree.
"""
from __future__ import annotations

import sys
import time

import torch

import multinet
from multinet import data, zoo
from multinet.calib import collect, consumer_specs
from multinet.solve import reap_greedy, reap_greedy_gs


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    print(torch.cuda.get_device_name(0), "torch", torch.__version__)
    ok = True
    for channels, block in ((64, 1), (256, 1), (64, 9), (128, 9)):
        gen = torch.Generator().manual_seed(0)
        m = channels * block
        x = torch.randn(4 * m, m, generator=gen, dtype=torch.float64)
        gram, weight = x.T @ x, torch.randn(m, 64, generator=gen, dtype=torch.float64)
        steps = channels // 2
        start = time.perf_counter()
        cpu = reap_greedy(gram, weight, steps, block=block)
        t_cpu = time.perf_counter() - start
        torch.cuda.synchronize()
        start = time.perf_counter()
        gpu = reap_greedy_gs(gram.cuda(), weight.cuda(), steps, block=block, chunk=channels)
        torch.cuda.synchronize()
        t_gpu = time.perf_counter() - start
        same = cpu.removed == gpu.removed
        diff = (cpu.errors - gpu.errors).abs().max().item() / cpu.errors.abs().max().item()
        ok &= same and diff < 1e-6
        print(f"C={channels:4d} block={block}: inverse CPU {t_cpu:7.3f}s  GS CUDA {t_gpu:7.3f}s  "
              f"same order {same}  max rel error diff {diff:.1e}")
    split = data.load("digits")
    graph = multinet.trace(zoo.create("resnet"), split.train_x[:2])
    names = graph.prunable_groups[0].consumer_names
    specs = consumer_specs(graph, names)
    cpu_stats = collect(graph.module, specs, split.train_x[:512])
    gpu_stats = collect(graph.module, specs, split.train_x[:512], device="cuda")
    for name in names:
        rel = ((cpu_stats[name].gram - gpu_stats[name].gram).abs().max() / cpu_stats[name].gram.abs().max()).item()
        ok &= rel < 1e-5
        print(f"calibration `{name}` CUDA vs CPU max rel diff {rel:.1e}")
    result = multinet.compress(zoo.create("resnet"), split.train_x[:512], ratio=0.5, device="cuda")
    print(f"compress on CUDA: accuracy {data.accuracy(result.model.cpu(), split.test_x, split.test_y):.3f}")
    print("ALL OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
