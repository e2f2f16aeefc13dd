"""``multinet.unify``: several models on one input -> one network that computes what they share once.

The search, in five steps, six with ``holdout`` (each member's own output error stays in the objective throughout):

1. Members are put in a canonical order (a digest of their weights), so the list order the user
   gives changes nothing but the names and the order of the outputs.
2. Every linkable layer of every member is scored against every other member's layer inputs, and
   against its own member's earlier tensors (skip links, which let the layers in between be removed
   whole), by least-squares R² on the calibration data (see similarity.py); each layer keeps its best
   source above ``min_r2``, in both directions between members, without cycles (bridges.py).
3. Separate compression of each member at the budget's fraction of its own FLOPs is computed first:
   it is where the search starts (no links).
4. Links are then added a direction at a time (all the links by which one member reads another;
   both directions of every pair are tried, and each member's own skip links), best R² first. The members a direction's links join,
   with the links kept so far, are unified (one MultiNet, REAP under one schedule, each member's
   output error weighted by ``member_weights``) at the budget's fraction of *their* FLOPs; the links
   are kept only if every one of those members ends no worse than separately compressed (on the
   evaluation samples, relative slack ``tolerance``) and their summed error is lower. Each trial is
   compressed twice where the members have layers that read the same tensor (their first layers):
   as they are, and with those layers fused into one, whose channels REAP then chooses among at once
   (``fuse_layers``); the lower summed error wins. A trial that
   lowers the summed error but leaves a member worse off is retried with that member weighted more;
   one that passes is timed, and dropped where its fused network runs slower than its members
   compressed separately (``speed_check``; FLOPs miss what small layers cost per call: speed.py).
   So no member pays for another's gain: never worse than separate, by construction, and a link that
   hurts one member never costs the other members the links that help them (a member with no kept
   link stays exactly separate).
5. A direction whose links the kept ones displaced (a layer reads one source: a head reading the other
   member's features cannot also take its own skip link) is tried once more in place of each kept
   direction among the same members, under the same rule: the swap is kept only if it lowers the
   summed error further.
6. With ``holdout`` (off by default), every candidate above (each member alone, every trial) is fitted on
   part of the calibration samples and compared on the rest: links add least-squares columns and REAP candidates,
   which fit the samples they are fitted on better than new ones, so compared on those a link can look
   like a gain that held-out samples show as a loss (holdout.py). What is chosen is then fitted again on
   every sample, and so is each member alone (``Unified.separate``: what ``compress`` gives it).
"""
from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..calib import batches, collect, consumer_specs, first_sample
from ..errors import MultinetError
from ..pipeline.compression import CompressResult, compress
from ..graph import count, trace
from ..runtime.executors import resolve_executor
from ..runtime.progress import Bar
from ..schedule import Budget, BudgetError, Plan
from ..schedule.oneshot import evaluation_inputs, join_outputs, output_error, output_parts
from .bridges import Bridge, add_bridges, choose_links, live_links
from .fusion import SHARED, fuse_across_members, layers_fused_across_members
from .holdout import HOLDOUT, FitSamples, check_fraction, count_samples, held_out, holdout_step
from .multinet import MultiNet, combine, model_costs, named_models
from . import speed
from .similarity import Candidate, canonical_order, linkable_layers, score_candidates, skip_conflicts

MIN_R2 = 0.5  # a layer reads another member only where that member explains at least half its input


@dataclass
class Match:
    """A removed channel of one member and the other member's channel that best stands in for it."""

    model: str
    layer: str  # the layer that read the removed channel (it now reads the other model's channels)
    channel: int  # position in that layer's own input
    other_model: str
    other_layer: str  # whose input holds the stand-in channel; "(bias)" for a constant channel
    other_channel: int  # -1 for a constant channel
    alpha: float  # removed ≈ alpha * stand-in + beta, over the calibration data
    beta: float
    r2: float


