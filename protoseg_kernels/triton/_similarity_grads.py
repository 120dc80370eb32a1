"""The backward GEMMs of the similarity engine (prototype_similarity, class_scores,
ppc_ppd_loss and pixel_contrast_loss are its clients today).

Each client has dS_ij = ∂loss/∂S_ij that is cheap to compute from S_ij and a few
per-row or per-(row, group) values, but N×M in size. It is never stored:

* dx pass, one program per block of rows: for every column tile, recompute S
  (if dS needs it), form dS with the client's ``ds_fn``, and add dS·Ŵ into an fp32
  [N, D] accumulator owned by the program; then apply the normalisation backward.
* dW pass, one program per (column tile, row split): the same dS tiles, with
  dSᵀ·x̂ added into the split's partial [M, D] sum; a second kernel adds the
  partials in split order (deterministic: no atomics) and applies the
  normalisation backward.
* rows that are their own columns (S = x̂·x̂ᵀ, an in-batch contrast): each row gets
  both gradients, dS·x̂ + dSᵀ·x̂. The dW pass runs first and leaves its fp32 sum in
  the dx pass's accumulator, so the two roles are added in fp32 before the one
  normalisation backward (``self_similarity_gradient``).

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

With 16-bit inputs dS is rounded to their dtype for the tensor-core dot, and so are the
normalised operands Ŵ, x̂. A client whose gradient must be fp32-accurate asks for
``split_ds``: the inverse norms are folded into dS (in fp32), which enters the dot as a
16-bit pair hi + lo (about twice the dtype's precision) against the raw operand (exact in
its dtype): one more dot per product, none more to recompute S.
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
    split_ds: bool = False  # 16-bit inputs: dS as a hi + lo pair (see the module docstring)

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
def _ds_operands(ds, dtype: tl.constexpr, SPLIT_DS: tl.constexpr):
    """dS in ``dtype`` for the dot: (hi, lo), with hi + lo = dS to about twice the
    dtype's precision when SPLIT_DS (lo is unused otherwise)."""
    hi = to_dtype(ds, dtype)
    lo = hi
    if SPLIT_DS:
        lo = to_dtype(ds - hi.to(tl.float32), dtype)
    return hi, lo


@triton.jit
def _dot_operand(v, inv, SPLIT_DS: tl.constexpr):
    """The rows ``v`` [R, BD] multiplied with dS: raw when SPLIT_DS (exact; their inverse
    norms ``inv`` [R] are in dS), else normalised and rounded to their dtype."""
    if not SPLIT_DS:
        v = to_dtype(v.to(tl.float32) * inv[:, None], v.dtype)
    return v


@triton.jit
def _ds_product(hi, lo, operand, acc, SPLIT_DS: tl.constexpr, PRECISION: tl.constexpr):
    """acc + dS·operand, dS as given by ``_ds_operands``."""
    acc = mma(hi, operand, acc, PRECISION)
    if SPLIT_DS:
        acc = mma(lo, operand, acc, PRECISION)
    return acc


