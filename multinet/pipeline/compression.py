"""``multinet.compress``: trace, calibrate, select, reconstruct and cut, one group at a time.

Groups are compressed in graph order. Each step calibrates the model compressed so far against
the original model (sequential mode), so every consumer is re-solved towards the *original*
outputs and errors do not compound. Methods:

* ``reap``: greedy REAP selection and least-squares reconstruction (the seed method);
* ``unify``: Neuro Unification — each removed channel is replaced by an affine function of one
  remaining channel of the group, folded into the consumers' weights and biases;
* ``magnitude``: lowest L1 norm of producer filters, no reconstruction;
* ``magnitude+ls``: the same selection, least-squares reconstruction;
* ``random``: a seeded random selection, no reconstruction.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from ..calib import batches, consumer_specs, first_sample
from ..calib.sharded import collect_on
from ..errors import MultinetError
from ..options import RunOptions
from ..runtime.checkpoint import UNIFORM_RUN, RunState
from ..runtime.executors import Executor
from ..runtime.progress import Bar
from ..schedule import Budget, Plan, make_plan, prepare
from ..schedule.scheduler import check_schedule
from ..schedule.latency import latency_input, measure_ms
from ..schedule.oneshot import evaluation_inputs, output_error, run_outputs
from ..graph import ChannelGraph, count, prune, trace
from ..graph.dropping import drop_group, droppable
from ..graph.streams import residual_partners
from ..graph.surgery import kept_output_rows
from ..calib.frontier import STORE_DTYPES
from .group_problems import solve_group, to_layer_weights
from .grouped_conv import GroupedSolution, grouped_layer_weights, removal_count, removal_step
from .oneshot import compress_oneshot
from .sequential import PipelineStats, SequentialPipeline, track_outputs
from .statistics_memory import fitting, statistics_limit
from .submodule import find_submodule, submodule_inputs, with_submodule

METHODS = ("reap", "unify", "magnitude", "magnitude+ls", "random")
MODES = ("sequential", "oneshot", "reference")
# a scheduled plan's predicted (one-shot) error from which the uniform plan is applied and measured too
SATURATED_ERROR = 0.5


@dataclass
class GroupReport:
    group: int
    producers: list[str]
    channels_before: int
    channels_after: int
    error: float  # squared error at the group's consumers, each as a fraction of its output energy, summed
    seconds: float
    removed: list[int] = field(default_factory=list)


@dataclass
class CompressResult:
    model: fx.GraphModule
    groups: list[GroupReport]
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    method: str
    plan: Plan | None = None
    cost: PipelineStats | None = None  # the cached-input pipeline's forward work and phase times
    # with skip_links=True: (layer, the layer whose input it reads instead of its own) for every skip kept
    skip_links: list[tuple[str, str]] = field(default_factory=list)
    # with submodule=: its path, and a copy of the whole model with ``model`` (the compressed submodule) in
    # place; FLOPs, parameters and groups are then the submodule's
    submodule: str | None = None
    whole_model: nn.Module | None = None

    def as_dict(self) -> dict:
        """The report's fields; the models are no report entries (and asdict would deep-copy them first)."""
        out = asdict(replace(self, model=None, whole_model=None))
        out.pop("model")
        out.pop("whole_model")
        return out

    def removed_channels(self) -> list[dict]:
        """Per compressed group: its producers, the channel indices it lost and how many it kept."""
        return [{"group": g.group, "producers": list(g.producers), "removed": list(g.removed),
                 "channels_before": g.channels_before, "kept": g.channels_after} for g in self.groups]

    @property
    def removed_whole(self) -> list[list[str]]:
        """The producers of every group that lost all its channels (a residual branch collapsed into its
        skip connection, or a MultiNet group other channels stand in for)."""
        return [list(g.producers) for g in self.groups if g.channels_after == 0]

    @property
    def seconds(self) -> float:
        """Time spent: the groups' solves plus, for a budget, the scheduling."""
        scheduling = sum(self.plan.seconds.values()) if self.plan is not None else 0.0
        return sum(g.seconds for g in self.groups) + scheduling

    def __repr__(self) -> str:
        """A summary: printing a result in a notebook must not dump the whole model's code."""
        budget = f", {self.plan.schedule} schedule to a {self.plan.metric} budget" if self.plan is not None else ""
        if self.skip_links:
            budget += f", {len(self.skip_links)} skip link{'s' * (len(self.skip_links) > 1)}"
        if self.submodule is not None:
            budget += f", submodule {self.submodule!r}"
        return (f"CompressResult(method={self.method!r}{budget}: FLOPs {self.flops_before:,} -> {self.flops_after:,} "
                f"({self.flops_after / max(self.flops_before, 1):.1%}), params {self.params_before:,} -> "
                f"{self.params_after:,}, {len(self.groups)} groups compressed, {self.seconds:.1f} s)")