@dataclass
class Unified:
    model: MultiNet  # forward(x) -> {model name: output}; its links are the bridges that survived
    names: list[str]
    bridges: list[Bridge]  # the links of the members that stayed unified
    costs_before: dict[str, dict[str, int]]  # per model, "shared" and "total": flops and params
    costs_after: dict[str, dict[str, int]]
    plan: Plan | None  # the schedule of the largest unified part (None when every member is separate)
    matches: list[Match] = field(default_factory=list)
    channels: dict[str, int] = field(default_factory=dict)  # per model: channels of its groups before unification
    result: CompressResult | None = field(default=None, repr=False)  # the largest unified part's compression
    channels_after: dict[str, tuple[int, int]] = field(default_factory=dict)  # per model: (channels, groups) after
    chosen: dict[str, str] = field(default_factory=dict)  # per model: "unified" or "separate"
    errors: dict[str, dict[str, float | None]] = field(default_factory=dict)  # per model: unified/separate error
    candidates: list[Candidate] = field(default_factory=list)  # every scored link (R²), chosen or not
    unlinkable: dict[str, str] = field(default_factory=dict)  # weighted layers no link may target, and why
    separate: dict[str, CompressResult] = field(default_factory=dict, repr=False)  # each model compressed alone
    shared_channels: int = 0  # channels of the layers several members' first layers were fused into (fuse_layers)
    # per unified part ("a + b"): its fused network's time over its members' separate networks' (speed_check)
    speed: dict[str, float] = field(default_factory=dict)
    slower_trials: list[dict] = field(default_factory=list)  # trials dropped for running slower than separate

    def as_dict(self) -> dict:
        skip = {"model", "result", "separate"}
        out = {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in vars(self).items()
               if k not in skip}
        for key in ("bridges", "matches", "candidates"):
            out[key] = [asdict(v) for v in getattr(self, key)]
        out["summary"] = self.summary()
        return out

    def summary(self) -> list[dict]:
        """Per model: FLOPs before -> after, channels of its groups (outputs included) before -> after,
        groups removed entirely, how many of its channels another model stands in for, whether it
        stayed unified or fell back to its separate compression, both final-output errors, and the weight
        its error had in the unified schedule (``member_weights``, doubled where a link first left it worse)."""
        rows = []
        for name in self.names:
            before = self.channels.get(name, 0)
            after, groups_removed = self.channels_after.get(name, (before, 0))
            errors = self.errors.get(name, {})
            rows.append(dict(
                model=name, flops_before=self.costs_before[name]["flops"], flops_after=self.costs_after[name]["flops"],
                channels_before=before, channels_after=after, groups_removed=groups_removed,
                replaced_by_other_models=sum(1 for m in self.matches if m.model == name and m.other_channel >= 0),
                chosen=self.chosen.get(name, "unified"), error=errors.get("unified"),
                separate_error=errors.get("separate"), weight=errors.get("weight"),
            ))
        rows.append(dict(model="shared", flops_before=self.costs_before["shared"]["flops"],
                         flops_after=self.costs_after["shared"]["flops"], channels_after=self.shared_channels))
        return rows


@dataclass
class _Part:
    """Members unified together: their MultiNet, the bridged graph it came from, and its compression."""

    members: list[str]
    model: MultiNet
    bridged: fx.GraphModule
    bridges: list[Bridge]
    result: CompressResult
    links: list[Candidate] = field(default_factory=list)  # what the part was built from, to fit it again
    budget: Budget | None = None  # ... with the member weights its trial used
    fused: bool = False  # ... and whether the members' layers that read the same tensor were one (_best_variant)
    speed: float | None = None  # its fused network's time over its members' separate networks' (speed_check)


def unify(models, calibration_data, budget: Budget | float = 0.5, schedule: str = "auto", example_inputs=None,
          batch_size: int = 128, min_r2: float = MIN_R2, tolerance: float = 0.0, eval_samples: int = 1024,
          member_weights: Mapping[str, float] | None = None, skip_links: bool = True, holdout: float = HOLDOUT,
          fuse_layers: bool = True, speed_check: bool | int = True, **compress_options) -> Unified:
    """Merge models that read the same input into one MultiNet and compress it to ``budget``.

    ``models``: {name: model}, (name, model) pairs, or a list. ``budget``: a Budget (FLOPs or
    parameters), or a FLOPs fraction of all the models together. A member's layer reads another
    member's tensor where that explains at least ``min_r2`` of its input (least squares on the
    calibration data); the schedule then decides, with REAP, which channels of every member to
    remove. Every member is also compressed on its own to the same fraction, and keeps that
    separate result when unification would give it a larger final-output error (relative slack
    ``tolerance``): links are added only where they help every member they join (see
    ``_unified_parts``). ``member_weights``: each member's weight in the unified schedule's
    final-output error (default 1: all count equally). ``skip_links``: a member's layer may also read an
    earlier tensor of its own (another channel group) that explains its input, so that the layers in
    between can be removed whole where that beats narrowing them (at small budgets); like every link, a
    member keeps its skip links only when they lower its error. ``holdout``: a fraction of the calibration
    samples (0.5: every second one; at most ``eval_samples`` of them are read) that every candidate is
    compared on and none is fitted on; what is chosen is then fitted again on every sample (see
    holdout.py). 0 (the default), or fewer than ``holdout.MIN_HELD`` such samples: fit and compare on the
    same samples. ``fuse_layers``: every trial is also compressed with the members' layers that read the
    same tensor (their first layers) fused into one, so that REAP chooses among all their channels at
    once; the variant with the lower summed error is kept (see ``_Trials._best_variant``).
    ``speed_check``: a trial is also timed on one batch of calibration inputs (``batch_size`` of them, or
    up to as many as an int given here: the batch you will run inference at, since which layers are fast
    depends on it), on the run's device, and dropped where its fused network runs slower than its members
    compressed separately, one after another (FLOPs miss what small and odd-sized layers cost per call: see
    speed.py); the ratios of the parts kept are ``Unified.speed`` (as measured when chosen). It costs 16
    forward passes of that batch per trial that passes the accuracy rule (58 where the first 7 paired
    rounds read within 5 % of 1: ``speed.settled_ratio``), and makes the result depend on the machine's
    speed and load where a trial is within noise of the limit. False: no timing. The result
    does not depend on the order of ``models`` (up to that timing). ``compress_options`` are passed to
    :func:`multinet.compress`; with ``progress=True`` the search shows its own steps too (each model
    alone, then every link trial: which member reads which, kept or dropped).
    """
    given = compress_options.get("executor")
    if not isinstance(given, str):
        return _unify(models, calibration_data, budget, schedule, example_inputs, batch_size, min_r2, tolerance,
                      eval_samples, member_weights, skip_links, holdout, fuse_layers, speed_check, **compress_options)
    executor = resolve_executor(given)  # one executor for every compression: its Ray actors are reused
    try:
        return _unify(models, calibration_data, budget, schedule, example_inputs, batch_size, min_r2, tolerance,
                      eval_samples, member_weights, skip_links, holdout, fuse_layers, speed_check,
                      **{**compress_options, "executor": executor})
    finally:
        executor.release()


