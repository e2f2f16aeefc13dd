"""Run a scenario: load models and data, carry out the steps, write the run directory.

Run directory: ``.multinet-run`` (a marker, written first: ``--out`` refuses a non-empty folder
without it), ``scenario.yaml`` (resolved), ``state/`` (the models after each
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
from ..runtime.devices import resolve_device
from ..runtime.infer import infer
from ..io import load, save
from ..io.images import ImageOptions
from ..io.sources import load_target
from ..io.user_data import check_fit, load_data
from ..schedule import Budget
from ..unification import compress_multinet, unify
from .report import write_report
from .schema import BudgetSpec, Scenario, ScenarioError


def _budget(spec: BudgetSpec, device: str) -> Budget:
    return Budget(flops=spec.flops, params=spec.params, latency_ms=spec.latency_ms, round_to=spec.round_to,
                  ignore=tuple(spec.ignore), min_channels=spec.min_channels, residual_streams=spec.residual_streams,
                  residual_branches=spec.residual_branches, device=device)


RUN_MARKER = ".multinet-run"  # written first into every run directory: what --out may overwrite


def is_run_dir(out: Path) -> bool:
    """A directory multinet wrote a run into (the marker, or a run from before it: scenario.yaml and state/)."""
    return (out / RUN_MARKER).is_file() or ((out / "scenario.yaml").is_file() and (out / "state").is_dir())


def _check_out_dir(out: Path) -> None:
    """Refuse a non-empty folder that is not a run: a run writes report.*, *.mnet and state/ there,
    over whatever files of the user's have those names."""
    if out.exists() and not out.is_dir():
        raise ScenarioError(f"--out {out} is a file; give a directory for the run")
    if out.is_dir() and any(out.iterdir()) and not is_run_dir(out):
        raise ScenarioError(f"--out {out} is not empty and is not a multinet run directory; give a new or empty "
                            f"directory (a run would overwrite files there)")


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ScenarioError(f"cannot write the run directory {out}: {exc.strerror}") from None


def _load_models(scenario: Scenario) -> dict[str, torch.nn.Module]:
    source = scenario.data.source
    dataset = source if source in datasets.DATASETS else "digits"  # zoo models: which built-in size and weights
    return {m.name: load_target(m.model, m.checkpoint, dataset, args=m.args) for m in scenario.models}


def _inputs(scenario: Scenario) -> tuple[datasets.Split, dict[str, torch.nn.Module]]:
    """Data and models, checked against each other before anything is written (bad input: one line)."""
    d = scenario.data
    torch.manual_seed(scenario.runtime.seed)  # a factory without a checkpoint builds the same model every run
    split = load_data(d.source, eval_spec=d.eval_source,
                      images=ImageOptions.parse(d.image_size, d.channels, d.mean, d.std))
    models = _load_models(scenario)
    for model in models.values():
        check_fit(model, split.test_x, split.test_y, f"the {d.eval_source or d.source} inputs")
    return split, models


def _scores(outs: dict, y: torch.Tensor | None, reference: dict | None) -> dict[str, float]:
    """Accuracy against labels; without labels, top-1 agreement with the original models' outputs."""
    if y is not None:
        return {k: datasets.accuracy_of(v, y) for k, v in outs.items()}
    return {k: datasets.agreement_of(v, reference[k]) for k, v in outs.items()}


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
    split, models = _inputs(scenario)
    resolve_device(scenario.runtime.device)
    _check_out_dir(out)
    _check_writable(out)
    write_atomic(out / RUN_MARKER, "a multinet run directory (multinet run --out)\n")
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
    calib = split.train_x[: scenario.data.calibration]
    example = calib[:1]
    originals = dict(models)  # without labels, evaluation compares with these
    net = None
    report = done["report"] or {"scenario": scenario.name, "steps": [], "accuracy": {},
                                "metric": "accuracy" if split.test_y is not None else "agreement"}
    if not report["accuracy"].get("original") and any(s.kind == "evaluate" for s in scenario.steps):
        outs = _outputs(models, None, split.test_x, 512)
        report["accuracy"]["original"] = _scores(outs, split.test_y, outs)
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
                result = (compress_multinet if net is not None else compress)(model, calib, ratio=spec.ratio, method=spec.method,
                                  budget=_budget(spec.budget, scenario.runtime.device) if spec.budget else None,
                                  schedule=spec.schedule, batch_size=scenario.data.batch_size,
                                  max_positions=spec.max_positions, device=scenario.runtime.device,
                                  seed=scenario.runtime.seed, progress=progress, executor=executor,
                                  **({"skip_links": True} if spec.skip_links else {}))
                entry["models"][name] = result.as_dict()
                if net is not None:
                    net = result.model  # a MultiNet again (compress_multinet)
                else:
                    models[name] = result.model
        elif step.kind == "unify":
            spec = step.spec
            unified = unify(models, calib, budget=_budget(spec.budget, scenario.runtime.device),
                            schedule=spec.schedule, batch_size=scenario.data.batch_size,
                            member_weights=spec.member_weights, skip_links=spec.skip_links,
                            fuse_layers=spec.fuse_layers, speed_check=spec.speed_check, holdout=spec.holdout,
                            max_positions=spec.max_positions, device=scenario.runtime.device, seed=scenario.runtime.seed,
                            progress=progress, executor=executor)
            net = unified.model
            entry["unified"] = unified.as_dict()
        elif step.kind == "evaluate":
            x, y = (split.test_x, split.test_y) if step.spec.split == "test" else (split.train_x, split.train_y)
            outs = _outputs(models, net, x, 512)
            entry["accuracy"] = _scores(outs, y, None if y is not None else _outputs(originals, None, x, 512))
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
    if executor is not None:
        executor.release()  # the steps' kept Ray actors: the run is over
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
