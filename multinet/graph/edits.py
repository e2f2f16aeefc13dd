"""Edits that graph surgery applies once the kept channels are known.

The channel analysis records them while it walks the graph; surgery only resolves kept positions
and slices. Every edit names the segments (see axes.py) that decide which positions survive.
"""
from __future__ import annotations

from dataclasses import dataclass

from .axes import Segment


@dataclass(frozen=True)
class SliceTensor:
    """Keep positions of tensor attribute ``attr`` (dotted path) along ``dim``."""

    attr: str
    dim: int
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class SetCount:
    """Set a module's size attribute (in_channels, num_features, groups, ...) to the kept width."""

    module: str
    attr: str
    segments: tuple[Segment, ...]
    as_tuple: bool = False


@dataclass(frozen=True)
class SplitSizes:
    """torch.split/chunk along the channel axis: rewrite to explicit kept piece sizes."""

    node: str
    segments: tuple[Segment, ...]
    ranges: tuple[tuple[int, int], ...]
    dim: int


@dataclass(frozen=True)
class SliceBounds:
    """x[..., a:b, ...] on the channel axis: move a and b to the kept positions."""

    node: str
    index_pos: int  # where in the index tuple (-1: the index is the slice itself; -3: aten.slice(x, dim, a, b))
    segments: tuple[Segment, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class ShapeLiteral:
    """A literal size in view/reshape/expand/layer_norm that equals the channel axis width."""

    node: str
    arg_path: tuple[int, ...]  # position in node.args, then inside a shape tuple if any
    segments: tuple[Segment, ...]
    mul: int = 1
    div: int = 1


@dataclass(frozen=True)
class GroupedInput:
    """A grouped conv's weight (out, in/groups, k...) along dim 1: output block g keeps the kept
    input positions of input block g (every block keeps as many, see Balanced)."""

    attr: str
    groups: int
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class Balanced:
    """A rule, not an edit: the positions, cut in ``parts`` equal blocks, must keep as many
    channels in every block (a grouped conv's groups must stay equally wide)."""

    owner: str
    parts: int
    segments: tuple[Segment, ...]


ATEN_SLICE = -3  # SliceBounds.index_pos of aten.slice.Tensor(x, dim, begin, end)

Edit = SliceTensor | SetCount | SplitSizes | SliceBounds | ShapeLiteral | GroupedInput | Balanced