def _unify(models, calibration_data, budget, schedule, example_inputs, batch_size, min_r2, tolerance, eval_samples,
           member_weights, skip_links, holdout, fuse_layers, speed_check, **compress_options) -> Unified:
    named = named_models(models)
    budget = _checked(budget)
    weights = _checked_weights(member_weights, list(named))
    fraction = check_fraction(holdout)  # the data is counted only where a holdout is asked for
    step = holdout_step(fraction, count_samples(calibration_data, batch_size)) if fraction else None
    fit = calibration_data if step is None else FitSamples(calibration_data, batch_size, step)
    example = example_inputs
    if example is None:
        example = first_sample(calibration_data, batch_size)
    order = canonical_order(named)
    net = MultiNet({n: named[n] for n in order}, example, *_tracing(compress_options))
    graph = trace(net.graph_module, example)
    targets, unlinkable = {}, {}
    for member in order:
        ok, why = linkable_layers(graph, net.graph_module, member)
        targets[member] = list(ok)
        unlinkable.update(why)
    candidates = score_candidates(net.graph_module, targets, fit, batch_size,
                                  conflicts=skip_conflicts(graph) if skip_links else None)
    rank = {m: i for i, m in enumerate(order)}

    def links_among(members: list[str], ways: set[tuple[str, str]]) -> list[Candidate]:
        mine = [c for c in candidates if c.model in members and c.source in members and (c.model, c.source) in ways]
        return choose_links(net.graph_module, mine, rank, min_r2, ways)

    options = dict(schedule=schedule, batch_size=batch_size, eval_samples=eval_samples, **compress_options)
    if step is None:
        inputs = evaluation_inputs(calibration_data, batch_size, eval_samples)
    else:
        inputs = held_out(calibration_data, batch_size, step, eval_samples)
    reference = member_outputs(net, inputs)
    progress = bool(compress_options.get("progress", False))
    bar = Bar(progress, len(order), "unify: each model alone")
    separate = {}
    for m in order:
        bar.note(m)
        separate[m] = _separate(m, named[m], fit, budget, example, options)
        bar.advance()
    bar.close()
    errors = {m: {"unified": None, "separate": member_errors(s[0], inputs, reference)[m] if s else None}
              for m, s in separate.items()}
    trials = _Trials(named, order, fit, budget, example, options, inputs, reference, errors, tolerance,
                     weights, fuse_layers, speed_batch=_speed_batch(speed_check, calibration_data, batch_size),
                     separate={m: s[1].model for m, s in separate.items() if s})
    parts = _unified_parts(trials, links_among, progress, skip_links)
    if step is not None:  # chosen on the held-out samples: now fitted on every sample
        parts, separate = _refitted(named, order, parts, calibration_data, budget, example, options, progress)
    together = {m for p in parts for m in p.members}
    alone = [m for m in order if m not in together]
    for m in alone:
        if separate[m] is None:
            raise BudgetError(f"model {m!r} cannot be compressed to this budget on its own, and no link to another "
                              f"model helps it")
    model = combine([p.model for p in parts] + [separate[m][0] for m in alone], list(named))
    bridges = [b for p in parts for b in p.bridges]
    matches = [m for p in parts for m in _matches(p.bridged, p.bridges, p.result.plan, calibration_data, example,
                                                   batch_size)]
    largest = max(parts, key=lambda p: len(p.members), default=None)
    shared = _shared_channels(model, example)
    return Unified(model, list(named), bridges, model_costs(net), model_costs(model, example),
                   largest.result.plan if largest else None, matches, _channels(net, example, list(named)),
                   replace(largest.result, model=largest.model) if largest else None,
                   _channels_after(net, model, example, list(named), shared),
                   {m: "unified" if m in together else "separate" for m in named}, {m: errors[m] for m in named},
                   candidates, unlinkable, {m: s[1] for m, s in separate.items() if s}, shared,
                   {" + ".join(p.members): p.speed for p in parts if p.speed is not None},
                   [{"members": list(members), "time_ratio": ratio} for members, ratio in trials.slower])


