"""Whether a group's least-squares statistics fit in memory, checked before any of them is computed.

A consumer reading m input columns holds an (m + 1)^2 float64 Gram, and its solve a damped copy, the
inverse and the greedy's factors: about ``GRAM_COPIES`` such matrices. Most layers are far below a
gigabyte, but a dilated 3x3 conv reading 2,048 channels (DeepLabV3's ASPP) has 18,432 columns, 2.7 GB
per copy, and three of them read one group: the run would be killed for memory after minutes of work.
Such groups are left whole with a warning that says why, before the run starts.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable

from ..calib.frontier import AUTO_MEMORY_SHARE
from ..graph import ChannelGraph
from ..runtime.devices import available_memory
from .consumer_weights import consumer_weight, output_major, transposed

GRAM_COPIES = 4  # the Gram, its damped copy, its inverse and the greedy's factors, at most, at once


def consumer_columns(graph: ChannelGraph, name: str) -> int:
    """The input columns consumer ``name``'s statistics have (a grouped conv's over all of its conv groups)."""
    weight = output_major(consumer_weight(graph.module, name)[0], transposed(graph.module, name))
    return weight[0].numel() * graph.analysis.layers[name].conv_groups


def group_bytes(graph: ChannelGraph, group_id: int) -> int:
    """Bytes the statistics and solve of one group's consumers take, at most, at once."""
    columns = [consumer_columns(graph, name) for name in graph.group(group_id).consumer_names]
    return sum(8 * GRAM_COPIES * (m + 1) ** 2 for m in columns)


def statistics_limit(frontier_memory: int | str | None) -> int | None:
    """Bytes left for statistics: what is available now less what the frontier may keep (None: unknown)."""
    free = available_memory()
    if free is None:
        return None
    if frontier_memory == "auto":
        return int(free * (1 - AUTO_MEMORY_SHARE))
    return max(free - (frontier_memory or 0), 0) if isinstance(frontier_memory, int) else free


def fitting(graph: ChannelGraph, group_ids: Iterable[int], limit: int | None, together: bool) -> set[int]:
    """The groups whose statistics fit in ``limit`` bytes, each on its own (a sequential run solves one
    group at a time) or ``together`` (one pass collects every group's: a one-shot run, a schedule): then
    the largest go first. The others are named in a warning."""
    ids = list(group_ids)
    if limit is None or not ids:
        return set(ids)
    sizes = {g: group_bytes(graph, g) for g in ids}
    kept = {g for g in ids if sizes[g] <= limit}
    if together:
        for g in sorted(kept, key=lambda g: (-sizes[g], g)):
            if sum(sizes[k] for k in kept) <= limit:
                break
            kept.discard(g)
    dropped = sorted(set(ids) - kept, key=lambda g: -sizes[g])
    if dropped:
        lines = []
        for g in dropped:
            widest = max(graph.group(g).consumer_names, key=lambda n: consumer_columns(graph, n))
            lines.append(f"group {g} ({', '.join(graph.group(g).producers)[:60]}): {sizes[g] / 2 ** 30:.1f} GB, "
                         f"`{widest}` reads {consumer_columns(graph, widest):,} columns")
        warnings.warn(f"{len(dropped)} group(s) stay whole: their least-squares statistics would need more than "
                      f"the {limit / 2 ** 30:.1f} GB this run can give them{' together' if together else ''}, "
                      f"beside what the frontier may keep (a smaller frontier_memory leaves them more) "
                      f"(" + "; ".join(lines) + ")", stacklevel=3)
    return kept
