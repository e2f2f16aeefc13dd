"""One-shot compression: every group solved on statistics of one pass of the original model.

The cheapest mode: one forward pass (the Grams of every consumer of every requested group), then
each group's selection from its own problems, as if the other groups were whole, and finally every
consumer re-solved once by least squares without all of its removed columns. Errors of earlier
groups are not corrected downstream, which is what the sequential mode adds (see the benchmark for
the accuracy this costs).
"""
from __future__ import annotations

import time
from collections.abc import Mapping

import torch.fx as fx

from ..graph import ChannelGraph, prune, trace
from ..schedule.oneshot import MaskedModel, one_shot_stats
from .group_problems import solve_group


def compress_oneshot(original: ChannelGraph, requests: Mapping[int, int | list[int]], method: str, data, example, *,
                     batch_size: int, max_positions: int | None, damp: float, device: str, seed: int,
                     executor=None, masked: MaskedModel | None = None, errors: Mapping[int, float] | None = None
                     ) -> tuple[fx.GraphModule, list[tuple[int, list[int], float, float]]]:
    """The compressed model and, per group, (group id, removed channels, error at its consumers, seconds).

    ``masked``: a masked evaluator already holding the one-shot statistics (the scheduler's), so a
    budget costs no further pass; ``errors`` then gives each group's error from its curve."""
    groups = [g for g in sorted(requests) if requests[g]]
    stats = None
    if masked is None:
        stats = one_shot_stats(original, groups, data, batch_size, max_positions, device, seed, executor)
        masked = MaskedModel(original, stats, groups, [], damp, device)
    removed: dict[int, list[int]] = {}
    reports = []
    for gid in groups:
        start = time.perf_counter()
        request = requests[gid]
        if isinstance(request, int) or stats is not None:
            n = request if isinstance(request, int) else len(request)
            preset = None if isinstance(request, int) else list(request)
            solution = solve_group(original, original, original.group(gid), n, method, stats, damp, device,
                                   seed + gid, {}, preset)
            removed[gid], error = sorted(solution.removed), solution.error
            masked.adopt_inverses(solution.problems, [name for name, *_ in solution.layout])
        else:
            removed[gid], error = sorted(request), (errors or {}).get(gid, float("nan"))
        reports.append((gid, removed[gid], error, time.perf_counter() - start))
    if method in ("magnitude", "random"):
        masked.set_zeroed(removed)
    else:
        masked.set_removed(removed)  # every consumer re-solved once, without all of its removed columns
    keep = {g: sorted(set(range(original.group(g).size)) - set(r)) for g, r in removed.items()}
    work = masked.gm.cpu()
    return prune(trace(work, example), keep), reports