def _tracing(compress_options: Mapping) -> tuple:
    """The members' tracing settings (compress's ``leaf_modules`` and ``autowrap_functions``)."""
    return compress_options.get("leaf_modules", ()), compress_options.get("autowrap_functions", ())


def _speed_batch(speed_check: bool | int, data, batch_size: int) -> Any:
    """The calibration inputs trials are timed on (``speed_check``: True, ``batch_size`` of them; an int, at
    most that many: all the samples where there are fewer), or None for no timing."""
    if speed_check is False:
        return None
    try:
        size = batch_size if speed_check is True else operator.index(speed_check)  # numpy ints too
    except TypeError:
        size = 0
    if size < 1:
        raise MultinetError(f"speed_check must be True, False or a batch size (a positive int), got {speed_check!r}")
    return batches.concat(evaluation_inputs(data, size, size))


def _checked_weights(member_weights, names: list[str]) -> dict[str, float]:
    given = dict(member_weights or {})
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise MultinetError(f"member_weights names unknown models {unknown}; the models are {names}")
    bad = {k: v for k, v in given.items() if not isinstance(v, (int, float)) or not 0 < v < float("inf")}
    if bad:
        raise MultinetError(f"member_weights must be positive numbers, got {bad}")
    return {n: float(given.get(n, 1.0)) for n in names}


def _checked(budget) -> Budget:
    if not isinstance(budget, Budget):
        budget = Budget(flops=budget)
    if budget.metric == "latency":
        raise BudgetError("unify takes a FLOPs or parameter budget: a latency budget does not split per model")
    if hasattr(budget.min_channels, "keys"):
        raise BudgetError("unify takes min_channels as one number: group ids differ between the models apart and "
                          "together")
    return budget


def _budget_for(budget: Budget, members: list[str], everyone: list[str], strip: bool = False) -> Budget:
    """The budget for some members: ignore patterns of other members dropped (and for a model
    compressed on its own, ``strip``, its name prefix removed)."""
    ignore = []
    for pattern in budget.ignore:
        owner = next((m for m in everyone if pattern.startswith(f"{m}.")), None)
        if owner is None:
            ignore.append(pattern)
        elif owner in members:
            ignore.append(pattern[len(owner) + 1:] if strip else pattern)
    return replace(budget, ignore=tuple(ignore))


def _separate(name: str, model, data, budget: Budget, example, options) -> tuple[MultiNet, CompressResult] | None:
    """The member compressed on its own to the same fraction (None when it cannot reach it)."""
    try:
        result = compress(model, data, budget=_budget_for(budget, [name], [name], strip=True), **options)
    except BudgetError:
        return None
    return MultiNet({name: result.model}, example), result