def compress(model: nn.Module, calibration_data, ratio: float | Mapping[int, float] | None = None,
             method: str = "reap", budget: Budget | None = None, schedule: str = "auto", plan: Plan | None = None,
             plan_path=None,
             batch_size: int = 128, max_positions: int | None = 256, damp: float = 1e-6, device: str = "cpu",
             seed: int = 0, eval_samples: int = 1024, executor: Executor | None = None, leaf_modules=(),
             autowrap_functions=(), progress: bool = False, run_dir=None, mode: str = "sequential",
             frontier_memory: int | str | None = "auto", frontier_dtype: str = "float32",
             options: RunOptions | None = None, skip_links: bool = False, submodule: str | None = None
             ) -> CompressResult:
    """Compress ``model`` without retraining.

    Either ``ratio`` (remove that fraction of every prunable group, or per group {group_id: ratio};
    0.5 when neither is given; a group that a grouped conv reads or writes loses the nearest multiple of
    its conv groups, the same number from each) or ``budget`` (a :class:`Budget`: FLOPs, parameters or latency)
    with a ``schedule`` ("auto", "exhaustive" or "uniform") that decides per-group amounts. The
    plan is returned in ``result.plan`` and written to ``plan_path`` when given; ``plan=`` applies a
    plan made earlier (``Plan.load(path)``) to the same model without scheduling again. Where the
    scheduled plan's predicted error is at least SATURATED_ERROR (small budgets), the uniform plan (its
    unspent budget given back) is applied too and the one with the lower measured error kept (``result.plan.compared``; see
    ``_compares_uniform``).

    ``calibration_data``: a tensor of inputs, or a re-iterable of tensors or (inputs, targets)
    batches (a list or a DataLoader). ``max_positions`` sub-samples conv output positions per
    image to bound calibration cost; ``eval_samples`` calibration samples measure errors at the
    final outputs. ``progress=True`` shows progress bars. ``run_dir``: persist the plan and the model
    after every finished group there; rerunning with the same arguments resumes (see checkpoint.py).

    ``mode``: "sequential" (default) compresses group by group from activations cached at a moving
    frontier (about one forward pass of each model, plus one more of each residual stream's stage);
    the frontier is kept in memory up to ``frontier_memory`` bytes ("auto": half of the memory available
    when the run starts) and in memory-mapped files beyond,
    stored in ``frontier_dtype`` (float32, float16 or bfloat16). "oneshot" solves every group on one
    pass of the original model's statistics (the cheapest, less accurate: errors are not corrected
    downstream; with a budget it reuses the scheduler's statistics). "reference" is the sequential computation
    with two whole-model passes per group (the path the pipeline is tested against; also what runs
    when a group is removed whole). On a Ray executor the sequential pipeline is data-parallel: each
    worker holds a shard of the calibration batches and its frontier, the driver adds their partial
    statistics, solves, and sends back the consumers' new weights.

    ``options``: a :class:`multinet.RunOptions` holding the run settings (batch_size, max_positions,
    damp, device, seed, eval_samples, executor, frontier_memory, frontier_dtype) instead of keywords.

    ``skip_links`` (with a FLOPs or parameter ``budget``): a layer may also read an earlier tensor of the
    model that explains its input (least-squares R², as unification's links), so that the layers in
    between are removed whole where that beats narrowing them (small budgets), and a residual branch
    may collapse into its skip connection (``Budget(residual_branches=True)``); the model compressed
    without either is computed too, and of the three the one with the least final-output error on the
    evaluation samples is kept (``result.skip_links`` lists the skip links, ``result.removed_whole``
    the groups gone whole). Costs about 2.5 to 6 plain compressions.

    ``submodule``: compress only the submodule at this dotted path (a detector's "backbone", whose model
    does not trace as a whole: its forward makes anchors and runs NMS), calibrated on what it receives
    while ``model`` runs on ``calibration_data`` (recorded once by a hook); its outputs keep their
    channels. ``result.model`` is the compressed submodule, ``result.whole_model`` a copy of ``model`` with
    it in place; the FLOPs and groups reported are the submodule's.
    """
    if method not in METHODS:
        raise MultinetError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if mode not in MODES:
        raise MultinetError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if not isinstance(calibration_data, torch.Tensor) and iter(calibration_data) is calibration_data:
        raise MultinetError("calibration_data must be re-iterable (a tensor, a list or a DataLoader), not an iterator")
    if sum(x is not None for x in (ratio, budget, plan)) > 1:
        raise MultinetError("give one of ratio=, budget= or plan=")
    if (budget is not None or plan is not None) and method != "reap":
        raise MultinetError(f"budgets are scheduled with REAP's error curves; method {method!r} takes ratio= only")
    if budget is not None and not isinstance(budget, Budget):
        raise MultinetError(f"budget must be a multinet.Budget, got {type(budget).__name__}")
    _check_skip_links(skip_links, budget, plan_path, run_dir)
    opts = RunOptions.of(options, batch_size=batch_size, max_positions=max_positions, damp=damp, device=device,
                         seed=seed, eval_samples=eval_samples, executor=executor, frontier_memory=frontier_memory,
                         frontier_dtype=frontier_dtype).resolved()  # checked before any work
    # an executor made here from a name (or None) is freed here; one the caller passed stays the caller's
    owned = opts.executor is not executor and (options is None or opts.executor is not options.executor)
    device, executor = opts.device, opts.executor
    try:
        if submodule is not None:
            inputs = submodule_inputs(model, submodule, calibration_data, opts.batch_size)
            result = compress(find_submodule(model, submodule), inputs, ratio=ratio, method=method, budget=budget,
                              schedule=schedule, plan=plan, plan_path=plan_path, leaf_modules=leaf_modules,
                              autowrap_functions=autowrap_functions, progress=progress, run_dir=run_dir, mode=mode,
                              options=opts, skip_links=skip_links)
            result.submodule = submodule
            result.whole_model = with_submodule(model, submodule, result.model)
            return result
        if skip_links:
            from ..unification.skipping import compress_with_skip_links

            return compress_with_skip_links(model, calibration_data, budget, schedule=schedule,
                                            batch_size=opts.batch_size, eval_samples=opts.eval_samples,
                                            options=opts, leaf_modules=leaf_modules,
                                            autowrap_functions=autowrap_functions, progress=progress, mode=mode)
        if budget is not None and budget.device is None:
            budget = replace(budget, device=device)  # latency is measured where the run is, unless the budget says
        if budget is not None:
            check_schedule(schedule)
        example = example_inputs(model, calibration_data, opts.batch_size)  # FLOPs per example
        original = trace(model, example, leaf_modules, autowrap_functions)
        state, alternative = None, None
        if run_dir is not None:
            from ..runtime.checkpoint import fingerprint

            key = fingerprint(original.module, calibration_data, opts.batch_size, ratio=ratio, method=method,
                              budget=budget.as_dict() if budget else None, schedule=schedule,
                              plan=plan.removals() if plan else None, max_positions=opts.max_positions, damp=opts.damp,
                              seed=opts.seed, mode=mode, compensate_residuals=opts.compensate_residuals)
            state = RunState(run_dir, key)
            _check_plan_path(plan_path, state)
            saved = state.load_plans() if budget is not None else None
            if saved is not None:
                (plan, alternative), budget = saved, None  # scheduled before the run was stopped
        ctx = None
        if budget is not None:
            ctx = prepare(original, calibration_data, budget, options=opts)
            try:
                plan = make_plan(ctx, schedule, progress)
                if _compares_uniform(plan, mode):
                    alternative = make_plan(ctx, "uniform", progress, fill=True)
            finally:
                executor.release()  # the search's worker pool must not keep the resources the next jobs need
            if state is not None:
                state.save_plans(plan, alternative)
        elif plan is not None:
            plan.compared = {}  # a plan applied again: what it was once compared with is not this run's comparison
        inputs = _evaluation(plan, ctx, calibration_data, opts)  # read once: a shuffling loader differs each time
        if alternative is None:
            result = _applied(original, plan, ratio, method, calibration_data, example, ctx, progress, state, opts,
                              inputs, mode)
        else:
            uniform_state = None if state is None else RunState(state.dir / UNIFORM_RUN, state.key)
            result = _least_error(original, [(plan, state), (alternative, uniform_state)], method, calibration_data,
                                  example, ctx, progress, opts, inputs, mode)
        if plan_path is not None and result.plan is not None:
            result.plan.save(plan_path)
        return result
    finally:
        if owned:  # made here from a name: nothing else will free what its actors hold
            executor.release()


