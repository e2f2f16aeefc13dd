"""``multinet.compress``: trace, calibrate, select, reconstruct and cut, one group at a time.

Groups are compressed in graph order. Each step calibrates the model compressed so far against
the original model (sequential mode), so every consumer is re-solved towards the *original*
outputs and errors do not compound. Methods:

* ``reap``: greedy REAP selection and least-squares reconstruction (the seed method);
* ``magnitude``: lowest L1 norm of producer filters, no reconstruction;
* ``magnitude+ls``: the same selection, least-squares reconstruction;
* ``random``: a seeded random selection, no reconstruction.
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from .calib import collect, consumer_specs, iterate_batches
from .errors import MultinetError
from .graph import ChannelGraph, count, prune, trace
from .solve import ConsumerProblem, reap_greedy_multi, reconstruct_multi
from .solve.problem import removed_columns
from .solve.selection import lowest, magnitude_scores, random_channels

METHODS = ("reap", "magnitude", "magnitude+ls", "random")


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

    def as_dict(self) -> dict:
        out = asdict(self)
        out.pop("model")
        return out


def compress(model: nn.Module, calibration_data, ratio: float | Mapping[int, float] = 0.5, method: str = "reap",
             batch_size: int = 128, max_positions: int | None = 256, damp: float = 1e-6, device: str = "cpu",
             seed: int = 0, leaf_modules=(), autowrap_functions=(), progress: bool = False) -> CompressResult:
    """Remove ``ratio`` of the channels of every prunable group (or per group: {group_id: ratio}).

    ``calibration_data``: a tensor of inputs, or a re-iterable of tensors or (inputs, targets)
    batches (a list or a DataLoader). ``max_positions`` sub-samples conv output positions per
    image to bound calibration cost. ``progress=True`` shows a progress bar over the groups.
    """
    if method not in METHODS:
        raise MultinetError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if not isinstance(calibration_data, torch.Tensor) and iter(calibration_data) is calibration_data:
        raise MultinetError("calibration_data must be re-iterable (a tensor, a list or a DataLoader), not an iterator")
    example = next(iter(iterate_batches(calibration_data, batch_size)))[:1]  # FLOPs per example
    original = trace(model, example, leaf_modules, autowrap_functions)
    ratios = _ratios(original, ratio)
    current = original
    reports = []
    surviving: dict[str, torch.Tensor] = {}  # layer -> original indices of its remaining outputs
    bar = _progress(progress, len(ratios), method)
    for gid, r in ratios.items():
        bar.advance()
        start = time.time()
        group = current.group(gid)
        n_remove = min(math.floor(r * group.size + 1e-9), group.size - 1)
        if n_remove == 0:
            continue
        removed, weights, error = _solve_group(current, original, group, n_remove, method, calibration_data,
                                               batch_size, max_positions, damp, device, seed + gid, surviving)
        keep = [c for c in range(group.size) if c not in set(removed)]
        _track_outputs(current, group, keep, surviving)
        pruned = prune(current, {gid: keep}, consumer_weights=weights)
        current = trace(pruned, example)
        reports.append(GroupReport(gid, group.producers, group.size, len(keep), error, time.time() - start,
                                   sorted(removed)))
    bar.close()
    before, after = count(original.module), count(current.module)
    return CompressResult(current.module, reports, before.flops, after.flops, before.params, after.params, method)


class _progress:
    """A rich progress bar over groups, or nothing."""

    def __init__(self, enabled: bool, total: int, method: str):
        self.bar = None
        if enabled:
            from rich.progress import Progress

            self.bar = Progress(transient=True)
            self.task = self.bar.add_task(f"{method}: groups", total=total)
            self.bar.start()

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _track_outputs(graph: ChannelGraph, group, keep: list[int], surviving: dict[str, torch.Tensor]) -> None:
    kept = torch.tensor(keep)
    table = graph.analysis.table
    for space, offset in group.members:
        sp = table.spaces[space]
        if sp.kind != "producer":
            continue
        local = kept - offset
        local = local[(local >= 0) & (local < sp.size)]
        surviving[sp.owner] = surviving.get(sp.owner, torch.arange(sp.size))[local]


def _ratios(graph: ChannelGraph, ratio) -> dict[int, float]:
    if isinstance(ratio, Mapping):
        ratios = dict(ratio)
        for gid in ratios:
            try:
                group = graph.group(gid)
            except KeyError as exc:
                raise MultinetError(exc.args[0]) from None
            if not group.prunable and ratios[gid] > 0:
                raise MultinetError(f"group {gid} is not prunable: {group.reasons[0]}")
    else:
        ratios = {g.id: ratio for g in graph.prunable_groups}
    for gid, r in ratios.items():
        if not isinstance(r, (int, float)) or not 0 <= r < 1:
            raise MultinetError(f"ratio for group {gid} must lie in [0, 1), got {r!r}")
    return ratios


def _consumer_weight(gm: fx.GraphModule, name: str) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """(weight, bias, is_module) of a consumer: a module name or a functional weight attribute."""
    try:
        module = gm.get_submodule(name)
        return module.weight, module.bias, True
    except AttributeError:
        return getattr(gm, name), None, False


def _output_scale(gm: fx.GraphModule, graph: ChannelGraph, name: str) -> torch.Tensor | None:
    """gamma/sigma of a BatchNorm that directly follows the consumer: errors count where they matter."""
    nodes = {n.name: n for n in gm.graph.nodes}
    node = nodes[graph.analysis.layers[name].nodes[0]]
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module":
        bn = gm.get_submodule(users[0].target)
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_var is not None:
            gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)
            return (gamma.abs() / torch.sqrt(bn.running_var + bn.eps)).double().clamp_min(1e-8)
    return None


def _problems(current: ChannelGraph, original: ChannelGraph, group, stats, damp: float, surviving):
    """One least-squares problem per consumer, aimed at the original model's outputs."""
    problems, layout = [], []
    for name in group.consumer_names:
        w_cur, b_cur, is_module = _consumer_weight(current.module, name)
        w_ref, b_ref, _ = _consumer_weight(original.module, name)
        has_bias = is_module or b_cur is not None
        s = stats[name]
        gram, cross = s.gram, s.cross
        outputs = surviving.get(name, torch.arange(w_ref.shape[0]))
        target = w_ref.detach().flatten(1).T.double()[:, outputs]  # m_ref x d (outputs still present)
        bias_ref = b_ref.detach().double()[outputs] if b_ref is not None else torch.zeros(len(outputs), dtype=torch.float64)
        target = torch.cat([target, bias_ref[None]], 0)
        if not has_bias:
            gram, cross = gram[:-1, :-1], cross[:-1]
        # the full-column least-squares fit of the original outputs is the weight REAP starts from
        damped = gram + damp * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
        weight = torch.linalg.solve(damped, cross @ target)
        scale = _output_scale(current.module, current, name)
        if scale is not None:
            weight = weight * scale[None]
        energy = float((weight * (gram @ weight)).sum().clamp_min(1e-30))
        slots = [sl for sl in group.consumers if sl.consumer == name]
        channels, columns = _merge_slots(slots)
        problems.append(ConsumerProblem(gram, weight, channels, columns, 1.0 / energy))
        layout.append((name, tuple(w_cur.shape), has_bias, scale))
    return problems, layout