@dataclass
class _Trials:
    """What every link trial shares: the members, the data and budget, the evaluation samples with the
    original members' outputs on them, and each member's errors (``errors[m]["separate"]`` alone;
    ``"unified"`` and ``"weight"`` are written when a trial is kept) and weight."""

    named: dict[str, nn.Module]
    order: list[str]  # canonical
    data: Any
    budget: Budget
    example: Any
    options: dict
    inputs: list
    reference: dict[str, list[torch.Tensor]]
    errors: dict[str, dict]
    tolerance: float
    weights: dict[str, float]
    fuse_layers: bool = True  # also try the members' layers that read the same tensor as one (_best_variant)
    fusable: dict = field(default_factory=dict)  # (members, ignore) -> whether they have such layers
    speed_batch: Any = None  # inputs a trial is timed on against its members' separate networks (None: not timed)
    separate: dict[str, nn.Module] = field(default_factory=dict)  # each member compressed alone (absent: it cannot be)
    slower: list = field(default_factory=list)  # (members, time ratio) of the trials dropped for it
    last_slower: float | None = None  # the last attempt's time ratio, where that is why it was dropped

    def attempt(self, members: list[str], links: list[Candidate], current: dict[str, float | None]
                ) -> tuple[_Part, dict[str, float], dict[str, float]] | None:
        """The members unified by ``links``, if that leaves every one no worse than separately
        compressed and their summed error lower than ``current``: (the part, each member's error, the
        weights used), else None.

        A trial that lowers the summed error but leaves some members worse off is retried with those
        members' weights in the schedule's objective doubled (``REWEIGHTS`` times): the weights act as
        multipliers on the "never worse" constraints, so a shared trunk can be split more fairly
        instead of being thrown away. A trial that passes is then timed (``speed_check``): its fused
        network slower than its members' separate networks drops it (``speed.settled_ratio`` above 1)."""
        used = {m: self.weights[m] for m in members}
        before = [current[m] for m in members]
        self.last_slower = None
        for _ in range(REWEIGHTS + 1):
            budget = replace(_budget_for(self.budget, members, self.order),
                             output_weights=tuple(used[m] for m in members for _ in self.reference[m]))
            found = self._best_variant(members, links, budget)
            if found is None:
                return None
            part, got = found
            alone = {m: self.errors[m]["separate"] for m in members}
            worse = [m for m in members if alone[m] is not None and got[m] > alone[m] * (1 + self.tolerance) + 1e-12]
            gain = None in before or sum(got[m] for m in members) < sum(before) - MIN_GAIN
            if not worse and gain:
                part.speed = self._time_ratio(members, part)
                if part.speed is not None and speed.is_slower(part.speed):
                    self.slower.append((list(members), part.speed))
                    self.last_slower = part.speed
                    return None
                return part, got, used
            if not gain:
                return None
            used = {m: used[m] * (2.0 if m in worse else 1.0) for m in members}
        return None

    def _time_ratio(self, members: list[str], part: _Part) -> float | None:
        """The part's network's time, fused for ``speed_batch`` (speed.unified_vs_separate), over its
        members' separate networks' on that batch, on the run's device; None where that is not asked for
        or a member has no separate network to compare with. The reference is always every member apart
        (the goal), not the parts kept so far."""
        if self.speed_batch is None or any(m not in self.separate for m in members):
            return None
        return speed.unified_vs_separate(part.model, [self.separate[m] for m in members],
                                         self.speed_batch, device=self.options.get("device"))

    def _fusable(self, members: list[str], budget: Budget) -> bool:
        """``_fusable`` once per set of members (a trial's reweighted retries ask again)."""
        key = (tuple(members), budget.ignore)
        if key not in self.fusable:
            self.fusable[key] = _fusable(self.named, members, self.example, self.options, budget)
        return self.fusable[key]

    def _best_variant(self, members: list[str], links: list[Candidate], budget: Budget
                      ) -> tuple[_Part, dict[str, float]] | None:
        """The members unified by ``links`` as they are, and with their layers that read the same tensor
        fused into one (see ``fusion.fuse_across_members``) where they have any: whichever leaves no
        member worse than separately compressed and the lower summed error (each member's error by its
        weight in ``budget``). Neither is better everywhere: on digit MLPs fused won at 2 % of FLOPs for
        a digit + parity pair (0.86 / 0.94 accuracy against 0.72 / 0.97) and lost for two digit models
        of different seeds (0.89 / 0.89 against 0.93 / 0.92). None when neither reaches the budget."""
        found = []
        for fused in (False, True):
            if fused and not (self.fuse_layers and self._fusable(members, budget)):
                break
            try:
                part = _unify_part(self.named, members, links, self.data, budget, self.example, self.options, fused)
            except BudgetError:
                continue
            if over_budget(part.result.plan):
                continue  # surgery kept what the cost model let go (see over_budget): not a result at this budget
            found.append((part, member_errors(part.model, self.inputs, self.reference)))
        if not found:
            return None
        alone = {m: self.errors[m]["separate"] for m in members}
        weights = dict(zip([m for m in members for _ in self.reference[m]], budget.output_weights or ()))

        def rank(item):
            part, got = item
            worse = any(alone[m] is not None and got[m] > alone[m] * (1 + self.tolerance) + 1e-12 for m in members)
            # a tie (an exact collapse either way, equal up to float rounding) keeps the members' own layers
            error = sum(weights.get(m, 1.0) * got[m] for m in members)
            return worse, error + part.fused * (FUSED_MARGIN * error + MIN_GAIN)

        return min(found, key=rank)


# a trial's links are kept only where they lower the members' summed error (each a fraction of its outputs'
# energy) by more than this: two exact collapses of a model and its copy differ by float rounding (1e-14 to
# 1e-12 in float32), and a "gain" of that size would keep links that only make the network less tidy
MIN_GAIN = 1e-9
# the fused variant is chosen only where its summed error is lower by more than this fraction of it and
# MIN_GAIN: below that, both are exact up to float rounding
FUSED_MARGIN = 1e-3
REWEIGHTS = 2  # times a promising trial is retried with more weight on the members it leaves worse off


def over_budget(plan: Plan | None) -> bool:
    """The compressed part costs more than its budget (once one of two bridged groups is gone, the
    other's readers read only it, and it keeps a channel: see ``Plan.over_target``)."""
    return plan is not None and plan.over_target()