def _applied(original: ChannelGraph, plan: Plan | None, ratio, method: str, data, example, ctx, progress: bool,
             state, opts: RunOptions, inputs, mode: str) -> CompressResult:
    """``plan`` (or ``ratio`` without one) applied to the original model in ``mode``, and a plan's
    cost and final-output error measured on the evaluation ``inputs``."""
    if plan is not None:
        requests = _plan_requests(original, plan)
    else:
        ratios = _ratios(original, 0.5 if ratio is None else ratio, method)
        requests = {gid: removal_count(original.group(gid), r) for gid, r in ratios.items()}
        if method not in ("magnitude", "random"):  # the others solve least squares: their statistics must fit
            fit = fitting(original, [g for g, n in requests.items() if n], statistics_limit(opts.frontier_memory),
                          together=mode == "oneshot")
            requests = {g: n for g, n in requests.items() if g in fit or not n}
    cost, outputs = None, None
    if mode == "oneshot" and not _removes_a_whole_group(original, requests):
        current, reports = _apply_oneshot(original, requests, method, data, example, ctx, plan, opts)
    elif _pipeline_applies(original, requests, mode, opts.executor):
        current, reports, cost, outputs = _apply_pipeline(original, requests, method, data, example, progress, state,
                                                          opts, inputs)
    else:
        branches = plan is not None and bool(plan.budget.get("residual_branches"))
        current, reports = _apply(original, requests, method, data, example, progress, opts, state=state,
                                  branches=branches)
    before, after = count(original.module), count(current.module)
    if plan is not None:
        _measure(plan, original.module, current.module, after, inputs,
                 ctx.masked.reference if ctx is not None else None, outputs)
    return CompressResult(current.module, reports, before.flops, after.flops, before.params, after.params, method,
                          plan, cost)


