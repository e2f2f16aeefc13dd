"""Baseline channel selections: by producer filter magnitude, or at random."""
from __future__ import annotations

import torch


def magnitude_scores(group, producer_weights: dict[str, torch.Tensor], space_sizes: dict[int, int],
                     space_owner: dict[int, str]) -> torch.Tensor:
    """L1 norm of each channel's producer filters (all rows of a head), summed over the group's producers."""
    scores = torch.zeros(group.size, dtype=torch.float64)
    for space, offset in group.members:
        weight = producer_weights.get(space_owner[space])
        if weight is not None:
            rows = weight.detach().abs().flatten(1).sum(1).double().cpu()
            # an attention head is a block of head_dim consecutive producer rows
            scores[offset : offset + space_sizes[space]] += rows.reshape(space_sizes[space], -1).sum(1)
    return scores


def in_order(order: torch.Tensor, n_remove: int, pieces=()) -> list[int]:
    """The first ``n_remove`` channels of ``order``, skipping any that would empty a split piece."""
    alive = torch.ones(len(order), dtype=torch.bool)
    removed = []
    for c in order.tolist():
        if len(removed) == n_remove:
            break
        if any(alive[p].sum() == 1 and alive[c] and c in p for p in pieces):
            continue
        alive[c] = False
        removed.append(c)
    return removed


def lowest(scores: torch.Tensor, n_remove: int, pieces=()) -> list[int]:
    return in_order(torch.argsort(scores, stable=True), n_remove, pieces)


def random_channels(size: int, n_remove: int, seed: int, pieces=()) -> list[int]:
    return in_order(torch.randperm(size, generator=torch.Generator().manual_seed(seed)), n_remove, pieces)
