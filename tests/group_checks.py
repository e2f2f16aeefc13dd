"""Checks every prunable group of a model must pass (the foundation issue's (a), (b), (c))."""
from __future__ import annotations

import copy

import torch

import multinet
from multinet.graph.axes import kept_positions
from multinet.graph.edits import GroupedInput, SliceTensor
from multinet.graph.op_tables import weight_output_dim
from multinet.graph.surgery import _local_keep, _resolve


def randomize_norm_stats(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BN/LN affine and running stats so that norms are not identities."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        for name in ("weight", "bias", "running_mean"):
            t = getattr(m, name, None)
            if isinstance(m, (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm)) and t is not None:
                t.data = torch.randn(t.shape, generator=gen) * 0.5 + (1.0 if name == "weight" else 0.0)
        if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.running_var is not None:
            m.running_var.data = torch.rand(m.running_var.shape, generator=gen) + 0.5
    return model.eval()


def _consumer_weight_attrs(graph) -> set[str]:
    out = set()
    for use in graph.analysis.layers.values():
        if use.in_segments is not None:
            out.add(f"{use.name}.weight" if not use.name.endswith("weight") else use.name)
    return out


def _input_dim(gm, attr: str) -> int:
    """The dim of a consumer's weight that holds its inputs: 0 for a transposed conv ((in, out, *kernel))."""
    owner = _resolve(gm, attr)[0]
    return 1 - weight_output_dim(owner) if attr.endswith("weight") and owner is not gm else 1


def zero_channel(graph, gid: int, channel, side: str) -> torch.fx.GraphModule:
    """A copy of the traced model with one channel zeroed on the producer side or the consumer side.

    Producer side: every tensor sliced with the channel except consumer inputs (producer
    filters and biases, BatchNorm affine, layer scales) is zeroed at the channel.
    Consumer side: the columns that read the channel are zeroed in every consumer.
    """
    group = graph.group(gid)
    removed_set = {channel} if isinstance(channel, int) else set(channel)
    keep_local = _local_keep(graph, {gid: [c for c in range(group.size) if c not in removed_set]})
    gm = copy.deepcopy(graph.module)
    consumers = _consumer_weight_attrs(graph)
    for edit in graph.analysis.edits:
        if isinstance(edit, GroupedInput) and side == "consumer":
            _zero_grouped_input(gm, edit, keep_local)
        if not isinstance(edit, SliceTensor):
            continue
        is_consumer = edit.attr in consumers and edit.dim == _input_dim(gm, edit.attr)
        if is_consumer != (side == "consumer") or edit.attr.endswith(("running_mean", "running_var")):
            continue
        owner, attr = _resolve(gm, edit.attr)
        tensor = getattr(owner, attr)
        kept = set(kept_positions(edit.segments, keep_local).tolist())
        removed = [p for p in range(tensor.shape[edit.dim]) if p not in kept]
        if removed:
            with torch.no_grad():
                tensor.index_fill_(edit.dim, torch.tensor(removed), 0.0)
    return gm


def _zero_grouped_input(gm, edit: GroupedInput, keep_local) -> None:
    """Zero, in output block g of a grouped conv's weight, the columns of input block g's removed channels."""
    owner, attr = _resolve(gm, edit.attr)
    tensor = getattr(owner, attr)
    kept = set(kept_positions(edit.segments, keep_local).tolist())
    per, rows = tensor.shape[1], tensor.shape[0] // edit.groups
    with torch.no_grad():
        for p in range(per * edit.groups):
            if p not in kept:
                g = p // per
                tensor[g * rows:(g + 1) * rows, p - g * per] = 0.0


def removal_unit(group, channel: int) -> list[int]:
    """The smallest removable set holding ``channel``: one channel, or one per conv group of a grouped conv."""
    if not group.balanced:
        return [channel]
    blocks = group.balanced[0]
    where = next((i for i, b in enumerate(blocks) if channel in b.tolist()), None)
    if where is None:
        return [channel]
    pos = blocks[where].tolist().index(channel)
    out = sorted(int(b[pos % len(b)]) for b in blocks)
    return out if group.is_balanced([c for c in range(group.size) if c not in out]) else []


def random_keep(group, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """About ``fraction`` of the channels, at random, as many from every conv group (grouped convs)."""
    if not group.balanced:
        n_keep = max(1, round(group.size * fraction))
        return torch.randperm(group.size, generator=gen)[:n_keep].sort().values
    blocks = group.balanced[0]
    per = max(1, round(len(blocks[0]) * fraction))
    inside = torch.cat(list(blocks))
    rest = torch.tensor([c for c in range(group.size) if c not in set(inside.tolist())], dtype=torch.long)
    keep = torch.cat([b[torch.randperm(len(b), generator=gen)[:per]] for b in blocks] + [rest]).sort().values
    return keep if group.is_balanced(keep) else torch.arange(group.size)


def check_model(model: torch.nn.Module, x: torch.Tensor, seed: int = 0, max_channels: int = 2,
                producer_side: bool = True) -> multinet.ChannelGraph:
    """producer_side=False for models where a zeroed channel does not stay zero (e.g. ``y + 1``)."""
    graph = multinet.trace(model, x)
    with torch.no_grad():
        reference = graph.module(x)
        # (a) keeping every channel of every prunable group reproduces the outputs exactly
        full = multinet.prune(graph, {g.id: list(range(g.size)) for g in graph.prunable_groups})
        assert all(torch.equal(a, b) for a, b in zip(_leaves(full(x)), _leaves(reference)))
        gen = torch.Generator().manual_seed(seed)
        # (b) a zeroed channel, pruned, leaves the outputs unchanged
        for g in graph.prunable_groups:
            if not g.exact or g.size < 2:
                continue
            for channel in torch.randperm(g.size, generator=gen)[:max_channels].tolist():
                removed = removal_unit(g, channel)
                if not removed or len(removed) == g.size:
                    continue
                keep = {g.id: [c for c in range(g.size) if c not in removed]}
                pruned = multinet.prune(graph, keep)
                for side in ("consumer", "producer") if producer_side else ("consumer",):
                    zeroed = zero_channel(graph, g.id, removed, side)
                    torch.testing.assert_close(_leaves(pruned(x)), _leaves(zeroed(x)), rtol=1e-4, atol=1e-5,
                                               msg=lambda m: f"group {g.id} channel {channel} ({side}): {m}")
        # (c) random 30 % of every prunable group: runs, same output shape, fewer FLOPs
        keep = {g.id: random_keep(g, 0.7, gen) for g in graph.prunable_groups}
        pruned = multinet.prune(graph, keep)
        out = pruned(x)
        assert _shapes(out) == _shapes(reference)
        if graph.prunable_groups:
            assert multinet.count(pruned, (x,)).flops < multinet.count(graph.module).flops
    return graph


def _leaves(out) -> list[torch.Tensor]:
    return torch.utils._pytree.tree_leaves(out)


def _shapes(out):
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, dict):
        return {k: _shapes(v) for k, v in out.items()}
    return tuple(_shapes(o) for o in out)