def _least_error(original: ChannelGraph, candidates, method: str, data, example, ctx, progress: bool,
                 opts: RunOptions, inputs, mode: str) -> CompressResult:
    """Each (plan, run state) applied; the result with the least measured error among those within
    their budget (all, where none is) kept, with the others' errors in ``plan.compared`` and their
    search and application time in ``plan.seconds["other plans"]``. Warnings (an overshoot, a group
    left whole) are those of the kept application only."""
    applied = []
    for plan, state in candidates:
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = _applied(original, plan, None, method, data, example, ctx, progress, state, opts, inputs, mode)
        applied.append((result, caught, time.perf_counter() - start))
    fitting = [a for a in applied if not a[0].plan.over_target()] or applied
    kept, caught, _ = min(fitting, key=lambda a: _sortable(a[0].plan.measured_error))
    others = [(r, s) for r, _, s in applied if r is not kept]
    kept.plan.compared = {r.plan.schedule: r.plan.measured_error for r, _, _ in applied}
    kept.plan.seconds["other plans"] = sum(r.plan.seconds.get("search", 0.0) + s for r, s in others)
    kept.plan.evaluations += sum(r.plan.evaluations for r, _ in others)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return kept


def _sortable(error: float | None) -> float:
    return float("inf") if error is None or error != error else error  # NaN and None last


