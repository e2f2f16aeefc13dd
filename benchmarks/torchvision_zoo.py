"""Trace every torchvision classifier (random weights), prune 30 % of each prunable group, run it.

Needs torchvision, which here means its own environment (PyPI's torchvision does not import
beside the CPU torch 2.13 wheel):

    python -m venv .venv-tv && .venv-tv/bin/pip install torch==2.14.1 torchvision==0.29.1 -e .
    .venv-tv/bin/python benchmarks/torchvision_zoo.py [--models resnet18 vit_b_16] [--out benchmarks/results/torchvision.md]

Prints one row per model: traced / groups / prunable groups / attention-head groups and
grouped-conv groups (prunable/all of each) / pruned model runs with the original output shape /
FLOPs (MACs) and params before -> after. A grouped conv's group loses the same number of channels
from every conv group (a random balanced 30 %), and the pruned model's grouped convs must keep
their ``groups``. A failure is reported in its row with the first line of the error, never hidden.
"""
from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

import multinet
from multinet.pipeline.grouped_conv import balanced_order, removal_count

INPUT_SIDE = {"inception_v3": 299}


def classifiers() -> list[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def run_one(name: str, ratio: float, seed: int) -> dict:
    import torchvision.models as tvm

    row = {"model": name, "traced": "no", "groups": "-", "prunable": "-", "heads": "-", "grouped conv": "-",
           "channels": "-", "runs": "-", "flops": "-", "params": "-", "note": ""}
    torch.manual_seed(seed)
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
    model = tvm.get_model(name, weights=None, **kwargs).eval()
    side = INPUT_SIDE.get(name, 224)
    x = torch.randn(1, 3, side, side)
    start = time.time()
    try:
        graph = multinet.trace(model, x)
    except multinet.MultinetError as exc:
        row["note"] = str(exc).split(": ", 1)[-1][:90]
        return row
    row["traced"] = "yes"
    row["groups"] = str(len(graph.groups))
    prunable = graph.prunable_groups
    row["prunable"] = str(len(prunable))
    heads = [g for g in graph.groups if g.attention_heads]
    grouped = [g for g in graph.groups if g.grouped_conv]
    row["heads"] = f"{sum(g.prunable for g in heads)}/{len(heads)}"
    row["grouped conv"] = f"{sum(g.prunable for g in grouped)}/{len(grouped)}"
    row["channels"] = f"{sum(g.size for g in prunable)}/{sum(g.size for g in graph.groups)}"
    if not prunable:
        reasons = {g.reasons[0].split(" at ")[0] for g in graph.groups if g.reasons}
        row["note"] = "; ".join(sorted(reasons))[:90]
    before = multinet.count(graph.module)
    gen = torch.Generator().manual_seed(seed)
    keep = {g.id: _random_keep(g, ratio, gen) for g in prunable}
    try:
        with torch.no_grad():
            reference = graph.module(x)
            pruned = multinet.prune(graph, keep)
            out = pruned(x)
        same = [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out)] == [
            tuple(t.shape) for t in torch.utils._pytree.tree_leaves(reference)]
        broken = _broken_grouped_convs(graph.module, pruned)
        row["runs"] = "yes" if same and not broken else "shape changed" if not same else "groups broken"
        if broken:
            row["note"] = f"grouped conv `{broken[0]}` lost its groups"
        after = multinet.count(pruned, (x,))
        row["flops"] = f"{before.flops / 1e6:,.0f}M -> {after.flops / 1e6:,.0f}M"
        row["params"] = f"{before.params / 1e6:.1f}M -> {after.params / 1e6:.1f}M"
    except Exception as exc:  # report, do not hide: this is what the benchmark measures
        row["runs"] = "no"
        row["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    row["seconds"] = f"{time.time() - start:.1f}"
    return row


def _random_keep(group, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """A random ``ratio`` of the group's channels removed; for a grouped conv, the same number from
    every conv group (``ChannelGroup.balanced``), as surgery requires."""
    order = torch.randperm(group.size, generator=gen)
    if not group.balanced:
        return order[: max(1, round(group.size * (1 - ratio)))].sort().values
    removed = set(balanced_order(order, removal_count(group, ratio), group.balanced, group.pieces))
    keep = torch.tensor([c for c in range(group.size) if c not in removed])
    assert group.is_balanced(keep)
    return keep


def _broken_grouped_convs(original: torch.nn.Module, pruned: torch.nn.Module) -> list[str]:
    """Grouped convs whose ``groups`` changed or no longer divides their channels after pruning."""
    broken = []
    for name, m in original.named_modules():
        if isinstance(m, torch.nn.modules.conv._ConvNd) and m.groups > 1:
            p = pruned.get_submodule(name)
            depthwise = m.groups == m.in_channels
            ok = (p.groups == p.in_channels if depthwise else p.groups == m.groups) and \
                p.in_channels % p.groups == 0 and p.out_channels % p.groups == 0 and \
                p.weight.shape[1] == p.in_channels // p.groups
            if not ok:
                broken.append(name)
    return broken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/torchvision.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = args.models or classifiers()
    cols = ["model", "traced", "groups", "prunable", "heads", "grouped conv", "channels", "runs", "flops", "params",
            "seconds", "note"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    print(lines[0], flush=True)
    rows = []
    for name in names:
        row = run_one(name, args.ratio, args.seed)
        rows.append(row)
        lines.append("| " + " | ".join(str(row.get(c, "-")) for c in cols) + " |")
        print(lines[-1], flush=True)
        gc.collect()
    traced = sum(r["traced"] == "yes" for r in rows)
    with_groups = sum(r["prunable"] not in ("-", "0") for r in rows)
    runs = sum(r["runs"] == "yes" for r in rows)

    def total(col: str, part: int = 0) -> int:
        return sum(int(r[col].split("/")[part]) if "/" in r[col] else int(r[col])
                   for r in rows if r[col] != "-")

    summary = (f"\n{len(rows)} classifiers: {traced} traced, {with_groups} with prunable groups, "
               f"{runs} pruned models ran with unchanged output shapes "
               f"(random {args.ratio:.0%} of every prunable group, torch {torch.__version__}); "
               f"{total('prunable'):,} of {total('groups'):,} groups prunable, among them "
               f"{total('heads'):,} of {total('heads', 1):,} attention-head groups and "
               f"{total('grouped conv'):,} of {total('grouped conv', 1):,} grouped-conv groups.\n\n"
               "heads: attention-head groups (a channel is one head of head_dim features), prunable/all; "
               "grouped conv: groups a grouped convolution reads or writes, prunable/all (pruned with the "
               "same count from every conv group; `groups` checked after pruning).")
    print(summary)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n" + summary + "\n")


if __name__ == "__main__":
    main()
