"""The operands of the similarity engine, as the kernels receive them.

Every similarity kernel works on S = x̂·Ŵᵀ between rows x [N, D] and columns W [M, D]
(notation of docs/spec.md §2): prototypes [C, K, D] are the columns M = C·K grouped by class (group
size K), a memory bank is M labelled vectors (group size 1, docs/spec.md §10). Each side
reaches a kernel as one tuple argument (a ``NamedTuple``, whose fields the kernels
read by name: ``cols.ptr``, ``cols.group``); an absent optional field is ``None``,
which Triton compiles away.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ._host import rows_view


class RowArgs(NamedTuple):
    """The rows x [N, D] of a similarity, as a kernel argument."""

    ptr: Tensor
    n: int
    d: int
    stride_n: int
    stride_d: int


class ColumnArgs(NamedTuple):
    """The columns W [M, D] of a similarity, as a kernel argument (see :class:`Columns`):
    M = groups·group columns (``_tiles.num_columns``; a kernel never divides by the group)."""

    ptr: Tensor
    d: int
    stride_m: int
    stride_d: int
    labels: Tensor | None
    groups: int
    group: int


def row_args(x: Tensor) -> RowArgs:
    return RowArgs(x, x.shape[0], x.shape[1], x.stride(0), x.stride(1))


@dataclass(frozen=True)
class Columns:
    """Columns W [M, D] of a similarity, with optional per-column int64 labels.

    ``group``: consecutive columns g·group … g·group + group − 1 form group g (the K
    prototypes of class g); the class layout of the column tiles (``_tiles.column_tile``)
    keeps a group's columns together for per-group reductions. Without ``labels`` the
    label of a column is its group.
    """

    values: Tensor
    labels: Tensor | None = None
    group: int = 1

    def __post_init__(self) -> None:
        m = self.values.shape[0]
        if self.values.dim() != 2:
            raise ValueError(f"Columns: values must be [M, D], got shape {tuple(self.values.shape)}")
        if self.group < 1 or m % self.group:
            raise ValueError(f"Columns: group must divide M = {m}, got {self.group}")
        labels = self.labels
        if labels is not None and (labels.shape != (m,) or labels.dtype != torch.int64 or not labels.is_contiguous()):
            raise ValueError(f"Columns: labels must be a contiguous int64 [M] = [{m}] tensor, "
                             f"got {labels.dtype} of shape {tuple(labels.shape)}")

    @classmethod
    def of_prototypes(cls, prototypes: Tensor) -> Columns:
        """Prototypes [C, K, D] as C groups of K columns."""
        return cls(rows_view(prototypes), group=prototypes.shape[1])

    def check_rows(self, x: Tensor) -> None:
        """x [N, D] must have the columns' D."""
        if x.dim() != 2 or x.shape[1] != self.values.shape[1]:
            raise ValueError(f"similarity: x must be [N, D] with the columns' D = {self.values.shape[1]}, "
                             f"got shape {tuple(x.shape)}")

    @property
    def m(self) -> int:
        return self.values.shape[0]

    @property
    def num_groups(self) -> int:
        return self.m // self.group

    def kernel_arg(self) -> ColumnArgs:
        w = self.values
        return ColumnArgs(w, w.shape[1], w.stride(0), w.stride(1), self.labels, self.num_groups, self.group)
