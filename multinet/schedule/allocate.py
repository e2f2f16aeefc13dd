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
        position[g], counts[g] = j, allowed[g][j]
        path.append(Step(g, counts[g], cost, error))
    return path


def counts_at(path: Sequence[Step], steps: int) -> dict[int, int]:
    """Per-group removal counts after the first ``steps`` moves of a path."""
    counts: dict[int, int] = {}
    for step in path[:steps]:
        counts[step.group] = step.count
    return counts