def _check_plan_path(plan_path, state) -> None:
    """plan_path must not be the run directory's own plan: a compared run keeps the uniform plan there
    when it wins, and a resume would then read it as the scheduled one."""
    if plan_path is not None and Path(plan_path).resolve() == (state.dir / "plan.json").resolve():
        raise MultinetError(f"plan_path {plan_path} is the run directory's own plan file; write the plan elsewhere")


def _compares_uniform(plan: Plan, mode: str) -> bool:
    """Whether the uniform plan is applied too and the one with the least measured error kept.

    The scheduler ranks plans by their one-shot error (every group reconstructed from the original
    model's statistics); sequential reconstruction then corrects much of it downstream. Up to about
    half of the outputs' energy lost the two rank plans alike; beyond it (a few % of FLOPs) the
    one-shot error saturates and a plan it prefers can come out far worse once applied (the zoo's
    ResNet at 4 %: 0.82 against the uniform plan's 0.65, 20 % against 86 % accuracy; see
    benchmarks/results/saturated_plans.md). There the two plans are applied and measured (the uniform
    one with the budget its common fraction leaves unspent given back: scheduler._filled). One-shot
    runs apply what the scheduler measured; a latency schedule walks its own path."""
    return (mode != "oneshot" and plan.schedule != "uniform" and plan.metric != "latency"
            and plan.predicted_error >= SATURATED_ERROR)


def _check_skip_links(skip_links: bool, budget: Budget | None, plan_path, run_dir) -> None:
    """What a run with skip links needs, checked before any work."""
    if not isinstance(skip_links, bool):
        raise MultinetError(f"skip_links must be True or False, got {skip_links!r}")
    if not skip_links:
        return
    if budget is None:
        raise MultinetError("skip_links need a budget= (FLOPs or parameters): the search compares the model with "
                            "and without them at the same cost, which a per-group ratio does not fix")
    if plan_path is not None:
        raise MultinetError("skip_links: a plan applies to the graph with the skip links, not to the model as "
                            "given, so it cannot be saved for plan=; save the compressed model instead")
    if run_dir is not None:
        raise MultinetError("skip_links run several compressions, which one run_dir cannot hold; run without "
                            "run_dir, or without skip_links to make the run resumable")
    if isinstance(budget.min_channels, Mapping) or budget.output_weights is not None:
        raise MultinetError("skip_links take min_channels as one number and no output_weights: group ids differ "
                            "once layers read other tensors, and the search compares the structures unweighted")


def _evaluation(plan, ctx, data, opts: RunOptions) -> list | None:
    """The samples an applied plan's error is measured on (the scheduler's, when it made the plan)."""
    if plan is None:
        return None
    return ctx.masked.inputs if ctx is not None else evaluation_inputs(data, opts.batch_size, opts.eval_samples)


def example_inputs(model: nn.Module, data, batch_size: int) -> tuple:
    """The first calibration sample as the model's positional inputs (a dict batch bound by name)."""
    first = first_sample(data, batch_size)
    return batches.model_args(model, first)


def _removes_a_whole_group(original: ChannelGraph, requests) -> bool:
    """Only a MultiNet's bridged groups may vanish; that renumbers groups, which the reference path handles."""
    return any((r if isinstance(r, int) else len(r)) >= original.group(g).size for g, r in requests.items())


def _pipeline_applies(original: ChannelGraph, requests, mode: str, executor) -> bool:
    """The cached-input pipeline (in-process, or data-parallel over a Ray executor's workers) keeps
    every group; a run that removes a whole group takes the reference path."""
    return mode == "sequential" and not _removes_a_whole_group(original, requests)


