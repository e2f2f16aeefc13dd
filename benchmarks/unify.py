"""Neuro Unification of models that read the same images: unified vs separate REAP vs ZipIt!-style.

    python benchmarks/unify.py [--sets mlp-seeds ...] [--budgets 0.6 0.4 ...] [--threads 1] [--repeats 21]

Models are trained here on scikit-learn's digits (the zoo's recipe; the zoo checkpoint is reused
for seed 0 on the digit task): two tasks on the same images, "digit" (10 classes) and "parity"
(even/odd), and different seeds. For each set of models and each budget (a fraction of the set's
total FLOPs) it compares, with no fine-tuning and 1,024 calibration images:

* unified: ``multinet.unify`` (canonical member order, R²-chosen links, every member also
  compressed alone and falling back to that where unification would leave it worse), run twice:
  with the model list as given and reversed;
* separate: every model compressed on its own with the auto schedule to the same fraction
  (``Unified.separate``, which unify computes as its baseline);
* zipit: for MLP sets, a ZipIt!-style merge — the hidden features of all models at each depth
  are clustered by correlation (greedy average-linkage, within and across models), each cluster
  becomes one neuron with the averaged incoming weights, and consumers sum the outgoing weights
  of a cluster's members; no least-squares reconstruction.

The never-worse goal is read twice: on the 360 test images, and on 773 held-out images (those and
the 413 training images the calibration set leaves out). Per budget it also times one batch of 256
test images (median of ``--repeats`` rounds after a warm-up; in every round each variant runs once, in turn, each round starting one variant later, so
load from other processes hits all of them alike; ``torch.set_num_threads(--threads)``). A speed goal
compares two variants by the median of their per-round time ratios with a 95 % interval: met (≤ 1),
within noise (above 1, interval reaching 1) or not met. The variants: (a) the original models one after another,
(b) the separately compressed models one after another, (c) the unfused MultiNet of the original
(uncompressed) models, (d) the unified network fused as ``multinet.infer`` runs it
(``Unified.model.fused(timed_on=batch)``: each set of sibling layers fused only where that is not slower on
the timed batch) and (e) unfused.
Writes benchmarks/results/unify.{md,json,png}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.stats
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
    # three architectures, related tasks: two digit classifiers (VGG, ResNet of another seed) and a parity MLP
    "vgg+resnet+mlp": [("vgg", "digit", 0), ("resnet", "digit", 1), ("mlp", "parity", 0)],
}
_TRAINED: dict[tuple, nn.Module] = {}


def trained(arch: str, task: str, seed: int, split) -> nn.Module:
    """The model (trained once per process; sets share it)."""
    key = (arch, task, seed)
    if key not in _TRAINED:
        if task == "digit" and seed == 0:
            _TRAINED[key] = zoo.create(arch).eval()
        else:
            label, classes = TASKS[task]
            torch.manual_seed(seed)
            model = MODELS[arch](in_channels=1, image_size=8, num_classes=classes)
            _TRAINED[key] = fit(model, split.train_x, label(split.train_y), 40, seed).eval()
    return _TRAINED[key]


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

TIMED = ("original", "separate", "multinet", "fused", "unified")  # (a), (b), (c), (d), (e)
# inference is timed per batch of this many test images, and unify times its link trials at the same
# batch (speed_check): which layers are fast depends on it
INFERENCE_BATCH = 256


def run_set(name: str, split, calib, budgets, repeats: int) -> list[dict]:
    spec = SETS[name]
    models = {f"{arch}_{task}_{seed}": trained(arch, task, seed, split) for arch, task, seed in spec}
    labels = {key: TASKS[task][0](split.test_y) for key, (_, task, _) in zip(models, spec)}
    # a larger held-out set for the never-worse goal's second reading: the test images and the training
    # images the calibration set leaves out (neither is seen by compression)
    held_x = torch.cat([split.test_x, split.train_x[len(calib):]])
    held = {key: TASKS[task][0](torch.cat([split.test_y, split.train_y[len(calib):]]))
            for key, (_, task, _) in zip(models, spec)}
    x1, xb = calib[:1], split.test_x[:INFERENCE_BATCH]
    full = {k: flops(m, x1) for k, m in models.items()}
    total = sum(full.values())
    with torch.no_grad():
        base = accuracies({k: m(split.test_x) for k, m in models.items()}, labels)
    plain = multinet.MultiNet(models, x1).eval()  # (c): the members as one graph, nothing shared, not fused
    rows = []
    for frac in budgets:
        row = dict(set=name, budget=frac, base=base)
        start = time.perf_counter()
        try:
            u = multinet.unify(models, calib, budget=Budget(flops=frac), speed_check=INFERENCE_BATCH)
            row["unify_s"] = time.perf_counter() - start
            with torch.no_grad():
                row["unified"] = accuracies(u.model(split.test_x), labels)
                row["unified_held"] = accuracies(u.model(held_x), held)
            row["unified_flops"] = u.costs_after["total"]["flops"] / total
            row["links"] = len(u.model.links)
            row["chosen"] = u.chosen
            row["speed_check"] = u.speed  # unify's own reading of each kept part's time over separate's
            start = time.perf_counter()
            reverse = multinet.unify(dict(reversed(list(models.items()))), calib, budget=Budget(flops=frac),
                                     speed_check=INFERENCE_BATCH)
            row["unify_reversed_s"] = time.perf_counter() - start
            with torch.no_grad():
                row["reversed"] = accuracies(reverse.model(split.test_x), labels)
            row["reversed_chosen"] = reverse.chosen
        except BudgetError as exc:
            u, row["unified"], row["note_unified"] = None, None, str(exc)
        # separate: every model compressed on its own to the same fraction (unify computes it as its baseline)
        sep, sep_held = {k: None for k in models}, {k: None for k in models}
        if u is not None:
            for k, r in u.separate.items():
                with torch.no_grad():
                    sep[k] = accuracies({k: r.model(split.test_x)}, {k: labels[k]})[k]
                    sep_held[k] = accuracies({k: r.model(held_x)}, {k: held[k]})[k]
        row["separate"] = sep if all(v is not None for v in sep.values()) else None
        row["separate_held"] = sep_held if row["separate"] else None
        fns = {"original": lambda: [m(xb) for m in models.values()], "multinet": lambda: plain(xb)}
        if row["separate"]:
            row["separate_flops"] = sum(r.flops_after for r in u.separate.values()) / total
            fns["separate"] = lambda: [r.model(xb) for r in u.separate.values()]
        if u is not None:
            fused = u.model.fused(timed_on=xb).eval()  # what infer runs: a set fused only where not slower
            with torch.no_grad():
                ref, out = u.model(xb), fused(xb)
            row["fused_max_abs_diff"] = max(float((out[k] - ref[k]).abs().max()) for k in ref)
            row["fused_layers"] = sum(1 for n, _ in fused.named_children() if n.startswith("fused_"))
            fns["fused"], fns["unified"] = (lambda: fused(xb)), (lambda: u.model(xb))
        medians, rounds = interleaved_ms(fns, repeats)
        row.update({f"{k}_ms": v for k, v in medians.items()})
        row["rounds_ms"] = rounds
        if all(a == "mlp" for a, _, _ in spec):
            z = zipit(models, calib, frac)
            with torch.no_grad():
                row["zipit"] = accuracies(z(split.test_x), labels)
            row["zipit_flops"] = flops(z, x1) / total
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "base"}), flush=True)
    return rows


def interleaved_ms(fns: dict, repeats: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Median milliseconds of each ``fn`` (one batch of 256) after one warm-up call each, and every
    round's times. The variants take turns within every round, each round starting one variant later
    (so no variant always runs right after the same one): load from other processes and cache state
    fall on all of them alike, and a ratio of two variants' times in the same round is paired."""
    times = {k: [] for k in fns}
    keys = list(fns)
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for i in range(repeats):
            for k in keys[i % len(keys):] + keys[:i % len(keys)]:
                start = time.perf_counter()
                fns[k]()
                times[k].append(time.perf_counter() - start)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}, {k: [1e3 * t for t in v] for k, v in times.items()}


