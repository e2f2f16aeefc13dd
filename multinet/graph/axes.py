"""Where channels live along a tensor's channel axis.

A tracked tensor has one *channel axis*. Positions along it are described by segments, each
mapping a contiguous run of positions onto a run of channels of one *space* (the channels a
producer, a parameter or an untracked source creates). A channel may occupy several consecutive
positions (``block``): after ``flatten`` one conv channel becomes H*W features of a Linear input,
and a depthwise conv with channel multiplier k turns one channel into k.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segment:
    space: int
    start: int
    length: int
    block: int = 1

    @property
    def width(self) -> int:
        return self.length * self.block


@dataclass(frozen=True)
class Axis:
    dim: int
    segments: tuple[Segment, ...]

    @property
    def width(self) -> int:
        return sum(s.width for s in self.segments)

    def at(self, dim: int) -> "Axis":
        return Axis(dim, self.segments)

    def spaces(self) -> set[int]:
        return {s.space for s in self.segments}


def slice_segments(segments: tuple[Segment, ...], begin: int, end: int) -> tuple[Segment, ...] | None:
    """Positions [begin, end) of an axis as segments; None when a cut falls inside a block."""
    out: list[Segment] = []
    pos = 0
    for seg in segments:
        lo, hi = max(begin, pos), min(end, pos + seg.width)
        if lo < hi:
            if (lo - pos) % seg.block or (hi - pos) % seg.block:
                return None
            first = seg.start + (lo - pos) // seg.block
            out.append(Segment(seg.space, first, (hi - lo) // seg.block, seg.block))
        pos += seg.width
    return tuple(out)


def scale_blocks(segments: tuple[Segment, ...], mul: int, div: int = 1) -> tuple[Segment, ...] | None:
    """Each channel's block multiplied by mul/div; None when a block does not divide."""
    out = []
    for seg in segments:
        if (seg.block * mul) % div:
            return None
        out.append(Segment(seg.space, seg.start, seg.length, seg.block * mul // div))
    return tuple(out)


def aligned_pieces(a: tuple[Segment, ...], b: tuple[Segment, ...]) -> list[tuple[Segment, Segment]] | None:
    """Cut two equally wide axes at the union of their boundaries and pair the pieces.

    Returns None when the pieces cannot be paired channel by channel (a cut inside a block, or
    two pieces whose blocks differ).
    """
    cuts = sorted({0} | _boundaries(a) | _boundaries(b))
    pairs = []
    for lo, hi in zip(cuts, cuts[1:]):
        pa, pb = slice_segments(a, lo, hi), slice_segments(b, lo, hi)
        if pa is None or pb is None or len(pa) != 1 or len(pb) != 1 or pa[0].block != pb[0].block:
            return None
        pairs.append((pa[0], pb[0]))
    return pairs


def _boundaries(segments: tuple[Segment, ...]) -> set[int]:
    pos, out = 0, set()
    for seg in segments:
        pos += seg.width
        out.add(pos)
    return out


def kept_positions(segments: tuple[Segment, ...], keep_local: dict[int, torch.Tensor]) -> torch.Tensor:
    """Indices of the positions that survive when each space keeps ``keep_local[space]``."""
    parts = []
    pos = 0
    for seg in segments:
        kept = keep_local.get(seg.space)
        if kept is None:
            chans = torch.arange(seg.length)
        else:
            inside = kept[(kept >= seg.start) & (kept < seg.start + seg.length)]
            chans = inside - seg.start
        starts = pos + chans * seg.block
        parts.append((starts[:, None] + torch.arange(seg.block)[None, :]).reshape(-1))
        pos += seg.width
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