def _unified_parts(trials: _Trials, links_among, progress: bool = False, skip_links: bool = True) -> list[_Part]:
    """Forward selection of links, starting from separate compression (no links). The links are taken
    a direction at a time (every link by which one member reads another; both directions of every
    pair are tried, the second on top of the first where that was kept), best R² first. A direction's
    links are kept only if unifying the members they join, with the links kept so far, leaves every
    one of those members no worse than separately compressed (relative slack ``tolerance``) and their
    summed error lower than before (see ``_Trials.attempt``). A member's skip links (reading its own
    earlier tensors, ``skip_links``) are one more direction, (member, member). A link that would make any member pay
    for another's gain is never added, so no member needs to fall back, and the others keep the links
    that help them. Directions blocked by kept ones get a second chance in their place (``_swaps``)."""
    order, errors = trials.order, trials.errors
    ways = [(a, b) for a in order for b in order if a != b or skip_links]
    alone = {way: links_among(order, {way}) for way in ways}
    rank = {m: i for i, m in enumerate(order)}  # ties: the later member in canonical order reads first
    # links between members first (sharing is the point); skip links then collapse what each member keeps
    queue = sorted((w for w in ways if alone[w]),
                   key=lambda w: (w[0] == w[1], -max(round(lk.r2, 9) for lk in alone[w]), -rank[w[0]], rank[w[1]]))
    kept: list[Candidate] = []
    kept_ways: set[tuple[str, str]] = set()
    parts: dict[frozenset, _Part] = {}  # unified components, by their members
    current = {m: errors[m]["separate"] for m in order}  # None: cannot reach the budget alone
    bar = Bar(progress, len(queue), "unify: link trials")
    outcome = ""
    blocked = []  # directions whose links the kept ones displaced: tried again in place of one of those

    def keep(trial, ways, members, got):
        nonlocal kept, kept_ways, parts
        part, member_error, used = got
        kept, kept_ways = trial, ways
        for m in members:
            current[m] = errors[m]["unified"] = member_error[m]
            errors[m]["weight"] = used[m]
        parts = {k: v for k, v in parts.items() if not k & set(members)}
        parts[frozenset(members)] = part

    for way in queue:
        bar.note(f"{outcome}{_named(way)}")
        trial = links_among(order, kept_ways | {way})
        bar.advance()
        if not set(map(_key, kept)) <= set(map(_key, trial)) or not any(
                (lk.model, lk.source) == way for lk in trial):
            outcome = f"{_named(way)}: no link left; "
            blocked.append(way)
            continue  # its links would displace kept ones, or every one of them closes a cycle
        members = next(c for c in _components(order, trial) if way[0] in c)
        got = trials.attempt(members, [lk for lk in trial if lk.model in members and lk.source in members], current)
        outcome = f"{_named(way)}: {_outcome(got, trials)}; "
        if got is not None:
            keep(trial, kept_ways | {way}, members, got)
    for way, instead in _swaps(blocked, kept_ways, parts):
        if way in kept_ways or instead not in kept_ways:
            continue
        ways = (kept_ways - {instead}) | {way}
        trial = links_among(order, ways)
        rest = links_among(order, kept_ways - {instead})
        members = next(c for c in _components(order, trial) if way[0] in c)
        same = next((k for k in parts if way[0] in k), frozenset({way[0]}))
        if (not set(map(_key, rest)) <= set(map(_key, trial)) or not any((lk.model, lk.source) == way for lk in trial)
                or frozenset(members) != same):
            continue  # still displaced, or the swap would split the members it joins
        bar.note(f"{outcome}{_named(way)} instead of {_named(instead)}")
        got = trials.attempt(members, [lk for lk in trial if lk.model in members and lk.source in members], current)
        outcome = f"{_named(way)} instead of {_named(instead)}: {_outcome(got, trials)}; "
        if got is not None:
            keep(trial, ways, members, got)
    bar.note(outcome.rstrip("; "))
    bar.close()
    return list(parts.values())


def _swaps(blocked: list[tuple[str, str]], kept_ways: set[tuple[str, str]], parts: dict[frozenset, _Part]
           ) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """(blocked direction, kept direction it might replace): the kept directions among the members the
    blocked one would join, so that a swap never splits a unified part. Greedy forward selection keeps
    the first direction that helps at all; one that helps more but reads the same layers (a member's
    skip links and the other member's features, both for its head) is blocked by it, and the swap is
    its second chance."""
    pairs = []
    for way in blocked:
        members = next((k for k in parts if way[0] in k), frozenset({way[0]}))
        pairs += [(way, v) for v in sorted(kept_ways) if v[0] in members and v[1] in members]
    return pairs


def _outcome(got, trials: _Trials) -> str:
    if got is not None:
        return "kept"
    slower = trials.last_slower
    return "dropped" if slower is None else f"dropped: {slower:.2f}x the time of separate"


