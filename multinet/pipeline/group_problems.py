"""The least-squares problems one channel group poses to its consumers, built from a traced model.

Shared by sequential compression (statistics of the model compressed so far against the original)
and the scheduler (one-shot statistics of the original model). Every consumer's problem aims at the
*original* model's outputs; errors are normalised by each consumer's output energy so consumers of
different scale add up fairly.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from ..graph import ChannelGraph
from ..solve import ConsumerProblem
from ..solve.problem import removed_columns


def consumer_weight(gm: fx.GraphModule, name: str) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
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
            return (gamma.abs() / torch.sqrt(bn.running_var + bn.eps)).double().cpu().clamp_min(1e-8)
    return None


def group_problems(current: ChannelGraph, original: ChannelGraph, group, stats, damp: float, surviving):
    """One least-squares problem per consumer, aimed at the original model's outputs."""
    problems, layout = [], []
    for name in group.consumer_names:
        w_cur, b_cur, is_module = consumer_weight(current.module, name)
        w_ref, b_ref, _ = consumer_weight(original.module, name)
        has_bias = is_module or b_cur is not None
        s = stats[name]
        gram = s.gram
        cross = s.cross if s.cross is not None else s.gram  # one-shot: the model is its own reference
        outputs = surviving.get(name, torch.arange(w_ref.shape[0]))
        # statistics come back on the CPU; so do the weights, whatever device the model is on
        target = w_ref.detach().cpu().flatten(1).T.double()[:, outputs]  # m_ref x d (outputs still present)
        bias_ref = (b_ref.detach().cpu().double()[outputs] if b_ref is not None
                    else torch.zeros(len(outputs), dtype=torch.float64))
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


def relative_error(problems, weights) -> float:
    total = 0.0
    for p, w in zip(problems, weights):
        delta = p.weight.double() - w.double()
        total += p.scale * float((delta * (p.gram @ delta)).sum())
    return total


def zero_removed(problem: ConsumerProblem, removed: list[int]) -> torch.Tensor:
    weight = problem.weight.clone()
    weight[removed_columns(problem, removed)] = 0
    return weight


def to_layer_weights(problems, weights, layout, removed) -> dict:
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
