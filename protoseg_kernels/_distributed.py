"""All-reduces of the small [C, K] buffers between kernel passes (docs/spec.md §3.4, §3.5).

With a process group, every rank ends up with the sums over all ranks' pixels,
so the result equals a single process run on the concatenated pixels. Without
one, the reductions are the identity and each process works on its own pixels.

The group travels into the custom ops by name (a ``str`` in the schema, "" for
none) and is resolved inside them, so the all-reduces run inside the ops, opaque
to ``torch.compile`` (as ``torch.distributed``'s functional collectives do).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

NO_GROUP = ""


def group_name(op: str, process_group: Any | None) -> str:
    """The name under which ``process_group`` travels into a custom op."""
    if process_group is None:
        return NO_GROUP
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{op}: process_group was given but torch.distributed is not initialised; "
            "call torch.distributed.init_process_group first"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"{op}: process_group must be a torch.distributed.ProcessGroup (e.g. "
            f"torch.distributed.group.WORLD) or None, got {type(process_group).__name__}"
        )
    return process_group.group_name


class Reducer:
    """Sum/max across the ranks of the group named ``name``; the identity for ""."""

    def __init__(self, name: str = NO_GROUP) -> None:
        self.group = None
        if name != NO_GROUP:
            from torch.distributed.distributed_c10d import _resolve_process_group

            self.group = _resolve_process_group(name)

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


LOCAL = Reducer()


def merge_logsumexp(reducer: Reducer, m: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """Combine per-rank (max, Σ exp(· − max)) pairs into the global pair.

    Each rank rescales its sums to the global max before the sum all-reduce;
    entries with no pixels (s = 0, m = -inf) stay 0, and a NaN sum stays NaN.
    """
    m_all = reducer.max(m.clone())
    s_all = reducer.sum(torch.where(s == 0, 0.0, s * torch.exp(m - m_all)))
    return m_all, s_all