def _apply_oneshot(original: ChannelGraph, requests, method: str, data, example, ctx, plan, opts: RunOptions):
    """Every group from one pass of statistics (the scheduler's, when it made the plan)."""
    masked, errors = None, None
    if ctx is not None:
        masked = ctx.masked
        errors = {g.group: g.layer_error for g in plan.groups}  # REAP's error on the same one-shot statistics
    pruned, solved = compress_oneshot(original, requests, method, data, example, batch_size=opts.batch_size,
                                      max_positions=opts.max_positions, damp=opts.damp, device=opts.device,
                                      seed=opts.seed, executor=opts.executor, masked=masked, errors=errors)
    reports = [GroupReport(gid, original.group(gid).producers, original.group(gid).size,
                           original.group(gid).size - len(removed), error, seconds, removed)
               for gid, removed, error, seconds in solved]
    return trace(pruned, example), reports


def _apply_pipeline(original: ChannelGraph, requests, method: str, data, example, progress: bool, state,
                    opts: RunOptions, evaluation: list | None = None):
    """Group by group from cached inputs (see sequential.py); resumes after the last finished group.
    With ``evaluation`` (batches), also the compressed model's outputs on them where the frontier
    already holds them (None otherwise)."""
    pipeline = SequentialPipeline(original, data, batch_size=opts.batch_size, max_positions=opts.max_positions,
                                  damp=opts.damp, device=opts.device, seed=opts.seed,
                                  memory_limit=opts.frontier_memory, store_dtype=STORE_DTYPES[opts.frontier_dtype],
                                  progress=progress, executor=opts.executor,
                                  compensate_residuals=opts.compensate_residuals)
    reports: list[GroupReport] = []
    surviving: dict[str, torch.Tensor] = {}
    finished: list[int] = []
    if state is not None:
        restored, finished, saved_reports, surviving = state.restore()
        if restored is not None:
            pipeline.resume_from(restored)
            reports = [GroupReport(**r) for r in saved_reports]
    done = {r.group: list(r.removed) for r in reports}

    def on_group(gid: int, solution, seconds: float) -> None:
        group = original.group(gid)
        reports.append(GroupReport(gid, group.producers, group.size, group.size - len(solution.removed),
                                   solution.error, seconds, sorted(solution.removed)))
        if state is not None:
            finished.append(gid)
            state.record(pipeline.work, example, finished, [asdict(r) for r in reports], surviving)

    try:
        removed = pipeline.run(requests, method, done, surviving, on_group)
        outputs = pipeline.final_outputs(evaluation) if evaluation is not None else None
        pruned = pipeline.finish(removed, example)
    finally:
        pipeline.close()
    return trace(pruned, example), reports, pipeline.cost, outputs