def _merge_slots(slots):
    """A channel entering one consumer twice (cat([y, y])) occupies both column blocks."""
    per_channel: dict[int, list[torch.Tensor]] = {}
    for slot in slots:
        for c, cols in zip(slot.channels.tolist(), slot.column_blocks()):
            per_channel.setdefault(c, []).append(cols)
    channels = sorted(per_channel)
    return torch.tensor(channels), torch.stack([torch.cat(per_channel[c]) for c in channels])


def _relative_error(problems, weights) -> float:
    total = 0.0
    for p, w in zip(problems, weights):
        delta = p.weight.double() - w.double()
        total += p.scale * float((delta * (p.gram @ delta)).sum())
    return total


def _solve_group(current, original, group, n_remove, method, data, batch_size, max_positions, damp, device, seed,
                 surviving):
    if method == "random":
        removed = random_channels(group.size, n_remove, seed, group.pieces)
    elif method in ("magnitude", "magnitude+ls"):
        removed = lowest(_magnitude(current, group), n_remove, group.pieces)
    else:
        removed = None
    specs = consumer_specs(current, group.consumer_names)
    ref_specs = consumer_specs(original, group.consumer_names)
    stats = collect(current.module, specs, data, reference=original.module, reference_specs=ref_specs,
                    batch_size=batch_size, max_positions=max_positions, device=device, seed=seed)
    problems, layout = _problems(current, original, group, stats, damp, surviving)
    if removed is None:
        result = reap_greedy_multi(problems, group.size, n_remove, damp, group.pieces)
        removed, weights = result.removed, result.weights
    elif method == "magnitude+ls":
        weights = reconstruct_multi(problems, removed, damp)
    else:
        weights = [_zero_removed(p, removed) for p in problems]
    error = _relative_error(problems, weights)
    if method in ("magnitude", "random"):
        return removed, None, error
    return removed, _to_layer_weights(problems, weights, layout, removed), error


def _zero_removed(problem: ConsumerProblem, removed: list[int]) -> torch.Tensor:
    weight = problem.weight.clone()
    weight[removed_columns(problem, removed)] = 0
    return weight


def _to_layer_weights(problems, weights, layout, removed) -> dict:
    out = {}
    for p, w, (name, shape, has_bias, scale) in zip(problems, weights, layout):
        if scale is not None:
            w = w / scale[None]
        drop = removed_columns(p, removed)
        if has_bias:
            drop[-1] = True
        kept = w[~drop]
        layer_w = kept.T.reshape(shape[0], -1, *shape[2:]).float()
        out[name] = (layer_w, w[-1].float()) if has_bias else layer_w
    return out


def _magnitude(graph: ChannelGraph, group) -> torch.Tensor:
    table = graph.analysis.table
    weights = {}
    for space, _ in group.members:
        sp = table.spaces[space]
        if sp.kind == "producer":
            weights[sp.owner] = _consumer_weight(graph.module, sp.owner)[0]
    sizes = {s: table.spaces[s].size for s, _ in group.members}
    owners = {s: table.spaces[s].owner for s, _ in group.members}
    return magnitude_scores(group, weights, sizes, owners)
