"""The human side of a run: report.md tables and report.png plots, from report.json."""
from __future__ import annotations

import json
from pathlib import Path

from ..io.files import atomic_path, write_atomic


_SCORE_NAMES = {"accuracy": "accuracy", "agreement": "top-1 agreement with the original (no labels)"}


def _pct(after: float, before: float) -> str:
    return f"{after:,.0f} ({after / before:.1%})" if before else f"{after:,.0f}"


def markdown(report: dict) -> str:
    lines = [f"# Run: {report['scenario']}", ""]
    before, after = report.get("costs_original", {}), report.get("costs_final", {})
    score = _SCORE_NAMES[report.get("metric", "accuracy")]
    lines += ["## Models", "", f"| model | FLOPs before | FLOPs after | params before | params after | {score} before | "
              f"{score} after |", "|---|---|---|---|---|---|---|"]
    acc0, acc1 = report.get("accuracy", {}).get("original", {}), report.get("accuracy", {}).get("final", {})
    for name in dict.fromkeys(list(before) + list(after)):
        b, a = before.get(name, {}), after.get(name, {})
        fmt = lambda d, k: f"{d[k]:,}" if k in d else "—"  # noqa: E731
        acc = lambda d: f"{d[name]:.4f}" if name in d else "—"  # noqa: E731
        lines.append(f"| {name} | {fmt(b, 'flops')} | {_pct(a['flops'], b.get('flops', 0)) if 'flops' in a else '—'} | "
                     f"{fmt(b, 'params')} | {_pct(a['params'], b.get('params', 0)) if 'params' in a else '—'} | "
                     f"{acc(acc0)} | {acc(acc1)} |")
    for i, step in enumerate(report["steps"], 1):
        lines += ["", f"## Step {i}: {step['kind']} ({step['seconds']:.1f} s)", ""]
        if step["kind"] == "compress":
            for name, res in step["models"].items():
                plan = res.get("plan")
                if plan:
                    lines.append(f"**{name}**: {plan['schedule']} schedule, {plan['metric']} budget "
                                 f"{plan['target']:,.3f} of {plan['original']:,.3f}; final-output error predicted "
                                 f"{plan['predicted_error']:.5f}, measured {plan['measured_error']:.5f}")
                    if plan.get("compared"):
                        errors = ", ".join(f"{k} {v:.5f}" for k, v in plan["compared"].items())
                        lines.append(f"(predicted error too large to rank plans by: applied and measured {errors}; "
                                     f"the {plan['schedule']} plan kept)")
                lines += ["", "| group | producers | channels | layer error | seconds |", "|---|---|---|---|---|"]
                for g in res["groups"]:
                    lines.append(f"| {g['group']} | {', '.join(g['producers'][:3])} | {g['channels_before']} → "
                                 f"{g['channels_after']} | {g['error']:.4f} | {g['seconds']:.2f} |")
        elif step["kind"] == "unify":
            u = step["unified"]
            lines += ["| model | FLOPs before | FLOPs after | channels before | channels after | groups removed | "
                      "channels another model stands in for |", "|---|---|---|---|---|---|---|"]
            for r in u["summary"]:
                if r["model"] == "shared":
                    fused = r.get("channels_after") or ""  # the members' first layers fused into one (fuse_layers)
                    lines.append(f"| shared | {r['flops_before']:,} | {r['flops_after']:,} | | {fused} | | |")
                else:
                    lines.append(f"| {r['model']} | {r['flops_before']:,} | {r['flops_after']:,} | {r['channels_before']} "
                                 f"| {r['channels_after']} | {r['groups_removed']} | {r['replaced_by_other_models']} |")
        elif step["kind"] == "evaluate":
            lines += [", ".join(f"{k}: {v:.4f}" for k, v in step["accuracy"].items())]
        elif step["kind"] == "infer":
            lines += [f"{step['images_per_second']:,.0f} images/s"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before, after = report.get("costs_original", {}), report.get("costs_final", {})
    shared = after.get("shared")
    fig, axes = plt.subplots(1, 3 if shared else 2, figsize=(15 if shared else 10, 3.6))
    ax1, ax2 = axes[0], axes[1]
    acc0, acc1 = report.get("accuracy", {}).get("original", {}), report.get("accuracy", {}).get("final", {})
    for name in before:
        if name in acc0 and name in acc1 and name in after:
            ax1.plot([1.0, after[name]["flops"] / before[name]["flops"]], [acc0[name], acc1[name]], marker="o", label=name)
    ax1.set_xlabel("FLOPs (fraction of the original)")
    ax1.set_ylabel(_SCORE_NAMES[report.get("metric", "accuracy")])
    ax1.set_title("accuracy vs FLOPs")
    if ax1.lines:
        ax1.legend(fontsize=7)
    bars = []
    for step in report["steps"]:
        for name, res in step.get("models", {}).items():
            bars += [(f"{name}:{g['group']}", g["channels_before"], g["channels_after"]) for g in res["groups"]]
        if step["kind"] == "unify":
            for g in (step["unified"].get("plan") or {}).get("groups", []):  # None: every model kept its separate result
                bars.append((f"{g['producers'][0].split('.')[0]}:{g['group']}", g["size"], g["size"] - len(g["removed"])))
    if bars:
        labels, full, kept = zip(*bars)
        ax2.bar(range(len(bars)), full, color="lightgray", label="before")
        ax2.bar(range(len(bars)), kept, label="kept")
        ax2.set_xticks(range(len(bars)), labels, rotation=90, fontsize=6)
        ax2.legend(fontsize=7)
    ax2.set_title("channels kept per group")
    if shared:  # a MultiNet: what each model computes alone and what it shares
        names = [k for k in after if k not in ("shared", "total")]
        own = [after[k]["flops"] - shared["flops"] for k in names]
        axes[2].bar(names, [shared["flops"]] * len(names), label="shared with other models")
        axes[2].bar(names, own, bottom=[shared["flops"]] * len(names), label="its own layers")
        axes[2].bar(names, [before[k]["flops"] for k in names], fill=False, edgecolor="gray", label="before")
        axes[2].set_ylabel("FLOPs (MACs) per image")
        axes[2].set_title("MultiNet: shared and own computation")
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out: Path, report: dict, plots: bool = True) -> None:
    write_atomic(out / "report.md", markdown(report))
    if plots:
        with atomic_path(out / "report.png") as tmp:
            plot(report, tmp)


def read_report(run_dir: str | Path) -> dict:
    from .schema import ScenarioError

    path = Path(run_dir) / "report.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ScenarioError(f"no report in {run_dir} (run `multinet run SCENARIO --out {run_dir}` first)") from None
    except json.JSONDecodeError as exc:
        raise ScenarioError(f"{path} is not a multinet report: {exc}") from None