def _apply(original: ChannelGraph, requests: Mapping[int, int | list[int]], method: str, data, example,
           progress: bool, opts: RunOptions, state=None, branches: bool = False):
    """Compress group by group in graph order; a request is a channel count (the method selects)
    or the channels themselves (a schedule selected them; the consumers are re-solved). ``branches``:
    the plan's budget let residual branches go whole (a request for every channel of one is honoured)."""
    batch_size, max_positions, damp, device, seed, executor = (opts.batch_size, opts.max_positions, opts.damp,
                                                               opts.device, opts.seed, opts.executor)
    current = original
    reports = []
    surviving: dict[str, torch.Tensor] = {}  # layer -> original indices of its remaining outputs
    finished: list[int] = []
    if state is not None:
        restored, finished, saved_reports, surviving = state.restore()
        if restored is not None:
            current = trace(restored, example)
            reports = [GroupReport(**r) for r in saved_reports]
    keys = {g.id: _group_key(original, g) for g in original.groups}
    bar = Bar(progress, len(requests), f"{method}: groups")
    for gid in sorted(requests):
        bar.advance()
        request = requests[gid]
        if not request or gid in finished:
            continue
        start = time.time()
        # groups are found by the layers they live in: dropping a whole group renumbers the rest,
        # and may take other groups' layers with it (they only fed the dropped group)
        group = next((g for g in current.groups if _group_key(current, g) == keys[gid]), None)
        if group is None:
            if not _layers_gone(current, original.group(gid)):
                warnings.warn(f"group {gid} ({', '.join(original.group(gid).producers)}) was not found after earlier "
                              f"groups were cut; it is left as it is", stacklevel=4)
            continue
        n_remove = request if isinstance(request, int) else len(request)
        preset = None if isinstance(request, int) else list(request)
        if preset is not None and len(preset) == group.size and not droppable(current, group, branches=branches):
            preset = preset[:-1]  # an earlier removal took away the other channels its readers had
            n_remove -= 1
        bar.note(f"group {gid}: calibrating and solving {', '.join(group.consumer_names[:3])}")
        pending, solved = None, ()
        if opts.compensate_residuals:
            pending = [name for h in sorted(requests) if h >= gid and requests[h] and h not in finished
                       for name in original.group(h).consumer_names]
            solved = [name for r in reports for name in original.group(r.group).consumer_names]
        removed, weights, error = _solve_group(current, original, group, n_remove, method, data, batch_size,
                                               max_positions, damp, device, seed + gid, surviving, preset, executor,
                                               pending, solved)
        keep = sorted(set(range(group.size)) - set(removed))
        if keep:
            weights = _own_outputs_cut(weights, kept_output_rows(current, group.id, keep))
            track_outputs(current, group, keep, surviving)
            pruned = prune(current, {group.id: keep}, consumer_weights=weights)
        else:
            pruned = drop_group(current, group.id, weights)
        current = trace(pruned, example)
        reports.append(GroupReport(gid, group.producers, group.size, len(keep), error, time.time() - start,
                                   sorted(removed)))
        if state is not None:
            finished.append(gid)
            state.record(current.module, example, finished, [asdict(r) for r in reports], surviving)
    bar.close()
    return current, reports


def _own_outputs_cut(weights, rows: Mapping[str, torch.Tensor]):
    """A consumer that also writes the group it reads (an FPN's smoothing conv reads the lateral sum and
    its output is added to the next lateral: one group) loses the removed channels on both sides in the
    same cut: its re-solved weight (and bias) keeps only the output rows the cut leaves (``rows``)."""
    if not weights:
        return weights
    out = dict(weights)
    for name in weights.keys() & rows.keys():
        spec, kept = weights[name], rows[name]
        out[name] = (spec[0][kept], spec[1][kept]) if isinstance(spec, tuple) else spec[kept]
    return out


def _plan_requests(graph: ChannelGraph, plan: Plan) -> dict[int, list[int]]:
    """A plan's removals, checked against the model it is applied to."""
    requests = plan.removals()
    for gp in plan.groups:
        try:
            group = graph.group(gp.group)
        except KeyError:
            raise MultinetError(f"the plan names group {gp.group}, which this model does not have: "
                                f"it was made for another model") from None
        if group.size != gp.size or group.producers != gp.producers:
            raise MultinetError(f"the plan's group {gp.group} ({gp.size} channels of {gp.producers}) does not match "
                                f"this model's ({group.size} channels of {group.producers}): it was made for another model")
    return requests


def _measure(plan: Plan, original: nn.Module, compressed: nn.Module, counts, inputs: list[torch.Tensor],
             reference: list[torch.Tensor] | None = None, outputs: list[torch.Tensor] | None = None) -> None:
    """What the applied plan really costs, and its error at the final outputs on the evaluation samples
    (``reference``: the original's outputs on them, when the scheduler has them already)."""
    weights = plan.budget.get("output_weights")
    outputs = run_outputs(compressed, inputs) if outputs is None else outputs  # the pipeline's, where it has them
    reference = run_outputs(original, inputs) if reference is None else reference
    plan.measured_error = output_error(outputs, [r.to(o.device) for o, r in zip(outputs, reference)], weights)
    if plan.metric == "latency":
        x = latency_input(inputs[0][:1].cpu(), plan.budget["latency_batch"])
        plan.measured_cost = measure_ms(compressed, x, plan.budget["device"])
        tolerance = plan.budget["latency_tolerance"]
        if plan.measured_cost > plan.target * (1 + tolerance):
            warnings.warn(f"the compressed model measures {plan.measured_cost:.3f} ms, over the {plan.target:.3f} ms "
                          f"budget by more than the {tolerance:.0%} tolerance (noisy timings?)",
                          stacklevel=4)
    else:
        plan.measured_cost = float(counts.flops if plan.metric == "flops" else counts.params)
        if plan.measured_cost > plan.target:
            warnings.warn(f"the compressed model has {plan.measured_cost:,.0f} {plan.metric}, over the plan's target "
                          f"{plan.target:,.0f}", stacklevel=4)