def _named(way: tuple[str, str]) -> str:
    return f"{way[0]} skipping its own layers" if way[0] == way[1] else f"{way[0]} reading {way[1]}"


def _key(link: Candidate) -> tuple[str, str]:
    return link.layer, link.source_layer


def _components(members: list[str], links: list[Candidate]) -> list[list[str]]:
    """Members joined (in either direction) by links, each set in canonical order."""
    root = {m: m for m in members}

    def find(m):
        while root[m] != m:
            m = root[m]
        return m

    for lk in links:
        if lk.model in root and lk.source in root:
            root[find(lk.model)] = find(lk.source)
    sets: dict[str, list[str]] = {}
    for m in members:
        sets.setdefault(find(m), []).append(m)
    return list(sets.values())


def _unify_part(named, members: list[str], links: list[Candidate], data, budget: Budget, example, options,
                fused: bool = False) -> _Part:
    net = MultiNet({m: named[m] for m in members}, example, *_tracing(options))
    bridged, bridges = add_bridges(net, example, links)
    if fused:  # the members' layers that read the same tensor, one layer: REAP chooses among all their channels
        bridged = fuse_across_members(bridged, members, keep=budget.ignore)
    result = compress(bridged, data, budget=_relative_to(budget, net.graph_module, bridged), **options)
    model = MultiNet.from_graph(result.model, members, live_links(bridges, result.model))
    return _Part(members, model, bridged, bridges, result, list(links), budget, fused)


def _fusable(named, members: list[str], example, options, budget: Budget) -> bool:
    """Whether some of the members' layers read the same tensor (and would be fused for compression)."""
    if len(members) < 2:
        return False
    gm = MultiNet({m: named[m] for m in members}, example, *_tracing(options)).graph_module
    return bool(layers_fused_across_members(gm, members, keep=budget.ignore))


def _refitted(named, order: list[str], parts: list[_Part], data, budget: Budget, example, options, progress: bool
              ) -> tuple[list[_Part], dict[str, tuple[MultiNet, CompressResult] | None]]:
    """The chosen parts and every member alone, fitted again on all the calibration samples (the
    choice was made on samples none of them was fitted on). A part that no longer fits its budget
    on all of them (REAP may keep other channels) stays as it was chosen."""
    bar = Bar(progress, len(parts) + len(order), "unify: the choice fitted on every sample")
    again = []
    for part in parts:
        bar.note(" + ".join(part.members))
        try:
            new = _unify_part(named, part.members, part.links, data, part.budget, example, options, part.fused)
        except BudgetError:
            new = part
        if new is not part:
            new.speed = part.speed  # the structure timed when it was chosen
        again.append(part if over_budget(new.result.plan) else new)
        bar.advance()
    separate = {}
    for m in order:
        bar.note(f"{m} alone")
        separate[m] = _separate(m, named[m], data, budget, example, options)
        bar.advance()
    bar.close()
    return again, separate


def member_outputs(net: MultiNet, inputs: list) -> dict[str, list[torch.Tensor]]:
    """Per member, its outputs over the evaluation batches (float64, one matrix per output)."""
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    with torch.no_grad():
        outs = [batches.call(net, batches.to_device(x, device)) for x in inputs]
    return {m: join_outputs([output_parts(b[m]) for b in outs]) for m in net.members}


