"""Neuro Unification of models that read the same images: unified vs separate REAP vs ZipIt!-style.

    python benchmarks/unify.py [--sets mlp-seeds mlp-tasks ...] [--budgets 0.6 0.4 ...]

Models are trained here on scikit-learn's digits (the zoo's recipe; the zoo checkpoint is reused
for seed 0 on the digit task): two tasks on the same images, "digit" (10 classes) and "parity"
(even/odd), and different seeds. For each set of models and each budget (a fraction of the set's
total FLOPs) it compares, with no fine-tuning and 1,024 calibration images:

* unified: ``multinet.unify`` (one MultiNet with bridges, auto schedule, REAP);
* separate: every model compressed on its own with the auto schedule to the same fraction;
* zipit: for MLP sets, a ZipIt!-style merge — the hidden features of all models at each depth
  are clustered by correlation (greedy average-linkage, within and across models), each cluster
  becomes one neuron with the averaged incoming weights, and consumers sum the outgoing weights
  of a cluster's members; no least-squares reconstruction.

Writes benchmarks/results/unify.{md,json,png}; also times inference of 256 images through the
unified network, through the separately compressed models one after another and through the
original models one after another.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import multinet
from multinet import Budget, BudgetError, data, zoo
from multinet.graph import count, trace
from multinet.zoo.models import MODELS
from multinet.zoo.train import fit

RESULTS = Path(__file__).parent / "results"
COMMAND = "python benchmarks/unify.py"
TASKS = {"digit": (lambda y: y, 10), "parity": (lambda y: y % 2, 2)}
SETS = {
    "mlp-seeds": [("mlp", "digit", 0), ("mlp", "digit", 1)],
    "mlp-tasks": [("mlp", "digit", 0), ("mlp", "parity", 0)],
    "mlp-triple": [("mlp", "digit", 0), ("mlp", "digit", 1), ("mlp", "parity", 0)],
    "vgg-tasks": [("vgg", "digit", 0), ("vgg", "parity", 0)],
    "vgg+resnet": [("vgg", "digit", 0), ("resnet", "parity", 0)],
    "vgg+mlp": [("vgg", "digit", 0), ("mlp", "parity", 0)],
    "mixed-triple": [("vgg", "digit", 0), ("resnet", "parity", 0), ("mlp", "digit", 1)],
}


def trained(arch: str, task: str, seed: int, split) -> nn.Module:
    if task == "digit" and seed == 0:
        return zoo.create(arch)
    label, classes = TASKS[task]
    torch.manual_seed(seed)
    model = MODELS[arch](in_channels=1, image_size=8, num_classes=classes)
    return fit(model, split.train_x, label(split.train_y), 40, seed)


def accuracies(outputs: dict, labels: dict) -> dict[str, float]:
    return {k: float((outputs[k].argmax(1) == labels[k]).float().mean()) for k in labels}


def flops(model: nn.Module, x) -> int:
    return count(trace(model, x).module).flops


# --- ZipIt!-style merge of same-architecture MLPs --------------------------------------------

def _linears(model) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _cluster(features: np.ndarray, width: int) -> list[list[int]]:
    """Greedy average-linkage on correlation until ``width`` clusters remain."""
    corr = np.corrcoef(features.T)
    corr = np.nan_to_num(corr, nan=0.0)
    np.fill_diagonal(corr, -np.inf)
    clusters = [[i] for i in range(features.shape[1])]
    sizes = np.ones(len(clusters))
    alive = np.ones(len(clusters), dtype=bool)
    while alive.sum() > width:
        masked = np.where(alive[:, None] & alive[None, :], corr, -np.inf)
        i, j = np.unravel_index(np.argmax(masked), masked.shape)
        merged = (corr[i] * sizes[i] + corr[j] * sizes[j]) / (sizes[i] + sizes[j])
        corr[i], corr[:, i] = merged, merged
        corr[i, i] = -np.inf
        clusters[i] += clusters[j]
        sizes[i] += sizes[j]
        alive[j] = False
    return [c for c, a in zip(clusters, alive) if a]


class ZipMLP(nn.Module):
    def __init__(self, trunk: nn.Sequential, heads: dict[str, nn.Linear]):
        super().__init__()
        self.trunk, self.heads = trunk, nn.ModuleDict(heads)

    def forward(self, x):
        h = self.trunk(x.flatten(1))
        return {k: head(h) for k, head in self.heads.items()}


def zipit(models: dict[str, nn.Module], calib: torch.Tensor, fraction: float) -> ZipMLP:
    layers = {k: _linears(m) for k, m in models.items()}
    depth = len(next(iter(layers.values()))) - 1  # hidden layers; the last Linear is the head
    widths = [sum(layers[k][d].out_features for k in models) for d in range(depth)]
    with torch.no_grad():
        acts = {k: [] for k in models}
        for k, m in models.items():
            h = calib.flatten(1)
            for layer in layers[k][:depth]:
                h = torch.relu(layer(h))
                acts[k].append(h)
    owners = [[(k, i) for k in models for i in range(layers[k][d].out_features)] for d in range(depth)]
    scale = fraction
    for _ in range(30):  # widths proportional to the original, scaled until the FLOPs fit
        ws = [max(1, round(scale * w)) for w in widths]
        total = calib[0].numel() * ws[0] + sum(a * b for a, b in zip(ws, ws[1:])) + sum(
            ws[-1] * layers[k][-1].out_features for k in models)
        full = sum(flops(m, calib[:1]) for m in models.values())
        if total <= fraction * full:
            break
        scale *= 0.95
    trunk, prev = [], None  # prev: clusters of the previous depth as lists of (model, index)
    for d in range(depth):
        feats = torch.cat([acts[k][d] for k in models], 1).numpy().astype(np.float64)
        clusters = [[owners[d][i] for i in c] for c in _cluster(feats, ws[d])]
        in_dim = calib[0].numel() if prev is None else len(prev)
        w = torch.zeros(len(clusters), in_dim)
        b = torch.zeros(len(clusters))
        for ci, members in enumerate(clusters):
            for k, i in members:
                row = layers[k][d].weight[i].detach()
                if prev is not None:  # express the row in merged input features: sum over each cluster
                    row = torch.stack([sum((row[j] for kk, j in pc if kk == k), torch.tensor(0.0)) for pc in prev])
                w[ci] += row / len(members)
                b[ci] += layers[k][d].bias[i].detach() / len(members)
        lin = nn.Linear(in_dim, len(clusters))
        lin.weight.data, lin.bias.data = w, b
        trunk += [lin, nn.ReLU()]
        prev = clusters
    heads = {}
    for k in models:
        head = layers[k][-1]
        lin = nn.Linear(len(prev), head.out_features)
        lin.weight.data = torch.stack([sum((head.weight[:, j].detach() for kk, j in pc if kk == k),
                                           torch.zeros(head.out_features)) for pc in prev], 1)
        lin.bias.data = head.bias.detach().clone()
        heads[k] = lin
    return ZipMLP(nn.Sequential(*trunk), heads).eval()


# --- the benchmark ----------------------------------------------------------------------------

def run_set(name: str, split, calib, budgets) -> list[dict]:
    spec = SETS[name]
    models = {f"{arch}_{task}_{seed}": trained(arch, task, seed, split) for arch, task, seed in spec}
    labels = {key: TASKS[task][0](split.test_y) for key, (_, task, _) in zip(models, spec)}
    x1 = calib[:1]
    full = {k: flops(m, x1) for k, m in models.items()}
    total = sum(full.values())
    with torch.no_grad():
        base = accuracies({k: m(split.test_x) for k, m in models.items()}, labels)
    rows = []
    for frac in budgets:
        row = dict(set=name, budget=frac, base=base)
        start = time.perf_counter()
        try:
            u = multinet.unify(models, calib, budget=Budget(flops=frac))
            with torch.no_grad():
                row["unified"] = accuracies(u.model(split.test_x), labels)
            row["unified_flops"] = u.costs_after["total"]["flops"] / total
            row["unified_s"] = time.perf_counter() - start
            row["bridges"] = len(u.bridges)
            row["chosen"] = u.chosen
            row["unified_ms"] = batch_ms(lambda: u.model(split.test_x[:256]))
            reverse = multinet.unify(dict(reversed(list(models.items()))), calib, budget=Budget(flops=frac))
            with torch.no_grad():
                row["reversed"] = accuracies(reverse.model(split.test_x), labels)
        except BudgetError as exc:
            u, row["unified"], row["note_unified"] = None, None, str(exc)
        # separate: every model compressed on its own to the same fraction (unify computes it as its baseline)
        sep = {k: None for k in models}
        if u is not None:
            for k, r in u.separate.items():
                with torch.no_grad():
                    sep[k] = accuracies({k: r.model(split.test_x)}, {k: labels[k]})[k]
        row["separate"] = sep if all(v is not None for v in sep.values()) else None
        if row["separate"]:
            row["separate_flops"] = sum(r.flops_after for r in u.separate.values()) / total
            row["separate_ms"] = batch_ms(lambda: [r.model(split.test_x[:256]) for r in u.separate.values()])
        row["original_ms"] = batch_ms(lambda: [m(split.test_x[:256]) for m in models.values()])
        if all(a == "mlp" for a, _, _ in spec):
            z = zipit(models, calib, frac)
            with torch.no_grad():
                row["zipit"] = accuracies(z(split.test_x), labels)
            row["zipit_flops"] = flops(z, x1) / total
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "base"}), flush=True)
    return rows


def batch_ms(fn, repeats: int = 21) -> float:
    """Median milliseconds of ``fn`` (one batch of 256 through the models), after one warm-up call."""
    times = []
    with torch.no_grad():
        fn()
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def table(rows: list[dict]) -> str:
    lines = ["| set | FLOPs budget | model | original | unified | unified, list reversed | kept | separate REAP | "
             "ZipIt!-style |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for k, b in r["base"].items():
            u = r["unified"][k] if r.get("unified") else None
            rev = r["reversed"][k] if r.get("reversed") else None
            kept = r.get("chosen", {}).get(k, "—")
            s = r["separate"][k] if r.get("separate") else None
            z = r["zipit"][k] if r.get("zipit") else None
            cell = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
            lines.append(f"| {r['set']} | {r['budget']:.0%} | {k} | {b:.3f} | {cell(u)} | {cell(rev)} | {kept} | {cell(s)} | "
                         f"{cell(z)} |")
    return "\n".join(lines)


def goals(rows: list[dict]) -> str:
    """The issue's goals, checked on the rows: unified >= separate - 0.3 pt for every model; the
    list's order changes no accuracy by more than 0.5 pt; where separate loses >= 15 pts unified
    loses <= 5; and the fewest FLOPs with <= 1 pt lost on every model."""
    lines = ["| set | unified < separate − 0.3 pt (budget model: pts) | order changes accuracy > 0.5 pt | "
             "separate loses ≥ 15 pts: unified loss | fewest FLOPs with ≤ 1 pt lost on every model: unified / "
             "separate |", "|---|---|---|---|---|"]
    for name in dict.fromkeys(r["set"] for r in rows):
        mine = [r for r in rows if r["set"] == name]
        worse, order, collapse = [], [], []
        for r in mine:
            if not (r.get("unified") and r.get("separate")):
                continue
            for k, base in r["base"].items():
                gap = r["unified"][k] - r["separate"][k]
                if gap < -0.003 - 1e-9:
                    worse.append(f"{r['budget']:.0%} {k}: {100 * gap:+.1f}")
                if r.get("reversed") and abs(r["reversed"][k] - r["unified"][k]) > 0.005 + 1e-9:
                    order.append(f"{r['budget']:.0%} {k}: {100 * (r['reversed'][k] - r['unified'][k]):+.1f}")
                if base - r["separate"][k] >= 0.15:
                    collapse.append(f"{r['budget']:.0%} {k}: {100 * (base - r['unified'][k]):.1f} (sep. "
                                    f"{100 * (base - r['separate'][k]):.1f})")

        def fewest(method):
            ok = [r[f"{method}_flops"] for r in mine if r.get(method)
                  and all(r["base"][k] - r[method][k] <= 0.01 + 1e-9 for k in r["base"])]
            return f"{min(ok):.0%}" if ok else "—"

        lines.append(f"| {name} | {'; '.join(worse) or 'none'} | {'; '.join(order) or 'none'} | "
                     f"{'; '.join(collapse) or 'not reached'} | {fewest('unified')} / {fewest('separate')} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r["set"] for r in rows))
    fig, axes = plt.subplots(1, len(sets), figsize=(3.6 * len(sets), 3.4), squeeze=False)
    for ax, name in zip(axes[0], sets):
        mine = [r for r in rows if r["set"] == name]
        for key in mine[0]["base"]:
            for method, style in (("unified", "-"), ("separate", "--"), ("zipit", ":")):
                pts = [(r[f"{method}_flops"], r[method][key]) for r in mine if r.get(method)]
                if pts:
                    ax.plot(*zip(*sorted(pts)), style, marker="o", markersize=3, label=f"{method} {key}")
        ax.set_xscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("FLOPs kept (fraction of the set)")
        ax.set_ylabel("test accuracy")
        ax.legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.6, 0.4, 0.25, 0.15, 0.08, 0.04, 0.02, 0.01])
    parser.add_argument("--replot", action="store_true", help="rewrite the tables and plot from results/unify.json")
    args = parser.parse_args()
    global COMMAND
    COMMAND = "python benchmarks/unify.py" + ("" if args.replot else f" --sets {' '.join(args.sets)} --budgets "
                                                                    f"{' '.join(map(str, args.budgets))}")
    warnings.filterwarnings("ignore")
    if args.replot:
        rows = json.loads((RESULTS / "unify.json").read_text())["rows"]
    else:
        split = data.load("digits")
        calib = split.train_x[:1024]
        rows = []
        for name in args.sets:
            rows += run_set(name, split, calib, args.budgets)
    RESULTS.mkdir(exist_ok=True)
    speed = "\n".join(["| set | FLOPs budget | unified network ms | separately compressed, one after another ms | "
                       "original models one after another ms |", "|---|---|---|---|---|"] + [
        f"| {r['set']} | {r['budget']:.0%} | {r.get('unified_ms', float('nan')):.2f} | "
        f"{r.get('separate_ms', float('nan')):.2f} | {r['original_ms']:.2f} |" for r in rows])
    text = ("# Neuro Unification (digits, no fine-tuning)\n\nCommand: `" + COMMAND + "`\n\n## Goals\n\n"
            + goals(rows) + "\n\n## Accuracy per model\n\n" + table(rows)
            + "\n\n## Inference of 256 images (median of 21 runs)\n\n" + speed + "\n")
    (RESULTS / "unify.md").write_text(text)
    (RESULTS / "unify.json").write_text(json.dumps(dict(rows=rows), indent=1))
    plot(rows, RESULTS / "unify.png")
    print(text)


if __name__ == "__main__":
    main()
