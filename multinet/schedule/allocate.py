"""Greedy allocation: repeatedly take the move with the least added error per unit of budget saved.

A move advances one group along its allowed removal counts (REAP's order, so a count says which
channels go). Savings come from the exact cost model and are recomputed at every step: removing
a channel of one group saves less once its neighbours have shrunk (a conv's cost is the product
of its input and output widths). ``lookahead`` lets a group bid with several moves at once, so a
group whose error curve is flat after a bump is not starved.
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


def counts_at(path: Sequence[Step], steps: int) -> dict[int, int]:
    """Per-group removal counts after the first ``steps`` moves of a path."""
    counts: dict[int, int] = {}
    for step in path[:steps]:
        counts[step.group] = step.count
    return counts