def member_errors(net: MultiNet, inputs, reference: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """Each member's relative squared error at its own outputs (what "never worse" compares)."""
    outs = member_outputs(net, inputs)
    return {m: output_error(outs[m], reference[m]) for m in outs}


def _member_groups(graph, name: str) -> list:
    return [g for g in graph.groups if g.producers and all(p.startswith(f"{name}.") for p in g.producers)]


def _channels(net: MultiNet, example, names: list[str]) -> dict[str, int]:
    graph = trace(net.graph_module, example)
    return {n: sum(g.size for g in _member_groups(graph, n)) for n in names}


def _channels_after(net: MultiNet, model: MultiNet, example, names: list[str], shared_channels: int
                    ) -> dict[str, tuple[int, int]]:
    """Per member: channels of its groups after, and how many of its groups are gone entirely (a group
    whose layer was fused with other members' into a shared one is not gone: see ``_shared_channels``)."""
    before, after = trace(net.graph_module, example), trace(model.graph_module, example)
    fused = {name for layers in layers_fused_across_members(net.graph_module, names) for name in layers}
    shared = shared_channels > 0
    out = {}
    for n in names:
        kept = {p for g in _member_groups(after, n) for p in g.producers}
        gone = [g for g in _member_groups(before, n) if not set(g.producers) & kept
                and not (shared and set(g.producers) <= fused)]
        out[n] = (sum(g.size for g in _member_groups(after, n)), len(gone))
    return out


def _shared_channels(model: MultiNet, example) -> int:
    """Channels of the layers several members' layers were fused into for compression (``fuse_layers``)."""
    graph = trace(model.graph_module, example)
    return sum(g.size for g in graph.groups if g.producers and all(p.startswith(SHARED) for p in g.producers))


def compress_multinet(net: MultiNet, calibration_data, **options) -> CompressResult:
    """:func:`multinet.compress` for a MultiNet: compresses its graph, and the result's model is
    a MultiNet again (same members; links to layers that survived). The pipeline works on the
    unfused graph, where every member keeps its own layers and channel groups."""
    if not isinstance(net, MultiNet):
        raise MultinetError(f"compress_multinet takes a MultiNet, got {type(net).__name__}")
    if net.is_fused:
        raise MultinetError("this MultiNet is fused (for inference); compress the unfused one it came from")
    if options.get("skip_links"):
        raise MultinetError("a MultiNet's skip links are chosen by unify (unify(..., skip_links=True)), not by "
                            "compressing it again")
    result = compress(net.graph_module, calibration_data, **options)
    return replace(result, model=net.with_graph(result.model))


def _relative_to(budget: Budget, net: fx.GraphModule, bridged: fx.GraphModule) -> Budget:
    """The budget is a fraction of the models as given; bridges widen layers (zero weights), so
    the same absolute cost is a smaller fraction of the bridged network."""
    before, after = count(net), count(bridged)
    key = budget.metric
    fraction = getattr(budget, key) * getattr(before, key) / getattr(after, key)
    return replace(budget, **{key: fraction})


def _matches(bridged: fx.GraphModule, bridges: list[Bridge], plan: Plan | None, data, example,
             batch_size: int) -> list[Match]:
    """For every channel a bridged layer lost, the other member's channel with the best affine fit."""
    if plan is None or not bridges:
        return []
    graph = trace(bridged, example)
    removed = plan.removals()
    lost: dict[str, list[tuple[int, int]]] = {}  # bridged layer -> [(position, column)] of its own lost inputs
    gone_sources: dict[str, set[int]] = {}  # bridged layer -> positions of other members' removed channels
    by_name = {b.consumer: b for b in bridges}
    for gid, channels in removed.items():
        for slot in graph.group(gid).consumers:
            if slot.consumer not in by_name:
                continue
            shared = sum(w for _, _, w in by_name[slot.consumer].sources)
            gone = torch.isin(slot.channels, torch.tensor(channels))
            centre = slot.columns_per_position * slot.block // 2
            for pos, cols in zip(slot.positions[gone].tolist(), slot.column_blocks()[gone]):
                if pos >= shared:
                    lost.setdefault(slot.consumer, []).append((pos, int(cols[centre])))
                else:  # the other member lost it too: it cannot stand in
                    gone_sources.setdefault(slot.consumer, set()).add(pos)
    if not lost:
        return []
    stats = collect(graph.module, consumer_specs(graph, list(lost)), data, batch_size=batch_size, max_positions=64)
    out = []
    for layer, items in lost.items():
        bridge = by_name[layer]
        g = stats[layer].gram
        n = g[-1, -1]
        mean = g[:-1, -1] / n
        cov = g[:-1, :-1] / n - mean[:, None] * mean[None, :]
        per_position = graph.analysis.layers[layer].columns_per_position
        starts = [0]
        for _, _, width in bridge.sources:
            starts.append(starts[-1] + width)
        shared = starts[-1]
        lost_cols = torch.tensor([col for _, col in items])
        # every lost channel against every other-member channel at once, at the same tap
        src_cols = torch.arange(shared)[None, :] * per_position + (lost_cols % per_position)[:, None]
        var_lost = cov[lost_cols, lost_cols]
        var_src = cov[src_cols, src_cols].clamp_min(1e-30)
        r2 = cov[lost_cols[:, None], src_cols] ** 2 / (var_lost.clamp_min(1e-30)[:, None] * var_src)
        r2[:, torch.isin(torch.arange(shared), torch.tensor(sorted(gone_sources.get(layer, ())), dtype=torch.long))] = -1
        best = torch.argmax(r2, 1)
        constant = var_lost <= 1e-12 * cov.diagonal().max().clamp_min(1e-30)  # the bias stands in
        for i, (pos, col) in enumerate(items):
            if constant[i]:
                out.append(Match(bridge.model, layer, pos - shared, bridge.model, "(bias)", -1, 0.0,
                                 float(mean[col]), 1.0))
                continue
            j = int(best[i])
            source = next(s for s in range(len(bridge.sources)) if starts[s] <= j < starts[s + 1])
            model, other_layer, _ = bridge.sources[source]
            alpha = float(cov[col, src_cols[i, j]] / var_src[i, j])
            out.append(Match(bridge.model, layer, pos - shared, model, other_layer, j - starts[source], alpha,
                             float(mean[col] - alpha * mean[src_cols[i, j]]), float(r2[i, j])))
    return out
