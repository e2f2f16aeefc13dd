"""Whether a group's least-squares statistics fit in memory, checked before any of them is computed.

A consumer reading m input columns holds an (m + 1)^2 float64 Gram, and its solve a damped copy, a
symmetrising temporary, the Cholesky factor, the inverse and the greedy's factors. Measured on one
9,217-column consumer (16 images of 12 x 12, 30 % removed): the run peaked at 5.1 Grams' worth above its
start in sequential and one-shot mode, 7.3 under a budget, whose masked evaluator keeps every group's Gram
and inverse while a group is solved (``SOLVE_COPIES``, ``HELD_COPIES``). Most layers are far below a
gigabyte, but a dilated 3x3 conv reading 2,048 channels (DeepLabV3's ASPP) has 18,432 columns, 2.7 GB per
copy, and three of them read one group: the run would be killed for memory after minutes of work. Such
groups are left whole with a warning that says why, before the run starts.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable

from ..calib.frontier import AUTO_MEMORY_SHARE
from ..graph import ChannelGraph
from ..runtime.devices import available_memory
from .consumer_weights import consumer_weight, output_major, transposed

SOLVE_COPIES = 5.5  # Grams' worth a group's solve peaks at (measured 5.1)
HELD_COPIES = 2  # kept per group while others are solved, together (a schedule's Gram and inverse)


def consumer_columns(graph: ChannelGraph, name: str) -> int:
    """The input columns consumer ``name``'s statistics have (a grouped conv's over all of its conv groups)."""
    weight = output_major(consumer_weight(graph.module, name)[0], transposed(graph.module, name))
    return weight[0].numel() * graph.analysis.layers[name].conv_groups


def group_bytes(graph: ChannelGraph, group_id: int) -> int:
    """Bytes of one group's consumers' Grams (one copy each)."""
    columns = [consumer_columns(graph, name) for name in graph.group(group_id).consumer_names]
    return sum(8 * (m + 1) ** 2 for m in columns)


def peak_bytes(sizes: list[int], together: bool) -> float:
    """The most memory solving groups of these Gram sizes takes: one at a time, the largest solve; together,
    every group's held copies and, beside them, the largest solve."""
    if not sizes:
        return 0.0
    return max(sizes) * SOLVE_COPIES + (HELD_COPIES * (sum(sizes) - max(sizes)) if together else 0)


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
    kept = {g for g in ids if peak_bytes([sizes[g]], False) <= limit}
    if together:
        for g in sorted(kept, key=lambda g: (-sizes[g], g)):
            if peak_bytes([sizes[k] for k in kept], True) <= limit:
                break
            kept.discard(g)
    dropped = sorted(set(ids) - kept, key=lambda g: -sizes[g])
    if dropped:
        lines = []
        for g in dropped:
            widest = max(graph.group(g).consumer_names, key=lambda n: consumer_columns(graph, n))
            lines.append(f"group {g} ({', '.join(graph.group(g).producers)[:60]}): "
                         f"{peak_bytes([sizes[g]], False) / 2 ** 30:.1f} GB, "
                         f"`{widest}` reads {consumer_columns(graph, widest):,} columns")
        warnings.warn(f"{len(dropped)} group(s) stay whole: their least-squares statistics would need more than "
                      f"the {limit / 2 ** 30:.1f} GB this run can give them{' together' if together else ''}, "
                      f"beside what the frontier may keep (a smaller frontier_memory leaves them more) "
                      f"(" + "; ".join(lines) + ")", stacklevel=3)
    return kept
