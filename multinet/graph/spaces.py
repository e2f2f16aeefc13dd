"""Channel spaces and the union-find that ties them into groups.

A space is the set of channels one source creates (a Conv's out channels, a channel-wise
parameter, an untracked tensor). Residual adds, SE gating and concatenations tie channel i of one
space to channel i+d of another. Ties are kept in a union-find with offsets, so a group is a set of
spaces each placed at an offset on one shared channel index. A tie that contradicts an earlier one
(a permutation) makes the group unprunable instead of guessing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .axes import Segment, aligned_pieces


@dataclass
class Space:
    id: int
    size: int
    kind: str  # "producer" | "param" | "untracked"
    owner: str
    reasons: list[str] = field(default_factory=list)


class SpaceTable:
    def __init__(self) -> None:
        self.spaces: list[Space] = []
        self._parent: list[int] = []
        self._offset: list[int] = []  # channel i of s is channel i + offset of parent

    def new(self, size: int, kind: str, owner: str, reason: str | None = None) -> int:
        sid = len(self.spaces)
        self.spaces.append(Space(sid, size, kind, owner, [reason] if reason else []))
        self._parent.append(sid)
        self._offset.append(0)
        return sid

    def find(self, sid: int) -> tuple[int, int]:
        """Root of ``sid`` and the offset of sid's channel 0 on the root's index."""
        parent = self._parent[sid]
        if parent == sid:
            return sid, 0
        root, off = self.find(parent)
        self._parent[sid] = root
        self._offset[sid] += off
        return root, self._offset[sid]

    def mark(self, space_ids, reason: str) -> None:
        for sid in space_ids:
            if reason not in self.spaces[sid].reasons:
                self.spaces[sid].reasons.append(reason)

    def tie(self, a: Segment, b: Segment, where: str) -> None:
        """Tie channel a.start+i of a.space to channel b.start+i of b.space."""
        ra, oa = self.find(a.space)
        rb, ob = self.find(b.space)
        d = b.start - a.start
        if ra == rb:
            if oa != ob + d:
                self.mark([a.space, b.space], f"channels tied in a permuted order at {where}")
            return
        self._parent[rb] = ra
        self._offset[rb] = oa - ob - d

    def tie_segments(self, a: tuple[Segment, ...], b: tuple[Segment, ...], where: str) -> None:
        pairs = aligned_pieces(a, b)
        if pairs is None:
            spaces = {s.space for s in a} | {s.space for s in b}
            self.mark(spaces, f"channel blocks do not line up at {where}")
            return
        for pa, pb in pairs:
            self.tie(pa, pb, where)

    def members(self) -> dict[int, list[tuple[int, int]]]:
        """root -> [(space, offset on the root's index)]."""
        out: dict[int, list[tuple[int, int]]] = {}
        for sid in range(len(self.spaces)):
            root, off = self.find(sid)
            out.setdefault(root, []).append((sid, off))
        return out
