"""Greedy allocation: repeatedly take the move with the least added error per unit of budget saved.

A move advances one group along its allowed removal counts (REAP's order, so a count says which
channels go). Savings come from the exact cost model and are recomputed at every step: removing
a channel of one group saves less once its neighbours have shrunk (a conv's cost is the product
of its input and output widths). ``lookahead`` lets a group bid with several moves at once, so a
group whose error curve is flat after a bump is not starved.

The last move can save far more than the budget still needed: the last channel of a group that a
whole branch depends on takes the branch with it (a MultiNet member whose layers another member now
stands in for, a layer made dead by a skip link). ``refill`` then gives that slack back, moving
groups back towards fewer removals where it lowers the error most per unit of cost, as long as the
budget holds.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass


@dataclass
class Step:
    group: int
    count: int  # channels the group has lost after this step
    cost: float  # model cost after the step (the budget's metric)
    error: float  # error after the step, as the scheduler sees it


ErrorsOf = Callable[[Mapping[int, int], Sequence[tuple[int, int]]], Sequence[float]]


class RememberedSavings:
    """``saving(counts, g, k)`` remembered per move while the groups it depends on stay where they are.

    A move's saving reads only the cost terms of its own group, so once group m has moved only the groups
    sharing a term with it (``neighbours(m)``, m among them) can save differently; unless a group dies or
    revives (loses its last channel, or gets one back), which dead-code elimination carries anywhere in
    the graph: then nothing is kept. A move that kills or revives its own group is never remembered.
    Exact (the same values, not an estimate), and the allocators ask again for every group's moves at
    every step: ResNet-50's 37 groups asked 0.4 M times in one search."""

    def __init__(self, saving: Callable[[Mapping[int, int], int, int], float],
                 neighbours: Callable[[int], Sequence[int]], sizes: Mapping[int, int]):
        self.saving, self.neighbours, self.sizes = saving, neighbours, sizes
        self.known: dict[tuple[int, int], float] = {}

    def __call__(self, counts: Mapping[int, int], g: int, k: int) -> float:
        if k >= self.sizes[g] or counts.get(g, 0) >= self.sizes[g]:
            return self.saving(counts, g, k)
        value = self.known.get((g, k))
        if value is None:
            value = self.known[(g, k)] = self.saving(counts, g, k)
        return value

    def moved(self, g: int, before: int, after: int) -> None:
        """Group ``g`` went from ``before`` to ``after`` removals: forget what that can change."""
        if max(before, after) >= self.sizes[g]:
            self.known.clear()
            return
        near = set(self.neighbours(g))
        self.known = {move: v for move, v in self.known.items() if move[0] not in near}


def remembering(saving):
    """``saving`` as RememberedSavings where it says what it depends on (``neighbours`` and ``sizes``
    attributes: the scheduler's cost model does), else as it is. One per allocator run: what it remembers
    holds for that run's counts only."""
    neighbours, sizes = getattr(saving, "neighbours", None), getattr(saving, "sizes", None)
    return RememberedSavings(saving, neighbours, sizes) if neighbours is not None and sizes is not None else saving


def _moved(saving, g: int, before: int, after: int) -> None:
    if isinstance(saving, RememberedSavings):
        saving.moved(g, before, after)


def greedy(allowed: Mapping[int, Sequence[int]], saving: Callable[[Mapping[int, int], int, int], float],
           start_cost: float, target: float, errors_of: ErrorsOf, lookahead: Mapping[int, int],
           every_step: bool, progress: Callable[[float], None] | None = None,
           start: Mapping[int, int] | None = None, start_error: float = 0.0) -> list[Step]:
    """Moves from ``start`` (default: nothing removed; its cost ``start_cost`` and error ``start_error``)
    until the cost is at most ``target`` (or nothing is left to remove).

    ``saving(counts, g, k)``: cost saved by moving group g to k removals. ``errors_of(counts,
    [(g, k), ...])``: the error of each candidate state. ``lookahead[g]``: how many allowed counts
    ahead a move may jump; with ``every_step`` each intermediate count is a candidate too, else
    only the furthest one (or the first that meets the target).
    """
    counts = {g: (start or {}).get(g, 0) for g in allowed}
    position = {g: list(allowed[g]).index(counts[g]) for g in allowed}
    cost, error = start_cost, start_error
    saving = remembering(saving)
    path: list[Step] = []
    while cost > target:
        candidates: list[tuple[int, int, float]] = []  # (group, index into allowed, cost after)
        for g, options in allowed.items():
            last = min(position[g] + lookahead[g], len(options) - 1)
            for j in range(position[g] + 1, last + 1):
                after = cost - saving(counts, g, options[j])
                meets = after <= target
                if every_step or j == last or meets:
                    candidates.append((g, j, after))
                if meets:
                    break
        candidates = [c for c in candidates if c[2] < cost]
        if not candidates:
            break
        errors = errors_of(counts, [(g, allowed[g][j]) for g, j, _ in candidates])
        best = min(range(len(candidates)),
                   key=lambda i: ((errors[i] - error) / (cost - candidates[i][2]), candidates[i][2]))
        g, j, cost = candidates[best]
        error = errors[best]
        _moved(saving, g, counts[g], allowed[g][j])
        position[g], counts[g] = j, allowed[g][j]
        path.append(Step(g, counts[g], cost, error))
        if progress is not None:
            progress(cost)
    return path


def refill(allowed: Mapping[int, Sequence[int]], saving: Callable[[Mapping[int, int], int, int], float],
           cost: float, target: float, errors_of: ErrorsOf, lookahead: Mapping[int, int],
           counts: Mapping[int, int], error: float) -> list[Step]:
    """Moves back (channels kept again) from ``counts`` at ``cost`` and ``error`` while the cost stays
    at most ``target``: each step takes the move that lowers the error most per unit of cost added
    (a group goes back up to ``lookahead[g]`` allowed counts), until no move that fits lowers it.

    Only an undershoot is refilled, so a plan that lands at its target (the usual case) is unchanged;
    every step lowers the error, so it ends."""
    counts = {g: counts.get(g, 0) for g in allowed}
    position = {g: list(allowed[g]).index(counts[g]) for g in allowed}
    saving = remembering(saving)
    path: list[Step] = []
    while cost <= target:
        candidates: list[tuple[int, int, float]] = []  # (group, index into allowed, cost after)
        for g, options in allowed.items():
            for j in range(position[g] - 1, max(position[g] - lookahead[g], 0) - 1, -1):
                after = cost - saving(counts, g, options[j])
                if after <= target:
                    candidates.append((g, j, after))
        if not candidates:
            break
        errors = errors_of(counts, [(g, allowed[g][j]) for g, j, _ in candidates])
        better = [i for i in range(len(candidates)) if errors[i] < error]
        if not better:
            break
        best = max(better, key=lambda i: ((error - errors[i]) / max(candidates[i][2] - cost, 1e-12), -candidates[i][2]))
        g, j, cost = candidates[best]
        error = errors[best]
        _moved(saving, g, counts[g], allowed[g][j])
        position[g], counts[g] = j, allowed[g][j]
        path.append(Step(g, counts[g], cost, error))
    return path


def counts_at(path: Sequence[Step], steps: int) -> dict[int, int]:
    """Per-group removal counts after the first ``steps`` moves of a path."""
    counts: dict[int, int] = {}
    for step in path[:steps]:
        counts[step.group] = step.count
    return counts
