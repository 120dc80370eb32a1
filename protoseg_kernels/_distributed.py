"""All-reduces of the small [C, K] buffers between kernel passes (SPEC §3.4, §3.5).

With a process group, every rank ends up with the sums over all ranks' pixels,
so the result equals a single process run on the concatenated pixels. Without
one, the reductions are the identity and each process works on its own pixels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


class Reducer:
    """Sum/max across the ranks of ``group``; the identity when ``group`` is None."""

    def __init__(self, group: Any | None = None) -> None:
        if group is not None and not dist.is_initialized():
            raise RuntimeError(
                "process_group was given but torch.distributed is not initialised; "
                "call torch.distributed.init_process_group first"
            )
        self.group = group

    def _all_reduce(self, t: Tensor, op: Any) -> Tensor:
        if self.group is None:
            return t
        t = t.contiguous()
        dist.all_reduce(t, op=op, group=self.group)
        return t

    def sum(self, t: Tensor) -> Tensor:
        return self._all_reduce(t, dist.ReduceOp.SUM)

    def max(self, t: Tensor) -> Tensor:
        return self._all_reduce(t, dist.ReduceOp.MAX)


LOCAL = Reducer(None)


def merge_logsumexp(reducer: Reducer, m: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """Combine per-rank (max, Σ exp(· − max)) pairs into the global pair.

    Each rank rescales its sums to the global max before the sum all-reduce;
    entries with no pixels (s = 0, m = -inf) stay 0.
    """
    m_all = reducer.max(m.clone())
    s_all = reducer.sum(torch.where(s > 0, s * torch.exp(m - m_all), 0.0))
    return m_all, s_all
