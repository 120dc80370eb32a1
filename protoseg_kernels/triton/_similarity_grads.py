"""The backward GEMMs of the similarity engine (prototype_similarity, class_scores and
ppc_ppd_loss are its clients today).

Each client has dS_ij = ∂loss/∂S_ij that is cheap to compute from S_ij and a few
per-row or per-(row, group) values, but N×M in size. It is never stored:

* dx pass, one program per block of rows: for every column tile, recompute S
  (if dS needs it), form dS with the client's ``ds_fn``, and add dS·Ŵ into an fp32
  [N, D] accumulator owned by the program; then apply the normalisation backward.
* dW pass, one program per (column tile, row split): the same dS tiles, with
  dSᵀ·x̂ added into the split's partial [M, D] sum; a second kernel adds the
  partials in split order (deterministic: no atomics) and applies the
  normalisation backward.

``ds_fn`` is a ``triton.jit`` function of the client, passed as a constexpr:

    ds_fn(s, rows, row_ok, cols, tile, op, FLAGS, KS, BC) -> dS [BN, KS·BC] fp32

with the S tile (zeros when not ``needs_similarity``), the rows, the columns (a
``_columns.ColumnArgs``) and the tile (j, c, k, valid) of ``_tiles.column_tile``,
the client's tensors and scalars ``op`` (one tuple argument; ``None`` entries are
absent at compile time), its constexpr tuple ``FLAGS``, and the tile layout. dS must
be zero outside the valid rows and columns.

With fp16 inputs each dS tile is divided by its largest magnitude per row (dx) or
column (dW) before the cast to fp16 and multiplied back after the dot, so small
upstream gradients (a mean over many pixels) do not underflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._columns import Columns, row_args
from ._config import gradient_splits, gradient_tiles, row_tiles
from ._host import dot_precision, empty_rows, launch
from ._norms import inverse_norms
from ._tiles import (
    column_tile,
    load_inverse_norms,
    mma,
    num_column_tiles,
    num_columns,
    similarity_tile,
    store_normalize_backward,
    to_dtype,
)


@dataclass
class GradientSource:
    """What a client's ``ds_fn`` reads: ``args``, the tensors and scalars (one tuple
    kernel argument, any structure; ``None`` for an absent tensor), and ``flags``, a
    tuple of constexprs. ``layout`` of the column tiles: "flat", "class", or
    "whole_classes" (class layout holding every slot of a group, for per-group
    softmaxes); see ``_tiles.column_tile``."""

    ds_fn: Any
    needs_similarity: bool
    args: tuple[Any, ...] = ()
    flags: tuple[Any, ...] = ()
    layout: str = "flat"

    def constexprs(self) -> dict[str, Any]:
        return {"DS_FN": self.ds_fn, "FLAGS": self.flags, "NEEDS_S": self.needs_similarity}


@triton.jit
def _similarity_and_grad(x, rows, row_ok, inv_x, cols, tile, inv_p, op, DS_FN: tl.constexpr, FLAGS: tl.constexpr,
                         NEEDS_S: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, KS: tl.constexpr,
                         BC: tl.constexpr, PRECISION: tl.constexpr):
    """dS of one [BN, KS·BC] tile (recomputing S first when the client needs it)."""
    s = tl.zeros([BN, KS * BC], dtype=tl.float32)
    if NEEDS_S:
        s = similarity_tile(x, rows, row_ok, inv_x, cols, tile, inv_p, BN, BD, KS, BC, PRECISION)
    return DS_FN(s, rows, row_ok, cols, tile, op, FLAGS, KS, BC)


@triton.jit
def _grad_x_kernel(
    x, cols, inv_x_ptr, inv_p_ptr, acc_ptr, dx_ptr, op,
    DS_FN: tl.constexpr, FLAGS: tl.constexpr, NEEDS_S: tl.constexpr, NORMALIZE: tl.constexpr,
    SCALE_DS: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, KS: tl.constexpr, BC: tl.constexpr,
    FLAT: tl.constexpr, PRECISION: tl.constexpr,
):
    D = x.d
    rows = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)
    row_ok = rows < x.n
    inv_x = load_inverse_norms(inv_x_ptr, rows, row_ok, NORMALIZE)
    for t in range(num_column_tiles(cols, FLAT, KS, BC)):
        tile = column_tile(t, cols, FLAT, KS, BC)
        j, c, k, col_ok = tile
        inv_p = load_inverse_norms(inv_p_ptr, j, col_ok, NORMALIZE)
        ds = _similarity_and_grad(x, rows, row_ok, inv_x, cols, tile, inv_p, op, DS_FN, FLAGS, NEEDS_S,
                                  BN, BD, KS, BC, PRECISION)
        if SCALE_DS:
            row_scale = tl.max(tl.abs(ds), axis=1)
            row_scale = tl.where(row_scale > 0, row_scale, 1.0)
            ds = ds / row_scale[:, None]
        ds_op = to_dtype(ds, cols.ptr.dtype.element_ty)
        # dx̂[rows] += dS · Ŵ[cols], chunk by chunk of D, in the program's own rows of acc.
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD).to(tl.int64)
            d_ok = dd < D
            p = tl.load(cols.ptr + j[:, None] * cols.stride_m + dd[None, :] * cols.stride_d,
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            p_hat = to_dtype(p.to(tl.float32) * inv_p[:, None], cols.ptr.dtype.element_ty)
            acc_ptrs = acc_ptr + rows[:, None] * D + dd[None, :]
            ok = row_ok[:, None] & d_ok[None, :]
            prev = tl.load(acc_ptrs, mask=ok & (t > 0), other=0.0)
            if SCALE_DS:
                acc = prev + mma(ds_op, p_hat, tl.zeros([BN, BD], dtype=tl.float32), PRECISION) * row_scale[:, None]
            else:
                acc = mma(ds_op, p_hat, prev, PRECISION)
            tl.store(acc_ptrs, acc, mask=ok)
        # The next tile's loads of acc may run on other threads than these stores.
        tl.debug_barrier()
    store_normalize_backward(acc_ptr, D, x.ptr, x.stride_n, x.stride_d, dx_ptr, D, rows, row_ok, inv_x, D,
                             NORMALIZE, BN, BD)


@triton.jit
def _grad_p_kernel(
    x, cols, inv_x_ptr, inv_p_ptr, part_ptr, op, blocks_per_split,
    DS_FN: tl.constexpr, FLAGS: tl.constexpr, NEEDS_S: tl.constexpr, NORMALIZE: tl.constexpr,
    SCALE_DS: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, KS: tl.constexpr, BC: tl.constexpr,
    FLAT: tl.constexpr, PRECISION: tl.constexpr,
):
    D = x.d
    t = tl.program_id(0)
    split = tl.program_id(1)
    tile = column_tile(t, cols, FLAT, KS, BC)
    j, c, k, col_ok = tile
    inv_p = load_inverse_norms(inv_p_ptr, j, col_ok, NORMALIZE)
    part_base = part_ptr + split.to(tl.int64) * num_columns(cols).to(tl.int64) * D
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(x.n, BN))
    for block in range(first, last):
        rows = block * BN + tl.arange(0, BN).to(tl.int64)
        row_ok = rows < x.n
        inv_x = load_inverse_norms(inv_x_ptr, rows, row_ok, NORMALIZE)
        ds = _similarity_and_grad(x, rows, row_ok, inv_x, cols, tile, inv_p, op, DS_FN, FLAGS, NEEDS_S,
                                  BN, BD, KS, BC, PRECISION)
        if SCALE_DS:
            col_scale = tl.max(tl.abs(ds), axis=0)
            col_scale = tl.where(col_scale > 0, col_scale, 1.0)
            ds = ds / col_scale[None, :]
        ds_t = tl.trans(to_dtype(ds, x.ptr.dtype.element_ty))
        # dŴ[cols] += dSᵀ · x̂[rows], chunk by chunk of D, in this split's partial sum.
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD).to(tl.int64)
            d_ok = dd < D
            xv = tl.load(x.ptr + rows[:, None] * x.stride_n + dd[None, :] * x.stride_d,
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            x_hat = to_dtype(xv.to(tl.float32) * inv_x[:, None], x.ptr.dtype.element_ty)
            part_ptrs = part_base + j[:, None] * D + dd[None, :]
            ok = col_ok[:, None] & d_ok[None, :]
            prev = tl.load(part_ptrs, mask=ok & (block > first), other=0.0)
            if SCALE_DS:
                acc = prev + mma(ds_t, x_hat, tl.zeros([KS * BC, BD], dtype=tl.float32), PRECISION) * col_scale[:, None]
            else:
                acc = mma(ds_t, x_hat, prev, PRECISION)
            tl.store(part_ptrs, acc, mask=ok)
        tl.debug_barrier()


@triton.jit
def _grad_p_finish_kernel(part_ptr, splits, p_ptr, stride_pj, stride_pd, inv_p_ptr, dp_ptr, M, D,
                          NORMALIZE: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
    row_ok = rows < M
    # Sum the split partials in split order, into partial 0.
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD).to(tl.int64)
        ok = row_ok[:, None] & (dd < D)[None, :]
        first_ptrs = part_ptr + rows[:, None] * D + dd[None, :]
        total = tl.load(first_ptrs, mask=ok, other=0.0)
        split_ptrs = first_ptrs
        for _ in range(1, splits):
            split_ptrs += M.to(tl.int64) * D
            total += tl.load(split_ptrs, mask=ok, other=0.0)
        tl.store(first_ptrs, total, mask=ok)
    tl.debug_barrier()
    inv_p = load_inverse_norms(inv_p_ptr, rows, row_ok, NORMALIZE)
    store_normalize_backward(part_ptr, D, p_ptr, stride_pj, stride_pd, dp_ptr, D, rows, row_ok, inv_p, D,
                             NORMALIZE, BR, BD)


class _Problem:
    """Shapes, tiles and the kernel arguments shared by the dx and dW passes."""

    def __init__(self, x: Tensor, columns: Columns, source: GradientSource, normalize: bool) -> None:
        columns.check_rows(x)
        self.columns = columns
        self.tiles = gradient_tiles(x.device, x.dtype, columns.num_groups, columns.group, source.layout)
        self.inv_x, self.inv_p = inverse_norms(x, normalize), inverse_norms(columns.values, normalize)
        self.meta = {**source.constexprs(), "NORMALIZE": normalize, "SCALE_DS": x.dtype == torch.float16,
                     **self.tiles.constexprs(), **dot_precision(x.dtype)}
        self.operands = (row_args(x), columns.kernel_arg(), self.inv_x, self.inv_p)


def _grad_x(x: Tensor, source: GradientSource, problem: _Problem) -> Tensor:
    n, d = x.shape
    dx = torch.empty(n, d, dtype=x.dtype, device=x.device)
    launch(_grad_x_kernel, (triton.cdiv(n, problem.tiles.block_n),), *problem.operands, empty_rows(n, d, x), dx,
           source.args, **problem.meta)
    return dx


def _grad_columns(x: Tensor, source: GradientSource, normalize: bool, problem: _Problem) -> Tensor:
    n, d = x.shape
    columns = problem.columns
    w, m = columns.values, columns.m
    if n == 0:
        return torch.zeros(m, d, dtype=w.dtype, device=w.device)
    row_blocks = triton.cdiv(n, problem.tiles.block_n)
    column_tiles = problem.tiles.num_column_tiles(columns.num_groups, columns.group)
    wanted = gradient_splits(x.device, n, m, d, row_blocks, column_tiles)
    blocks_per_split = triton.cdiv(row_blocks, wanted)
    splits = triton.cdiv(row_blocks, blocks_per_split)  # every split non-empty
    partials = torch.empty(splits, m, d, dtype=torch.float32, device=x.device)
    launch(_grad_p_kernel, (column_tiles, splits), *problem.operands, partials, source.args, blocks_per_split,
           **problem.meta)
    dw = torch.empty(m, d, dtype=w.dtype, device=x.device)
    finish = row_tiles(x.device, block_r=64, block_d=32)
    launch(_grad_p_finish_kernel, (triton.cdiv(m, finish.block_r),), partials, splits, w, *w.stride(),
           problem.inv_p, dw, m, d, NORMALIZE=normalize, **finish.constexprs())
    return dw


def similarity_gradients(
    x: Tensor, columns: Columns, source: GradientSource, normalize: bool, need_column_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """(dx [N, D] in x's dtype, dW [M, D] in the columns' dtype or None) from the client's dS."""
    problem = _Problem(x, columns, source, normalize)
    dx = _grad_x(x, source, problem)
    dw = _grad_columns(x, source, normalize, problem) if need_column_grad else None
    return dx, dw


def column_gradient(x: Tensor, columns: Columns, source: GradientSource, normalize: bool) -> Tensor:
    """dW alone (for clients that compute dx another way)."""
    return _grad_columns(x, source, normalize, _Problem(x, columns, source, normalize))