def _layers_gone(graph: ChannelGraph, group) -> bool:
    """True when dead-code elimination removed the group's producers (they fed only dropped groups)."""
    layers = dict(graph.module.named_modules())
    return all(p not in layers for p in group.producers)


def _group_key(graph: ChannelGraph, group) -> tuple[str, ...]:
    table = graph.analysis.table
    return tuple(sorted({table.spaces[s].owner for s, _ in group.members}))


def _ratios(graph: ChannelGraph, ratio, method: str = "reap") -> dict[int, float]:
    def whole(group) -> bool:  # grouped convs: equal counts per conv group; unify cannot pair across them yet
        return group.grouped_conv and (method == "unify" or removal_step(group) is None)

    if isinstance(ratio, Mapping):
        ratios = dict(ratio)
        for gid in ratios:
            try:
                group = graph.group(gid)
            except KeyError as exc:
                raise MultinetError(exc.args[0]) from None
            if not group.prunable and ratios[gid] > 0:
                raise MultinetError(f"group {gid} is not prunable: {group.reasons[0]}")
            if whole(group) and ratios[gid] > 0:
                raise MultinetError(f"group {gid} ({', '.join(group.producers)}) goes through a grouped convolution, "
                                    f"which compress cannot reconstruct {'with unify ' if method == 'unify' else ''}"
                                    f"yet (multinet.prune can cut it)")
    else:
        grouped = [g for g in graph.prunable_groups if whole(g)]
        if grouped:
            warnings.warn(f"{len(grouped)} group(s) go through grouped convolutions, which compress cannot "
                          f"reconstruct {'with unify ' if method == 'unify' else ''}yet; they stay whole "
                          f"(groups {', '.join(str(g.id) for g in grouped)})", stacklevel=4)
        ratios = {g.id: ratio for g in graph.prunable_groups if not whole(g)}
    for gid, r in ratios.items():
        if not isinstance(r, (int, float)) or not 0 <= r < 1:
            raise MultinetError(f"ratio for group {gid} must lie in [0, 1), got {r!r}")
    return ratios


def _solve_group(current, original, group, n_remove, method, data, batch_size, max_positions, damp, device, seed,
                 surviving, preset=None, executor=None, pending=None, solved=()):
    """The reference path's group: two full passes (compressed and original model) for its statistics.
    ``pending`` / ``solved``: the consumers still to be re-solved / re-solved before, when residual-stream
    writers get their drift term (None: they do not)."""
    names = group.consumer_names
    streams = residual_partners(current, names, pending, solved) if pending is not None else {}
    ref_streams = residual_partners(original, names, pending, solved) if pending is not None else {}
    specs = consumer_specs(current, names, streams)
    ref_specs = consumer_specs(original, names, ref_streams)
    stats = collect_on(executor, current.module, specs, data, reference=original.module, reference_specs=ref_specs,
                       batch_size=batch_size, max_positions=max_positions, device=device, seed=seed)
    solution = solve_group(current, original, group, n_remove, method, stats, damp, device, seed, surviving, preset)
    if solution.weights is None:
        return solution.removed, None, solution.error
    if isinstance(solution, GroupedSolution):
        return solution.removed, grouped_layer_weights(solution), solution.error
    return solution.removed, to_layer_weights(solution.problems, solution.weights, solution.layout,
                                              solution.removed), solution.error
