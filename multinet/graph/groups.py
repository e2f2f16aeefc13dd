"""Channel groups: the sets of channels that must be removed together, and who touches them."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .analysis import AnalysisResult, ChannelAnalysis
from .axes import Segment, slice_segments
from .edits import Balanced, SliceBounds, SplitSizes

MAX_PASSES = 6  # analysis passes: each may make producer channels coarser (heads, then k/v head blocks) or cut
# a packed q/k/v projection into parts


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
    conv_groups: int = 1
    """A grouped conv consumer (groups=G): its output block g reads only the channels at input
    positions of block g, so its least-squares problem is block diagonal, one block per conv group."""

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
    balanced: list[list[torch.Tensor]] = field(default_factory=list, repr=False)
    """Grouped convs: each entry lists the group channels of every conv group (block); a keep
    set must hold equally many channels of every block of an entry."""
    unit: int = 1
    """Features per channel at the producers (head_dim for an attention head group)."""
    attention_heads: bool = False
    """Attention ties these channels (q to k to v, head by head): a channel is an attention head."""

    @property
    def consumer_names(self) -> list[str]:
        return list(dict.fromkeys(s.consumer for s in self.consumers))

    @property
    def grouped_conv(self) -> bool:
        """A grouped convolution writes or reads these channels: surgery keeps equal counts per conv
        group, and compress and the scheduler remove the same number from every conv group, a grouped
        consumer re-solved per conv group (see pipeline/grouped_conv.py)."""
        return bool(self.balanced) or any(s.conv_groups > 1 for s in self.consumers)

    def is_balanced(self, keep) -> bool:
        """Whether ``keep`` holds equally many channels of every conv group of every grouped conv."""
        kept = torch.as_tensor(keep, dtype=torch.long).reshape(-1)
        return all(len({int(torch.isin(block, kept).sum()) for block in blocks}) == 1 for blocks in self.balanced)


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


def analyse(gm: fx.GraphModule) -> AnalysisResult:
    """Run the channel analysis until no pass asks for coarser producer channels (heads) or for a
    producer cut into parts (packed q/k/v)."""
    units: dict[str, int] = {}
    parts: dict[str, frozenset[int]] = {}
    for _ in range(MAX_PASSES):
        result = ChannelAnalysis(gm, units, parts).run()
        new = {k: v for k, v in result.unit_requests.items() if units.get(k) != v}
        new_parts = {k: v for k, v in result.part_requests.items() if parts.get(k) != v}
        for owner in new_parts:  # cut first: the next pass asks each part for its own unit
            if owner in new and owner not in parts:
                del new[owner]
        if not new and not new_parts:
            break
        units.update(new)
        parts.update(new_parts)
    return result


def build_groups(gm: fx.GraphModule) -> tuple[list[ChannelGroup], AnalysisResult]:
    result = analyse(gm)
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
            producers=list(dict.fromkeys(sp.owner for sp in spaces if sp.kind == "producer")),
            passthrough=sorted({p for s, _ in members for p in result.passthrough.get(s, ())}),
            consumers=[], members=members,
        ))
    for use in result.layers.values():  # a producer cut into parts must stay one group
        gids = {space_to_group[s.space][0] for s in use.out_segments or () if s.space in space_to_group}
        if len(gids) > 1:
            _refuse(groups, gids, f"the parts of `{use.name}`'s output (a packed projection) are not one group")
    for edit in result.edits:
        _add_pieces(edit, groups, space_to_group)
        if isinstance(edit, Balanced):
            _add_balanced(edit, groups, space_to_group)
    for group in groups:
        group.unit = _unit(result, group)
        group.attention_heads = any(s in result.head_spaces for s, _ in group.members)
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
                columns_per_position=use.columns_per_position, conv_groups=use.conv_groups,
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


def _add_balanced(edit: Balanced, groups: list[ChannelGroup], space_to_group: dict[int, tuple[int, int]]) -> None:
    """A grouped conv's blocks as channel sets of one group; blocks that cut a channel, or that
    span several groups, make the groups unprunable (one group's keep set could not balance them)."""
    width = sum(s.width for s in edit.segments)
    per = width // edit.parts
    blocks: list[torch.Tensor] = []
    gids: set[int] = set()
    for part in range(edit.parts):
        chans = []
        for seg in slice_segments(edit.segments, part * per, (part + 1) * per) or ():
            if seg.space in space_to_group:
                gid, off = space_to_group[seg.space]
                gids.add(gid)
                chans.append(torch.arange(seg.start, seg.start + seg.length) + off)
        if slice_segments(edit.segments, part * per, (part + 1) * per) is None:
            gids |= {space_to_group[s.space][0] for s in edit.segments if s.space in space_to_group}
            return _refuse(groups, gids, f"a channel straddles two conv groups of `{edit.owner}`")
        blocks.append(torch.cat(chans) if chans else torch.zeros(0, dtype=torch.long))
    if len(gids) != 1:
        return _refuse(groups, gids, f"the conv groups of `{edit.owner}` span several channel groups")
    groups[gids.pop()].balanced.append(blocks)


def _refuse(groups: list[ChannelGroup], gids: set[int], why: str) -> None:
    for gid in gids:
        groups[gid].prunable = False
        if why not in groups[gid].reasons:
            groups[gid].reasons.append(why)


def _unit(result: AnalysisResult, group: ChannelGroup) -> int:
    """Features per channel of the group's producers (1 unless channels are attention heads)."""
    return max((result.space_units.get(s, 1) for s, _ in group.members), default=1)
