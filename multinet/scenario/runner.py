"""Run a scenario: load models and data, carry out the steps, write the run directory.

Run directory: ``scenario.yaml`` (resolved, written first), ``state/`` (the models after each
finished step and ``progress.json``, so ``--resume`` continues after the last finished step),
``report.json`` / ``report.md`` / ``report.png``, and the final ``<model>.mnet`` (or
``multinet.mnet`` after a unify step). Every file is written atomically: a killed run leaves
finished steps and never a half-written model.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from ..io import data as datasets
from ..pipeline.compression import compress
from ..io.files import atomic_path, write_atomic
from ..graph import count, trace
from ..runtime.infer import infer
from ..io import load, save
from ..io.sources import load_target
from ..schedule import Budget
from ..unification import unify
from .report import write_report
from .schema import BudgetSpec, Scenario, ScenarioError


def _budget(spec: BudgetSpec, device: str) -> Budget:
    return Budget(flops=spec.flops, params=spec.params, latency_ms=spec.latency_ms, round_to=spec.round_to,
                  ignore=tuple(spec.ignore), min_channels=spec.min_channels, residual_streams=spec.residual_streams,
                  device=device)


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ScenarioError(f"cannot write the run directory {out}: {exc.strerror}") from None


def _load_models(scenario: Scenario) -> dict[str, torch.nn.Module]:
    return {m.name: load_target(m.model, m.checkpoint, scenario.data.source) for m in scenario.models}


def _costs(models: dict, net, example) -> dict[str, dict[str, int]]:
    if net is not None:
        from ..unification import model_costs

        return model_costs(net, example)
    return {k: {"flops": c.flops, "params": c.params} for k, m in models.items() for c in [count(trace(m, example).module)]}


def _outputs(models: dict, net, x: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    if net is not None:
        return infer(net, x, batch_size=batch_size)
    return {k: infer(m, x, batch_size=batch_size) for k, m in models.items()}


def run(scenario: Scenario, out: str | Path, resume: bool = False, progress: bool = False,
        log: Callable[[str], None] = print) -> dict:
    out = Path(out)
    _check_writable(out)
    resolved = yaml.safe_dump(scenario.model_dump(mode="json"), sort_keys=False)
    state_dir = out / "state"
    progress_file = state_dir / "progress.json"
    done: dict = {"steps": [], "report": None}
    if resume and progress_file.exists():
        done = json.loads(progress_file.read_text())
        previous = (out / "scenario.yaml").read_text() if (out / "scenario.yaml").exists() else None
        if previous is not None and previous != resolved:
            raise ScenarioError(f"{out} holds a run of a different scenario; --resume needs the same scenario "
                                f"(or use another --out)")
    elif not resume and progress_file.exists():
        raise ScenarioError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    write_atomic(out / "scenario.yaml", resolved)
    torch.manual_seed(scenario.runtime.seed)
    executor = None
    if scenario.runtime.executor == "ray":
        from ..runtime.executors import RayExecutor

        executor = RayExecutor(scenario.runtime.address)
    split = datasets.load(scenario.data.source)
    calib = split.train_x[: scenario.data.calibration]
    example = calib[:1]
    models = _load_models(scenario)
    net = None
    report = done["report"] or {"scenario": scenario.name, "steps": [], "accuracy": {}}
    if not report["accuracy"].get("original") and any(s.kind == "evaluate" for s in scenario.steps):
        outs = _outputs(models, None, split.test_x, 512)
        report["accuracy"]["original"] = {k: datasets.accuracy_of(v, split.test_y) for k, v in outs.items()}
    report["costs_original"] = report.get("costs_original") or _costs(models, None, example)
    finished = len(done["steps"])
    if finished:
        models, net = _restore(state_dir, done)
        log(f"resuming after step {finished} of {len(scenario.steps)}")
    for index, step in enumerate(scenario.steps):
        if index < finished:
            continue
        start = time.perf_counter()
        log(f"step {index + 1}/{len(scenario.steps)}: {step.kind}")
        entry = {"kind": step.kind}
        if step.kind == "compress":
            entry["models"] = {}
            targets = {"multinet": net} if net is not None else models
            for name, model in targets.items():
                spec = step.spec
                result = compress(model, calib, ratio=spec.ratio, method=spec.method,
                                  budget=_budget(spec.budget, scenario.runtime.device) if spec.budget else None,
                                  schedule=spec.schedule, batch_size=scenario.data.batch_size,
                                  max_positions=spec.max_positions, device=scenario.runtime.device,
                                  seed=scenario.runtime.seed, progress=progress, executor=executor)
                entry["models"][name] = result.as_dict()
                if net is not None:
                    result.model.meta["multinet_models"] = net.meta["multinet_models"]
                    net = result.model
                else:
                    models[name] = result.model
        elif step.kind == "unify":
            spec = step.spec
            unified = unify(models, calib, budget=_budget(spec.budget, scenario.runtime.device),
                            schedule=spec.schedule, batch_size=scenario.data.batch_size,
                            max_positions=spec.max_positions, device=scenario.runtime.device, seed=scenario.runtime.seed,
                            progress=progress, executor=executor)
            net = unified.model
            entry["unified"] = unified.as_dict()
        elif step.kind == "evaluate":
            x, y = (split.test_x, split.test_y) if step.spec.split == "test" else (split.train_x, split.train_y)
            outs = _outputs(models, net, x, 512)
            entry["accuracy"] = {k: datasets.accuracy_of(v, y) for k, v in outs.items()}
            report["accuracy"]["final"] = entry["accuracy"]
        elif step.kind == "infer":
            x = split.test_x if step.spec.split == "test" else split.train_x
            t0 = time.perf_counter()
            outs = _outputs(models, net, x, step.spec.batch_size)
            seconds = time.perf_counter() - t0
            with atomic_path(out / f"predictions-step{index + 1}.pt") as tmp:
                torch.save({k: v.argmax(1) for k, v in outs.items()}, tmp)
            entry["images_per_second"] = len(x) / max(seconds, 1e-9)
        entry["seconds"] = time.perf_counter() - start
        report["steps"].append(entry)
        _checkpoint(state_dir, models, net, report, index + 1, example)
    report["costs_final"] = _costs(models, net, example)
    if scenario.outputs.save_model:
        report["saved"] = [str(save(m, out / f"{k}.mnet", example)) for k, m in
                           ({"multinet": net} if net is not None else models).items()]
    write_atomic(out / "report.json", json.dumps(report, indent=1, default=str))
    write_report(out, report, plots=scenario.outputs.plots)
    return report


def _checkpoint(state_dir: Path, models: dict, net, report: dict, steps_done: int, example) -> None:
    """The models after a finished step, then the progress record that points at them."""
    files = {}
    targets = {"multinet": net} if net is not None else models
    for name, model in targets.items():
        path = state_dir / f"step{steps_done}-{name}.mnet"
        save(model, path, example_inputs=example)
        files[name] = path.name
    record = {"steps": list(range(1, steps_done + 1)), "files": files, "multinet": net is not None, "report": report}
    write_atomic(state_dir / "progress.json", json.dumps(record, default=str))


def _restore(state_dir: Path, done: dict):
    loaded = {name: load(state_dir / file) for name, file in done["files"].items()}
    if done.get("multinet"):
        return {}, loaded["multinet"]
    return loaded, None
