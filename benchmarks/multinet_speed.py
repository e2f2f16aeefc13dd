"""Per-batch inference time of a MultiNet: members one after another, unfused, fused.

    python benchmarks/multinet_speed.py [--threads 2] [--batch 256] [--repeats 30]

For each set of zoo models (digits weights) it times one batch of digits test images through
(1) the member models called one after another, (2) the MultiNet as built (one fx graph, no
fusion) and (3) its fused form (``net.fused()``: layers that read the same tensor as one wider
layer), and the same for a unified (compressed) MultiNet of the set. Median of ``--repeats``
runs after warm-up, torch threads set explicitly. Writes benchmarks/results/multinet_speed.md.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch

import multinet
from multinet import MultiNet, data, zoo

RESULTS = Path(__file__).parent / "results"
SETS = {"vgg+resnet": ("vgg", "resnet"), "mlp+mlp": ("mlp", "mlp"), "vgg+vgg+mlp": ("vgg", "vgg", "mlp"),
        "mlp+vgg+resnet+mobilenet+densenet": ("mlp", "vgg", "resnet", "mobilenet", "densenet")}


def median_ms(fn, x: torch.Tensor, repeats: int) -> float:
    """Median wall time of ``fn(x)`` in milliseconds, after three warm-up calls."""
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def one_after_another(models: dict):
    def run(x):
        return {name: model(x) for name, model in models.items()}
    return run


def row(name: str, kind: str, separate_ms: float | None, net: MultiNet, x: torch.Tensor, repeats: int) -> dict:
    fused = net.fused()
    with torch.no_grad():
        ref, out = net(x), fused(x)
    error = max(float((out[k] - ref[k]).abs().max()) for k in ref)
    return dict(set=name, kind=kind, separate=separate_ms, unfused=median_ms(net, x, repeats),
                fused=median_ms(fused, x, repeats), fused_layers=sum(1 for n, _ in fused.named_children()
                                                                      if n.startswith("fused_")), error=error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-unified", action="store_true", help="skip the unified (compressed) MultiNets")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    split = data.load("digits")
    x = split.test_x[: args.batch]
    rows = []
    for name, kinds in SETS.items():
        torch.manual_seed(0)
        models = {f"{k}{i}": zoo.create(k).eval() for i, k in enumerate(kinds)}
        net = MultiNet(models, split.train_x[:1]).eval()
        rows.append(row(name, "original", median_ms(one_after_another(models), x, args.repeats), net, x,
                        args.repeats))
        print(rows[-1], flush=True)
        if not args.no_unified and len(kinds) <= 3:
            unified = multinet.unify(models, split.train_x[:512], budget=0.4, max_positions=16).model.eval()
            rows.append(row(name, "unified 40 %", None, unified, x, args.repeats))
            print(rows[-1], flush=True)
    write(rows, args)


def write(rows: list[dict], args) -> None:
    lines = [f"# MultiNet inference speed (batch {args.batch}, {args.threads} torch threads, CPU, median of "
             f"{args.repeats})", "",
             "`python benchmarks/multinet_speed.py`: ms per batch of digits test images. *one after another*: "
             "the member models called in turn; *unfused*: the MultiNet's graph as built; *fused*: "
             "`net.fused()` (what `multinet.infer` and export use). Max |fused − unfused| over the outputs.", "",
             "| set | models | one after another (ms) | unfused MultiNet (ms) | fused (ms) | fused layers | "
             "max abs diff |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        separate = f"{r['separate']:.2f}" if r["separate"] is not None else "—"
        lines.append(f"| {r['set']} | {r['kind']} | {separate} | {r['unfused']:.2f} | {r['fused']:.2f} | "
                     f"{r['fused_layers']} | {r['error']:.1e} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "multinet_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
