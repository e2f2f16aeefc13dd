"""Channel groups: the sets of channels that must be removed together, and who touches them."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .analysis import AnalysisResult, ChannelAnalysis
from .axes import Segment, slice_segments
from .edits import SliceBounds, SplitSizes


@dataclass
class ConsumerSlot:
    """Where a group's channels enter one consumer's input.

    Channel ``channels[i]`` of the group occupies input positions ``positions[i] ..
    positions[i]+block-1`` of the consumer (in_channels of a conv, in_features of a linear); each
    position spans ``columns_per_position`` im2col columns (kh*kw for a conv, 1 for a linear).
    """

    consumer: str
    kind: str
    channels: torch.Tensor
    positions: torch.Tensor
    block: int
    columns_per_position: int

    def column_blocks(self) -> torch.Tensor:
        """Row i: the columns of the consumer's unfolded input (im2col for a conv, the features
        for a linear; weight.flatten(1) has the same column order) that carry ``channels[i]``."""
        width = self.block * self.columns_per_position
        return self.positions[:, None] * self.columns_per_position + torch.arange(width)[None, :]


@dataclass
class ChannelGroup:
    id: int
    size: int
    prunable: bool
    reasons: list[str]
    exact: bool  # False: pruning changes the values of kept channels (e.g. LayerNorm statistics)
    notes: list[str]
    producers: list[str]
    passthrough: list[str]
    consumers: list[ConsumerSlot]
    members: list[tuple[int, int]] = field(repr=False)  # (space, offset on the group index)
    pieces: list[torch.Tensor] = field(default_factory=list, repr=False)
    """Channel sets cut out by split/chunk/slicing: each must keep at least one channel."""

    @property
    def consumer_names(self) -> list[str]:
        return list(dict.fromkeys(s.consumer for s in self.consumers))


@dataclass
class ChannelGraph:
    """A traced model, its shapes, and its channel groups."""

    module: fx.GraphModule
    example_inputs: tuple
    groups: list[ChannelGroup]
    analysis: AnalysisResult = field(repr=False)

    def group(self, gid: int) -> ChannelGroup:
        try:
            return self.groups[gid]
        except (IndexError, TypeError):
            raise KeyError(f"no channel group {gid!r}; groups are 0..{len(self.groups) - 1}") from None

    @property
    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def group_of_layer(self, name: str) -> ChannelGroup | None:
        """The group holding a Conv/Linear's output channels."""
        return next((g for g in self.groups if name in g.producers), None)


def build_groups(gm: fx.GraphModule) -> tuple[list[ChannelGroup], AnalysisResult]:
    result = ChannelAnalysis(gm).run()
    table = result.table
    roots = table.members()
    ordered = sorted(roots.values(), key=lambda members: min(s for s, _ in members))
    groups: list[ChannelGroup] = []
    space_to_group: dict[int, tuple[int, int]] = {}
    for members in ordered:
        spaces = [table.spaces[s] for s, _ in members]
        if all(sp.kind == "untracked" for sp in spaces):
            continue
        low = min(off for _, off in members)
        members = [(s, off - low) for s, off in members]
        size = max(off + table.spaces[s].size for s, off in members)
        gid = len(groups)
        for s, off in members:
            space_to_group[s] = (gid, off)
        reasons = list(dict.fromkeys(r for sp in spaces for r in sp.reasons))
        notes = list(dict.fromkeys(n for s, _ in members for n in result.inexact.get(s, [])))
        groups.append(ChannelGroup(
            id=gid, size=size, prunable=not reasons, reasons=reasons, exact=not notes, notes=notes,
            producers=[sp.owner for sp in spaces if sp.kind == "producer"],
            passthrough=sorted({p for s, _ in members for p in result.passthrough.get(s, ())}),
            consumers=[], members=members,
        ))
    for edit in result.edits:
        _add_pieces(edit, groups, space_to_group)
    for use in result.layers.values():
        if use.in_segments is None:
            continue
        for seg, pos in _with_positions(use.in_segments):
            if seg.space not in space_to_group:
                continue
            gid, off = space_to_group[seg.space]
            chans = torch.arange(seg.length)
            groups[gid].consumers.append(ConsumerSlot(
                consumer=use.name, kind=use.kind, channels=chans + seg.start + off,
                positions=pos + chans * seg.block, block=seg.block,
                columns_per_position=use.columns_per_position,
            ))
    return groups, result


def _add_pieces(edit, groups: list[ChannelGroup], space_to_group: dict[int, tuple[int, int]]) -> None:
    if isinstance(edit, SplitSizes):
        ranges = edit.ranges
    elif isinstance(edit, SliceBounds):
        ranges = ((edit.begin, edit.end),)
    else:
        return
    for lo, hi in ranges:
        per_group: dict[int, list[torch.Tensor]] = {}
        for seg in slice_segments(edit.segments, lo, hi) or ():
            if seg.space in space_to_group:
                gid, off = space_to_group[seg.space]
                per_group.setdefault(gid, []).append(torch.arange(seg.start, seg.start + seg.length) + off)
        for gid, chans in per_group.items():
            if len(per_group) == 1:  # a piece spanning several groups cannot be emptied by one of them
                groups[gid].pieces.append(torch.unique(torch.cat(chans)))


def _with_positions(segments: tuple[Segment, ...]):
    pos = 0
    for seg in segments:
        yield seg, pos
        pos += seg.width
