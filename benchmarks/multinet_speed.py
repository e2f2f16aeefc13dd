"""Per-batch inference time of a MultiNet: members one after another, unfused, fused, batched.

    python benchmarks/multinet_speed.py [--threads 2] [--batch 256] [--repeats 30] [--out FILE]

For each set of zoo models (digits weights) it times one batch of digits test images through
(1) the member models called one after another, (2) the MultiNet as built (one fx graph, no
fusion), (3) its fused form (``net.fused()``: layers that read the same tensor as one wider
layer; what export uses), (3b) its timed fused form (``net.fused(timed_on=batch)``: each such set fused
only where the wider layer is not slower on this batch; what ``multinet.infer`` runs), (4) its batched form (``net.fused(batched=True)``: also same-shaped layers of different
members as one batched matmul / grouped conv) and (5) the fused form overlapped
(``net.fused().overlapped()``: what the members compute apart runs at the same time, on worker
threads on a CPU), and the same for a unified (compressed) MultiNet of the set. The variants take turns in
``--repeats`` rounds after warm-up (medians, and paired per-round ratios with 95 % intervals, as
benchmarks/unify.py times them), torch threads set explicitly. Writes benchmarks/results/multinet_speed.md.
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch

import multinet
from multinet import MultiNet, data, zoo
from multinet.unification.batching import batched_count
from unify import interleaved_ms, paired_ratio  # benchmarks/unify.py: the same paired timing

RESULTS = Path(__file__).parent / "results"
SETS = {"vgg+resnet": ("vgg", "resnet"), "mlp+mlp": ("mlp", "mlp"), "vgg+vgg+mlp": ("vgg", "vgg", "mlp"),
        "mlp+vgg+resnet+mobilenet+densenet": ("mlp", "vgg", "resnet", "mobilenet", "densenet"),
        "resnet x3 (ensemble)": ("resnet", "resnet", "resnet")}
UNIFIED = ("vgg+resnet", "mlp+mlp", "vgg+vgg+mlp")  # sets also timed unified at 40 % of their FLOPs


def one_after_another(models: dict):
    def run(x):
        return {name: model(x) for name, model in models.items()}
    return run


def row(name: str, kind: str, members: dict | None, net: MultiNet, x: torch.Tensor, repeats: int) -> dict:
    """The variants timed in interleaved rounds (each round starts one variant later); medians, and the
    paired per-round ratios unfused / one after another and fused / unfused with their 95 % intervals."""
    fused, batched, timed = net.fused(), net.fused(batched=True), net.fused(timed_on=x)
    overlapped = fused.overlapped()
    with torch.no_grad():
        ref, out, out_b, out_o, out_t = net(x), fused(x), batched(x), overlapped(x), timed(x)
    error = max(float((o[k] - ref[k]).abs().max()) for o in (out, out_b, out_o, out_t) for k in ref)
    fns = {"unfused": lambda: net(x), "fused": lambda: fused(x), "timed": lambda: timed(x),
           "batched": lambda: batched(x), "overlapped": lambda: overlapped(x)}
    if members is not None:
        fns["separate"] = (lambda run: lambda: run(x))(one_after_another(members))
    medians, rounds = interleaved_ms(fns, repeats)
    ratios = {"fused_vs_unfused": paired_ratio(rounds["fused"], rounds["unfused"]),
              "timed_vs_unfused": paired_ratio(rounds["timed"], rounds["unfused"]),
              "batched_vs_fused": paired_ratio(rounds["batched"], rounds["fused"]),
              "overlapped_vs_fused": paired_ratio(rounds["overlapped"], rounds["fused"])}
    if members is not None:
        ratios["unfused_vs_separate"] = paired_ratio(rounds["unfused"], rounds["separate"])
        ratios["overlapped_vs_separate"] = paired_ratio(rounds["overlapped"], rounds["separate"])
    return dict(set=name, kind=kind, separate=medians.get("separate"), unfused=medians["unfused"],
                fused=medians["fused"], timed=medians["timed"], batched=medians["batched"],
                overlapped=medians["overlapped"], ratios=ratios,
                fused_layers=sum(1 for n, _ in fused.named_children() if n.startswith("fused_")),
                timed_layers=sum(1 for n, _ in timed.named_children() if n.startswith("fused_")),
                batched_ops=batched_count(batched.graph_module), error=error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-unified", action="store_true", help="skip the unified (compressed) MultiNets")
    parser.add_argument("--out", type=Path, default=RESULTS / "multinet_speed.md", help="the results file")
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
        rows.append(row(name, "original", models, net, x, args.repeats))
        print(rows[-1], flush=True)
        if not args.no_unified and name in UNIFIED:
            unified = multinet.unify(models, split.train_x[:512], budget=0.4, max_positions=16).model.eval()
            rows.append(row(name, "unified 40 %", None, unified, x, args.repeats))
            print(rows[-1], flush=True)
    write(rows, args)


def write(rows: list[dict], args) -> None:
    lines = [f"# MultiNet inference speed (batch {args.batch}, {args.threads} torch threads, CPU, median of "
             f"{args.repeats} interleaved rounds)", "",
             "`python benchmarks/multinet_speed.py`: ms per batch of digits test images. *one after another*: "
             "the member models called in turn; *unfused*: the MultiNet's graph as built; *fused*: "
             "`net.fused()` (every set of layers reading the same tensor as one; what export uses); *timed fused*: "
             "`net.fused(timed_on=batch)` (a set fused only where the wider layer is not slower on this batch; what "
             "`multinet.infer` runs); *batched*: `net.fused(batched=True)` (same-shaped "
             "layers of different members as one batched matmul or grouped conv); *overlapped*: `net.fused().overlapped()` "
             "(what the members compute apart runs at the same time, here on worker threads). The variants take turns "
             "in every round (each round starting one later); a ratio is the median over rounds of the two variants' "
             "times in the same round, with its 95 % order-statistics interval. Max |fused, timed fused, batched or "
             "overlapped − unfused| over the outputs.", "",
             "| set | models | one after another (ms) | unfused MultiNet (ms) | fused (ms) | timed fused (ms) | "
             "batched (ms) | overlapped (ms) | unfused / one after another | fused / unfused | timed fused / unfused | "
             "batched / fused | overlapped / fused | overlapped / one after another | fused layers (timed) | "
             "batched ops | max abs diff |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def ratio(r, key):
        if key not in r["ratios"]:
            return "—"
        mid, lo, hi = r["ratios"][key]
        return f"×{mid:.3f} [{lo:.3f}, {hi:.3f}]"

    for r in rows:
        separate = f"{r['separate']:.2f}" if r["separate"] is not None else "—"
        lines.append(f"| {r['set']} | {r['kind']} | {separate} | {r['unfused']:.2f} | {r['fused']:.2f} | "
                     f"{r['timed']:.2f} | {r['batched']:.2f} | {r['overlapped']:.2f} | "
                     f"{ratio(r, 'unfused_vs_separate')} | {ratio(r, 'fused_vs_unfused')} | "
                     f"{ratio(r, 'timed_vs_unfused')} | {ratio(r, 'batched_vs_fused')} | "
                     f"{ratio(r, 'overlapped_vs_fused')} | {ratio(r, 'overlapped_vs_separate')} | "
                     f"{r['fused_layers']} ({r['timed_layers']}) | {r['batched_ops']} | {r['error']:.1e} |")
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