def paired_ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """The median over rounds of a/b (times from the same round) and a distribution-free 95 % confidence
    interval for it (order statistics of the sorted ratios: the binomial interval for a median)."""
    ratios = sorted(x / y for x, y in zip(a, b))
    n = len(ratios)
    lo = max(int(scipy.stats.binom.ppf(0.025, n, 0.5)) - 1, 0)
    hi = min(n - 1 - lo, n - 1)
    return statistics.median(ratios), ratios[lo], ratios[hi]


def cell(v) -> str:
    return "—" if v is None else f"{v:.3f}"


def table(rows: list[dict]) -> str:
    lines = ["| set | FLOPs budget | model | original | separate REAP | unified | unified − separate (pts) | "
             "unified, list reversed | reversed − forward (pts) | kept | ZipIt!-style |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for k, b in r["base"].items():
            u = r["unified"][k] if r.get("unified") else None
            rev = r["reversed"][k] if r.get("reversed") else None
            s = r["separate"][k] if r.get("separate") else None
            z = r["zipit"][k] if r.get("zipit") else None
            kept = r.get("chosen", {}).get(k, "—")
            gap = f"{100 * (u - s):+.1f}" if u is not None and s is not None else "—"
            order = f"{100 * (rev - u):+.1f}" if u is not None and rev is not None else "—"
            lines.append(f"| {r['set']} | {r['budget']:.0%} | {k} | {b:.3f} | {cell(s)} | {cell(u)} | {gap} | "
                         f"{cell(rev)} | {order} | {kept} | {cell(z)} |")
    return "\n".join(lines)


def check(ok: bool | None) -> str:
    return "met" if ok else ("within noise" if ok is None else "**not met**")


def _no_slower(r: dict, fast: str, slow: str) -> tuple[bool | None, str]:
    """Is ``fast`` no slower than ``slow``? From the rounds' paired ratios where the row has them: met
    when the median ratio is ≤ 1, *within noise* (None) when it is above 1 but its 95 % interval reaches
    1, not met when the whole interval is above 1. Older rows (medians only) compare the medians."""
    rounds = r.get("rounds_ms")
    if not rounds:
        return r[f"{fast}_ms"] <= r[f"{slow}_ms"], f"{r[f'{fast}_ms']:.2f} vs {r[f'{slow}_ms']:.2f} ms"
    mid, lo, hi = paired_ratio(rounds[fast], rounds[slow])
    verdict = True if mid <= 1 else (None if lo <= 1 else False)
    return verdict, f"{r[f'{fast}_ms']:.2f} vs {r[f'{slow}_ms']:.2f} ms, ×{mid:.3f} [{lo:.3f}, {hi:.3f}]"


def goal_rows(rows: list[dict]) -> list[dict]:
    """The issue's goals, per set and budget: unified >= separate - 0.3 pt for every model; the
    list's order changes no accuracy by more than 0.5 pt; where separate loses >= 15 pts unified
    loses <= 5; the fused unified network no slower than the separately compressed models; the
    unfused MultiNet of the original models no slower than the originals one after another."""
    out = []
    for r in rows:
        g = dict(set=r["set"], budget=r["budget"])
        if r.get("unified") and r.get("separate"):
            gaps = {k: r["unified"][k] - r["separate"][k] for k in r["base"]}
            worst = min(gaps, key=gaps.get)
            g["never_worse"] = (gaps[worst] >= -0.003 - 1e-9, f"{worst}: {100 * gaps[worst]:+.1f}")
            if r.get("unified_held") and r.get("separate_held"):
                gaps = {k: r["unified_held"][k] - r["separate_held"][k] for k in r["base"]}
                worst = min(gaps, key=gaps.get)
                g["never_worse_held"] = (gaps[worst] >= -0.003 - 1e-9, f"{worst}: {100 * gaps[worst]:+.1f}")
            coll = [k for k in r["base"] if r["base"][k] - r["separate"][k] >= 0.15]
            if coll:
                ok = all(r["base"][k] - r["unified"][k] <= 0.05 + 1e-9 for k in coll)
                g["collapse"] = (ok, "; ".join(f"{k}: {100 * (r['base'][k] - r['unified'][k]):.1f} (sep. "
                                              f"{100 * (r['base'][k] - r['separate'][k]):.1f})" for k in coll))
        if r.get("unified") and r.get("reversed"):
            diffs = {k: r["reversed"][k] - r["unified"][k] for k in r["base"]}
            worst = max(diffs, key=lambda k: abs(diffs[k]))
            g["order"] = (abs(diffs[worst]) <= 0.005 + 1e-9, f"{worst}: {100 * diffs[worst]:+.1f}")
        if r.get("fused_ms") is not None and r.get("separate_ms") is not None:
            g["speed"] = _no_slower(r, "fused", "separate")
        g["multinet"] = _no_slower(r, "multinet", "original")
        out.append(g)
    return out


GOALS = [("never_worse", "unified ≥ separate − 0.3 pt, every model (worst model: unified − separate)"),
         ("never_worse_held", "the same on 773 held-out images: the 360 test images and the 413 training images "
                              "calibration left out (a second reading, one image = 0.13 pt)"),
         ("order", "order changes no model by > 0.5 pt (largest: reversed − forward)"),
         ("collapse", "separate loses ≥ 15 pts ⇒ unified loses ≤ 5 (unified loss, sep. loss)"),
         ("speed", "fused unified ≤ separately compressed (ms)"),
         ("multinet", "unfused MultiNet of originals ≤ originals one after another (ms)")]


def goals(rows: list[dict]) -> str:
    lines = ["| set | budget | " + " | ".join(t for _, t in GOALS) + " |", "|---|---|" + "---|" * len(GOALS)]
    for g in goal_rows(rows):
        cells = [f"{check(g[k][0])}: {g[k][1]}" if k in g else "—" for k, _ in GOALS]
        lines.append(f"| {g['set']} | {g['budget']:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goal_summary(rows: list[dict]) -> str:
    lines = ["| goal | met / checked (set, budget) | misses |", "|---|---|---|"]
    for key, title in GOALS:
        checked = [g for g in goal_rows(rows) if key in g]
        misses = [f"{g['set']} {g['budget']:.0%} ({g[key][1]})" for g in checked if g[key][0] is False]
        noise = [f"{g['set']} {g['budget']:.0%}" for g in checked if g[key][0] is None]
        met = len(checked) - len(misses) - len(noise)
        lines.append(f"| {title} | {met} / {len(checked)}" + (f" (+{len(noise)} within noise: {', '.join(noise)})"
                                                              if noise else "")
                     + f" | {'; '.join(misses) or 'none'} |")
    return "\n".join(lines)


def fewest(rows: list[dict]) -> str:
    lines = ["| set | fewest FLOPs with ≤ 1 pt lost on every model: unified / separate |", "|---|---|"]
    for name in dict.fromkeys(r["set"] for r in rows):
        mine = [r for r in rows if r["set"] == name]

        def best(method):
            ok = [r[f"{method}_flops"] for r in mine if r.get(method)
                  and all(r["base"][k] - r[method][k] <= 0.01 + 1e-9 for k in r["base"])]
            return f"{min(ok):.1%}" if ok else "—"

        lines.append(f"| {name} | {best('unified')} / {best('separate')} |")
    return "\n".join(lines)


def speed(rows: list[dict]) -> str:
    lines = ["| set | FLOPs budget | (a) originals one after another | (b) separately compressed one after another | "
             "(c) unfused MultiNet of the originals | (d) unified, fused | (e) unified, unfused | fused layers | "
             "max abs diff fused vs unfused |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    ms = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    for r in rows:
        diff = r.get("fused_max_abs_diff")
        lines.append(f"| {r['set']} | {r['budget']:.0%} | " + " | ".join(ms(r.get(f"{k}_ms")) for k in TIMED)
                     + f" | {r.get('fused_layers', '—')} | {'—' if diff is None else f'{diff:.1e}'} |")
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
    parser.add_argument("--threads", type=int, default=1, help="torch threads, for compression and timing")
    parser.add_argument("--repeats", type=int, default=21, help="timed rounds per budget")
    parser.add_argument("--note", default="", help="a line for the results file (e.g. what was cut)")
    parser.add_argument("--append", action="store_true", help="add to results/unify.json (rows of the same set "
                        "and budget replaced): runs with different budgets per set, one after another")
    parser.add_argument("--replot", action="store_true", help="rewrite the tables and plot from results/unify.json")
    args = parser.parse_args()
    saved = json.loads((RESULTS / "unify.json").read_text()) if args.append or args.replot else None
    warnings.filterwarnings("ignore")
    if args.replot:
        rows, meta = saved["rows"], saved["meta"]
        meta["note"] = args.note or meta.get("note", "")
    else:
        torch.set_num_threads(args.threads)
        split = data.load("digits")
        calib = split.train_x[:1024]
        rows, start = [], time.perf_counter()
        for name in args.sets:
            rows += run_set(name, split, calib, args.budgets, args.repeats)
        command = (f"python benchmarks/unify.py --sets {' '.join(args.sets)} --budgets "
                   f"{' '.join(map(str, args.budgets))} --threads {args.threads} --repeats {args.repeats}")
        meta = dict(commands=[command], threads=args.threads, repeats=args.repeats,
                    minutes=(time.perf_counter() - start) / 60, torch=torch.__version__, note=args.note)
        if args.append:
            new = {(r["set"], r["budget"]) for r in rows}
            rows = [r for r in saved["rows"] if (r["set"], r["budget"]) not in new] + rows
            old = saved["meta"]
            meta.update(commands=old["commands"] + [command + " --append"], minutes=old["minutes"] + meta["minutes"],
                        note=args.note or old.get("note", ""))
            if (old["threads"], old["repeats"]) != (args.threads, args.repeats):
                raise SystemExit("--append: use the same --threads and --repeats as the saved runs")
    order = {name: i for i, name in enumerate(SETS)}
    rows.sort(key=lambda r: (order.get(r["set"], len(order)), -r["budget"]))
    RESULTS.mkdir(exist_ok=True)
    text = ("# Neuro Unification (digits, no fine-tuning)\n\nCommands, one after another: "
            + "; ".join(f"`{c}`" for c in meta["commands"])
            + f" ({meta['minutes']:.0f} min in all, torch {meta['torch']}, {meta['threads']} torch thread, CPU: 2 "
              f"cores shared with other jobs).\n\n"
            + (meta["note"] + "\n\n" if meta.get("note") else "")
            + "Accuracy on the 360 held-out digits images (one image = 0.28 pt); the never-worse goal is also read "
              "on 773 held-out images (those 360 and the 413 training images the 1,024 calibration images leave "
              "out, one image = 0.13 pt), where a few images' flips weigh less. *separate*: each model "
              "compressed on its own to the same fraction of its FLOPs; *unified*: `multinet.unify` with the "
              "models as listed, *reversed*: the list reversed; *kept*: whether unify kept the member unified or "
              "fell back to its separate compression.\n\n## Goals (issue 13)\n\n" + goal_summary(rows)
            + "\n\nPer set and budget:\n\n" + goals(rows)
            + "\n\n" + fewest(rows) + "\n\n## Accuracy per model\n\n" + table(rows)
            + f"\n\n## Inference of 256 images (ms, median of {meta['repeats']} interleaved rounds)\n\n"
            + speed(rows) + "\n")
    (RESULTS / "unify.md").write_text(text)
    (RESULTS / "unify.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    plot(rows, RESULTS / "unify.png")
    print(text)


if __name__ == "__main__":
    main()