@triton.jit
def _grad_x_kernel(
    x, cols, inv_x_ptr, inv_p_ptr, acc_ptr, dx_ptr, op,
    DS_FN: tl.constexpr, FLAGS: tl.constexpr, NEEDS_S: tl.constexpr, NORMALIZE: tl.constexpr,
    SCALE_DS: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, KS: tl.constexpr, BC: tl.constexpr,
    FLAT: tl.constexpr, PRECISION: tl.constexpr, SPLIT_DS: tl.constexpr, ACC_FILLED: tl.constexpr,
):
    """ACC_FILLED: acc already holds a gradient of these rows (their column role) to add to."""
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
        if SPLIT_DS:
            ds = ds * inv_p[None, :]
        if SCALE_DS:
            row_scale = tl.max(tl.abs(ds), axis=1)
            row_scale = tl.where(row_scale > 0, row_scale, 1.0)
            ds = ds / row_scale[:, None]
        ds_hi, ds_lo = _ds_operands(ds, cols.ptr.dtype.element_ty, SPLIT_DS)
        # dx̂[rows] += dS · Ŵ[cols], chunk by chunk of D, in the program's own rows of acc.
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD).to(tl.int64)
            d_ok = dd < D
            p = tl.load(cols.ptr + j[:, None] * cols.stride_m + dd[None, :] * cols.stride_d,
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            p_op = _dot_operand(p, inv_p, SPLIT_DS)
            acc_ptrs = acc_ptr + rows[:, None] * D + dd[None, :]
            ok = row_ok[:, None] & d_ok[None, :]
            if ACC_FILLED:
                prev = tl.load(acc_ptrs, mask=ok, other=0.0)
            else:  # the first tile starts the sum
                prev = tl.load(acc_ptrs, mask=ok & (t > 0), other=0.0)
            if SCALE_DS:
                product = _ds_product(ds_hi, ds_lo, p_op, tl.zeros([BN, BD], dtype=tl.float32), SPLIT_DS, PRECISION)
                acc = prev + product * row_scale[:, None]
            else:
                acc = _ds_product(ds_hi, ds_lo, p_op, prev, SPLIT_DS, PRECISION)
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
    FLAT: tl.constexpr, PRECISION: tl.constexpr, SPLIT_DS: tl.constexpr,
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
        if SPLIT_DS:
            ds = ds * inv_x[:, None]
        if SCALE_DS:
            col_scale = tl.max(tl.abs(ds), axis=0)
            col_scale = tl.where(col_scale > 0, col_scale, 1.0)
            ds = ds / col_scale[None, :]
        ds_hi, ds_lo = _ds_operands(ds, x.ptr.dtype.element_ty, SPLIT_DS)
        ds_hi, ds_lo = tl.trans(ds_hi), tl.trans(ds_lo)
        # dŴ[cols] += dSᵀ · x̂[rows], chunk by chunk of D, in this split's partial sum.
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD).to(tl.int64)
            d_ok = dd < D
            xv = tl.load(x.ptr + rows[:, None] * x.stride_n + dd[None, :] * x.stride_d,
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            x_op = _dot_operand(xv, inv_x, SPLIT_DS)
            part_ptrs = part_base + j[:, None] * D + dd[None, :]
            ok = col_ok[:, None] & d_ok[None, :]
            prev = tl.load(part_ptrs, mask=ok & (block > first), other=0.0)
            if SCALE_DS:
                product = _ds_product(ds_hi, ds_lo, x_op, tl.zeros([KS * BC, BD], dtype=tl.float32), SPLIT_DS,
                                      PRECISION)
                acc = prev + product * col_scale[:, None]
            else:
                acc = _ds_product(ds_hi, ds_lo, x_op, prev, SPLIT_DS, PRECISION)
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
        split_ds = source.split_ds and x.dtype in (torch.float16, torch.bfloat16)  # fp32 dS is exact already
        self.tiles = gradient_tiles(x.device, x.dtype, columns.num_groups, columns.group, source.layout, x.shape[0],
                                    split_ds)
        self.inv_x = inverse_norms(x, normalize)
        self.inv_p = self.inv_x if columns.values is x else inverse_norms(columns.values, normalize)
        self.meta = {**source.constexprs(), "NORMALIZE": normalize, "SCALE_DS": x.dtype == torch.float16,
                     "SPLIT_DS": split_ds, **self.tiles.constexprs(), **dot_precision(x.dtype)}
        self.operands = (row_args(x), columns.kernel_arg(), self.inv_x, self.inv_p)


def _grad_x(x: Tensor, source: GradientSource, problem: _Problem, acc: Tensor | None = None) -> Tensor:
    """dx; ``acc`` (fp32 [N, D], consumed) holds a gradient w.r.t. x̂ to add before the
    normalisation backward, or None."""
    n, d = x.shape
    dx = torch.empty(n, d, dtype=x.dtype, device=x.device)
    filled = acc is not None
    launch(_grad_x_kernel, (triton.cdiv(n, problem.tiles.block_n),), *problem.operands,
           acc if filled else empty_rows(n, d, x), dx, source.args, **problem.meta, ACC_FILLED=filled)
    return dx


def _column_partials(x: Tensor, source: GradientSource, problem: _Problem) -> Tensor:
    """fp32 [splits, M, D]: dSᵀ·x̂ summed over each split of the rows (x has rows)."""
    n, d = x.shape
    m = problem.columns.m
    row_blocks = triton.cdiv(n, problem.tiles.block_n)
    column_tiles = problem.tiles.num_column_tiles(problem.columns.num_groups, problem.columns.group)
    wanted = gradient_splits(x.device, n, m, d, row_blocks, column_tiles)
    blocks_per_split = triton.cdiv(row_blocks, wanted)
    splits = triton.cdiv(row_blocks, blocks_per_split)  # every split non-empty
    partials = torch.empty(splits, m, d, dtype=torch.float32, device=x.device)
    launch(_grad_p_kernel, (column_tiles, splits), *problem.operands, partials, source.args, blocks_per_split,
           **problem.meta)
    return partials


def _finish_columns(partials: Tensor, w: Tensor, inv_p: Tensor | None, normalize: bool, out: Tensor) -> Tensor:
    """``out`` [M, D] = the split partials added in split order, then through the
    normalisation backward (``normalize``) and cast to ``out``'s dtype."""
    splits, m, d = partials.shape
    finish = row_tiles(partials.device, block_r=64, block_d=32)
    launch(_grad_p_finish_kernel, (triton.cdiv(m, finish.block_r),), partials, splits, w, *w.stride(),
           inv_p, out, m, d, NORMALIZE=normalize, **finish.constexprs())
    return out


def _grad_columns(x: Tensor, source: GradientSource, normalize: bool, problem: _Problem) -> Tensor:
    d = x.shape[1]
    w, m = problem.columns.values, problem.columns.m
    if x.shape[0] == 0:
        return torch.zeros(m, d, dtype=w.dtype, device=w.device)
    dw = torch.empty(m, d, dtype=w.dtype, device=x.device)
    return _finish_columns(_column_partials(x, source, problem), w, problem.inv_p, normalize, dw)


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


def self_similarity_gradient(x: Tensor, columns: Columns, source: GradientSource, normalize: bool) -> Tensor:
    """dx [N, D] in x's dtype when the columns are the rows themselves (``columns.values``
    is x, with labels of its own): dS·x̂ + dSᵀ·x̂, both roles added in fp32 before the
    normalisation backward. Two recomputing passes, dW's then dx's."""
    if columns.values is not x:
        raise ValueError("self_similarity_gradient: columns.values must be the rows tensor x itself")
    problem = _Problem(x, columns, source, normalize)
    n, d = x.shape
    if n == 0:
        return torch.empty_like(x)
    partials = _column_partials(x, source, problem)
    column_role = partials[0]
    if partials.shape[0] > 1:  # the memory cap of gradient_splits keeps N = M to one split
        column_role = _finish_columns(partials, x, None, False, empty_rows(n, d, x))
    return _grad_x(x, source, problem, acc=column_role)
