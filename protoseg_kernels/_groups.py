"""Ranking inside groups without a host synchronisation (used by ``sample_anchors`` and
``ClassMemoryBank``).

Both need, for every element, "how many elements of my group come before me in priority
order". Two stable sorts give it with fixed-size tensors only (no ``unique``, no
``nonzero``): first by priority, then by group key, so each group is a contiguous run of
the sorted order in ascending priority, ties in the original order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class RankedGroups(NamedTuple):
    """``order[r]``: the element at sorted position r; ``keys``: its group key;
    ``rank``: its position inside its group (0 for the lowest priority);
    ``starts``: True at the first position of each group."""

    order: Tensor
    keys: Tensor
    rank: Tensor
    starts: Tensor


def rank_within_groups(keys: Tensor, priority: Tensor) -> RankedGroups:
    """Sort the 1-D ``keys`` (int64, any values) by (key, priority, index)."""
    by_priority = torch.sort(priority, stable=True).indices
    by_key = torch.sort(keys[by_priority], stable=True).indices
    order = by_priority[by_key]
    sorted_keys = keys[order]
    starts = torch.ones_like(sorted_keys, dtype=torch.bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    position = torch.arange(sorted_keys.numel(), device=keys.device)
    group_start = torch.where(starts, position, 0).cummax(0).values if position.numel() else position
    return RankedGroups(order, sorted_keys, position - group_start, starts)
