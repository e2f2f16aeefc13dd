"""The least work REAP must do besides forward passes, in units of one plain forward pass.

    python benchmarks/solve_floor.py [--configs resnet50:64:112 resnet50:1024:224 zoo-resnet:1024:8] [--threads 2]

Why: issue 11 asks for a sequential compression run of at most 5 plain forward passes (one-shot 3) and
was measured at 64 images of 112x112, where benchmarks/scale.py reads 27-33 passes for ResNet-50
while the 1,024-image rows at 224x224 read about 4. This benchmark separates what no implementation of the
method can avoid from what ours adds. Every consumer of a prunable channel group needs the Gram matrix
of its input (rows: samples x sampled positions, ``max_positions=64`` as scale.py runs; columns: its
input channels x kernel taps) and one factorisation of it (the greedy and the least-squares
reconstruction read its inverse). Both costs are fixed by the model's widths; only the forward pass
shrinks with fewer or smaller images. For each consumer input (consumers that read the same tensor with
the same geometry share one Gram) the script times, on random data of the exact shapes: one float32
GEMM ``X^T X`` over all rows, and a Cholesky factorisation plus the inverse from it, in float32 (the
cheapest conceivable) and in float64 (what the solver uses). The floor of a sequential run is then 2
passes (the original's and the compressed model's activations) + Grams + factorisations; of a one-shot
run, 1 pass + the same. Columns in MACs say the same independently of this machine's speed.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn as nn

import multinet
from scale import build, calibration_images

RESULTS = Path(__file__).parent / "results" / "solve_floor.md"
MAX_POSITIONS = 64  # as benchmarks/scale.py runs compress
GOALS = {"sequential": 5, "one-shot": 3}


def consumer_inputs(graph: multinet.ChannelGraph, model: nn.Module, example: torch.Tensor,
                    images: int) -> list[tuple[int, int]]:
    """(rows, columns) of each distinct Gram the consumers of the prunable groups need over ``images``."""
    names = sorted({n for g in graph.prunable_groups for n in g.consumer_names})
    seen: dict[tuple, tuple[int, int]] = {}
    alive = []  # the inputs stay referenced during the pass, so that no two of them share an id()
    hooks = []

    def record(name):
        def hook(module, args, out):
            x = args[0]
            alive.append(x)
            if isinstance(module, nn.Conv2d):
                per_image = min(MAX_POSITIONS, out.shape[-2] * out.shape[-1])
                cols = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
                key = (id(x), module.kernel_size, module.stride, module.padding, module.dilation, module.groups)
            else:  # Linear: one row per vector it reads (a token sequence gives several per sample)
                per_image, cols = x[0].numel() // x.shape[-1], x.shape[-1]
                key = (id(x), "linear")
            seen.setdefault(key, (images * per_image, cols))
        return hook

    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise SystemExit(f"{name}: {type(module).__name__} consumers are not modelled here")
        hooks.append(module.register_forward_hook(record(name)))
    with torch.no_grad():
        model(example)
    for h in hooks:
        h.remove()
    return list(seen.values())


def seconds(fn, repeats: int, warm_up=None, enough_s: float = 60.0) -> float:
    """The median of ``repeats`` timings, or of fewer where they already took ``enough_s`` (a plain pass
    over 1,024 images of 224x224 is over a minute here)."""
    (warm_up or fn)()
    times = []
    while len(times) < repeats and sum(times) < enough_s:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def plain_pass(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    def run():
        with torch.no_grad():
            for i in range(0, len(x), 32):
                model(x[i:i + 32])
    return seconds(run, repeats, warm_up=lambda: model(x[:32]))


def gram_seconds(rows: int, cols: int, repeats: int) -> float:
    x = torch.randn(rows, cols)
    return seconds(lambda: x.T @ x, repeats, warm_up=lambda: x[:256].T @ x[:256])


def factorisation_seconds(cols: int, dtype: torch.dtype, repeats: int) -> float:
    a = torch.randn(2 * cols, cols, dtype=dtype)
    gram = a.T @ a + torch.eye(cols, dtype=dtype)
    return seconds(lambda: torch.cholesky_inverse(torch.linalg.cholesky(gram)), repeats)


def measure(name: str, images: int, size: int, repeats: int) -> dict:
    model, example = build(name, size)
    torch.manual_seed(0)
    x = calibration_images(example, images)
    graph = multinet.trace(model, example)
    grams = consumer_inputs(graph, model, example, images)
    plain_macs = multinet.count(graph.module).flops * images
    plain_s = plain_pass(model, x, repeats)
    gram_s = sum(gram_seconds(r, c, repeats) for r, c in grams)
    by_cols: dict[int, int] = {}
    for _, c in grams:
        by_cols[c] = by_cols.get(c, 0) + 1
    f32 = sum(n * factorisation_seconds(c, torch.float32, repeats) for c, n in by_cols.items())
    f64 = sum(n * factorisation_seconds(c, torch.float64, repeats) for c, n in by_cols.items())
    return dict(model=name, images=images, size=size, grams=len(grams), widest=max(c for _, c in grams),
                plain_s=plain_s, gram_macs=sum(r * c * c for r, c in grams) / plain_macs,
                factor_macs=sum(c ** 3 for _, c in grams) / plain_macs, gram=gram_s / plain_s,
                f32=f32 / plain_s, f64=f64 / plain_s)


def table(rows: list[dict]) -> str:
    lines = ["| model | calibration set | Grams (widest) | plain pass s | Gram GEMMs: MACs / time | "
             "factorisations: MACs / float32 time / float64 time | floor, sequential (goal 5) | "
             "floor, one-shot (goal 3) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fixed = r["gram"] + r["f32"]
        lines.append(f"| {r['model']} | {r['images']} x {r['size']}² | {r['grams']} ({r['widest']}) | "
                     f"{r['plain_s']:.2f} | {r['gram_macs']:.2f} / {r['gram']:.2f} | "
                     f"{r['factor_macs']:.2f} / {r['f32']:.2f} / {r['f64']:.2f} | **{2 + fixed:.1f}** | "
                     f"**{1 + fixed:.1f}** |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["resnet50:64:112", "resnet50:1024:224", "zoo-resnet:1024:8"],
                        help="model:images:size (models as benchmarks/scale.py builds them)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for config in args.configs:
        name, images, size = config.split(":")
        rows.append(measure(name, int(images), int(size), args.repeats))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    command = f"python benchmarks/solve_floor.py --configs {' '.join(args.configs)} --threads {args.threads}"
    text = (f"# The floor of a compression run: Grams and their factorisations, in plain passes\n\n"
            f"`{command}` (torch {torch.__version__}, {args.threads} threads; median of {args.repeats} timings "
            f"each, fewer where they took a minute). All columns after the plain pass are in units of that pass; floors use the float32 "
            f"factorisations.\n\n{table(rows)}\n")
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
