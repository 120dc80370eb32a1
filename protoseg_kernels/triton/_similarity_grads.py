"""The backward GEMMs shared by prototype_similarity, class_scores and ppc_ppd_loss.

Each of these ops has dS_ij = ∂loss/∂S_ij that is cheap to compute from S_ij and a
few per-row or per-(row, class) values, but N×C·K in size. It is never stored:

* dx pass, one program per block of pixels: for every column tile, recompute S
  (if dS needs it), form dS with the op's ``ds_fn``, and add dS·P̂ into an fp32
  [N, D] accumulator owned by the program; then apply the normalisation backward.
* dP pass, one program per (column tile, pixel split): the same dS tiles, with
  dSᵀ·x̂ added into the split's partial [C·K, D] sum; a second kernel adds the
  partials in split order (deterministic: no atomics) and applies the
  normalisation backward.

``ds_fn`` is a ``triton.jit`` function of the op, passed as a constexpr, with the
signature of ``GradientSource``: it receives the S tile (zeros when not
``needs_similarity``), the row and column coordinates, and the op's tensors, and
returns dS in fp32, zero outside the valid rows and columns.

With fp16 inputs each dS tile is divided by its largest magnitude per row (dx) or
column (dP) before the cast to fp16 and multiplied back after the dot, so small
upstream gradients (a mean over many pixels) do not underflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._config import gradient_splits, gradient_tiles, row_tiles
from ._host import dot_precision, empty_rows, launch, rows_view
from ._norms import inverse_norms
from ._tiles import column_tile, dot_tile, load_inverse_norms, mma, num_column_tiles, store_normalize_backward, to_dtype


@dataclass
class GradientSource:
    """The tensors and constants an op's ``ds_fn`` reads, in kernel-argument order.

    a: the main upstream gradient, addressed as a[row, class, slot] through
    ``a_strides`` (a zero stride repeats it); b: a per-row upstream gradient;
    index: a per-row or per-(row, class) int64 index; lse: a per-row fp32 value.
    ``variant`` is an op-defined constexpr. ``layout`` of the column tiles: "flat",
    "class", or "whole_classes" (class layout holding all K slots, for per-class
    softmaxes); see ``_tiles.column_tile``.
    """

    ds_fn: Any
    needs_similarity: bool
    a: Tensor | None = None
    a_strides: tuple[int, int, int] = (0, 0, 0)
    b: Tensor | None = None
    index: Tensor | None = None
    index_strides: tuple[int, int] = (0, 0)
    lse: Tensor | None = None
    scale_a: float = 1.0
    scale_b: float = 1.0
    variant: int = 0
    layout: str = "flat"

    def args(self) -> tuple[Any, ...]:
        b_stride = 0 if self.b is None else self.b.stride(0)
        return (self.a, *self.a_strides, self.b, b_stride, self.index, *self.index_strides, self.lse,
                self.scale_a, self.scale_b)

    def constexprs(self) -> dict[str, Any]:
        return {"DS_FN": self.ds_fn, "HAS_A": self.a is not None, "HAS_B": self.b is not None,
                "VARIANT": self.variant, "NEEDS_S": self.needs_similarity}


@triton.jit
def _similarity_and_grad(x_ptr, stride_xn, stride_xd, p_ptr, stride_pj, stride_pd, rows, row_ok, inv_x,
                         j, c, k, col_ok, inv_p, a_ptr, stride_an, stride_ac, stride_ak, b_ptr, stride_b,
                         idx_ptr, stride_in, stride_ic, lse_ptr, scale_a, scale_b, D,
                         DS_FN: tl.constexpr, HAS_A: tl.constexpr, HAS_B: tl.constexpr, VARIANT: tl.constexpr,
                         NEEDS_S: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, KS: tl.constexpr,
                         BC: tl.constexpr, PRECISION: tl.constexpr):
    """dS of one [BN, KS·BC] tile (recomputing S first when the op needs it)."""
    s = tl.zeros([BN, KS * BC], dtype=tl.float32)
    if NEEDS_S:
        s = dot_tile(x_ptr, stride_xn, stride_xd, rows, row_ok, p_ptr, stride_pj, stride_pd, j, col_ok, D,
                     BN, KS * BC, BD, PRECISION)
        s = s * inv_x[:, None] * inv_p[None, :]
    return DS_FN(s, rows, row_ok, j, c, k, col_ok, a_ptr, stride_an, stride_ac, stride_ak, b_ptr, stride_b,
                 idx_ptr, stride_in, stride_ic, lse_ptr, scale_a, scale_b, HAS_A, HAS_B, VARIANT, KS, BC)


@triton.jit
def _grad_x_kernel(
    x_ptr, stride_xn, stride_xd, p_ptr, stride_pj, stride_pd, inv_x_ptr, inv_p_ptr, acc_ptr, dx_ptr,
    a_ptr, stride_an, stride_ac, stride_ak, b_ptr, stride_b, idx_ptr, stride_in, stride_ic, lse_ptr,
    scale_a, scale_b, N, D, C, K,
    DS_FN: tl.constexpr, HAS_A: tl.constexpr, HAS_B: tl.constexpr, VARIANT: tl.constexpr, NEEDS_S: tl.constexpr,
    NORMALIZE: tl.constexpr, SCALE_DS: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, KS: tl.constexpr,
    BC: tl.constexpr, FLAT: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)
    row_ok = rows < N
    inv_x = load_inverse_norms(inv_x_ptr, rows, row_ok, NORMALIZE)
    for t in range(num_column_tiles(C, K, FLAT, KS, BC)):
        j, c, k, col_ok = column_tile(t, C, K, FLAT, KS, BC)
        inv_p = load_inverse_norms(inv_p_ptr, j, col_ok, NORMALIZE)
        ds = _similarity_and_grad(x_ptr, stride_xn, stride_xd, p_ptr, stride_pj, stride_pd, rows, row_ok, inv_x,
                                  j, c, k, col_ok, inv_p, a_ptr, stride_an, stride_ac, stride_ak, b_ptr, stride_b,
                                  idx_ptr, stride_in, stride_ic, lse_ptr, scale_a, scale_b, D, DS_FN, HAS_A, HAS_B,
                                  VARIANT, NEEDS_S, BN, BD, KS, BC, PRECISION)
        if SCALE_DS:
            row_scale = tl.max(tl.abs(ds), axis=1)
            row_scale = tl.where(row_scale > 0, row_scale, 1.0)
            ds = ds / row_scale[:, None]
        ds_op = to_dtype(ds, p_ptr.dtype.element_ty)
        # dx̂[rows] += dS · P̂[cols], chunk by chunk of D, in the program's own rows of acc.
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD).to(tl.int64)
            d_ok = dd < D
            p = tl.load(p_ptr + j[:, None] * stride_pj + dd[None, :] * stride_pd,
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            p_hat = to_dtype(p.to(tl.float32) * inv_p[:, None], p_ptr.dtype.element_ty)
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
    store_normalize_backward(acc_ptr, D, x_ptr, stride_xn, stride_xd, dx_ptr, D, rows, row_ok, inv_x, D,
                             NORMALIZE, BN, BD)


@triton.jit
def _grad_p_kernel(
    x_ptr, stride_xn, stride_xd, p_ptr, stride_pj, stride_pd, inv_x_ptr, inv_p_ptr, part_ptr,
    a_ptr, stride_an, stride_ac, stride_ak, b_ptr, stride_b, idx_ptr, stride_in, stride_ic, lse_ptr,
    scale_a, scale_b, N, D, C, K, blocks_per_split,
    DS_FN: tl.constexpr, HAS_A: tl.constexpr, HAS_B: tl.constexpr, VARIANT: tl.constexpr, NEEDS_S: tl.constexpr,
    NORMALIZE: tl.constexpr, SCALE_DS: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, KS: tl.constexpr,
    BC: tl.constexpr, FLAT: tl.constexpr, PRECISION: tl.constexpr,
):
    t = tl.program_id(0)
    split = tl.program_id(1)
    j, c, k, col_ok = column_tile(t, C, K, FLAT, KS, BC)
    inv_p = load_inverse_norms(inv_p_ptr, j, col_ok, NORMALIZE)
    part_base = part_ptr + split.to(tl.int64) * (C * K).to(tl.int64) * D
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(N, BN))
    for block in range(first, last):
        rows = block * BN + tl.arange(0, BN).to(tl.int64)
        row_ok = rows < N
        inv_x = load_inverse_norms(inv_x_ptr, rows, row_ok, NORMALIZE)
        ds = _similarity_and_grad(x_ptr, stride_xn, stride_xd, p_ptr, stride_pj, stride_pd, rows, row_ok, inv_x,
                                  j, c, k, col_ok, inv_p, a_ptr, stride_an, stride_ac, stride_ak, b_ptr, stride_b,
                                  idx_ptr, stride_in, stride_ic, lse_ptr, scale_a, scale_b, D, DS_FN, HAS_A, HAS_B,
                                  VARIANT, NEEDS_S, BN, BD, KS, BC, PRECISION)
        if SCALE_DS:
            col_scale = tl.max(tl.abs(ds), axis=0)
            col_scale = tl.where(col_scale > 0, col_scale, 1.0)
            ds = ds / col_scale[None, :]
        ds_t = tl.trans(to_dtype(ds, x_ptr.dtype.element_ty))
        # dP̂[cols] += dSᵀ · x̂[rows], chunk by chunk of D, in this split's partial sum.
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD).to(tl.int64)
            d_ok = dd < D
            xv = tl.load(x_ptr + rows[:, None] * stride_xn + dd[None, :] * stride_xd,
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            x_hat = to_dtype(xv.to(tl.float32) * inv_x[:, None], x_ptr.dtype.element_ty)
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
def _grad_p_finish_kernel(part_ptr, splits, p_ptr, stride_pj, stride_pd, inv_p_ptr, dp_ptr, CK, D,
                          NORMALIZE: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
    row_ok = rows < CK
    # Sum the split partials in split order, into partial 0.
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD).to(tl.int64)
        ok = row_ok[:, None] & (dd < D)[None, :]
        first_ptrs = part_ptr + rows[:, None] * D + dd[None, :]
        total = tl.load(first_ptrs, mask=ok, other=0.0)
        split_ptrs = first_ptrs
        for _ in range(1, splits):
            split_ptrs += CK.to(tl.int64) * D
            total += tl.load(split_ptrs, mask=ok, other=0.0)
        tl.store(first_ptrs, total, mask=ok)
    tl.debug_barrier()
    inv_p = load_inverse_norms(inv_p_ptr, rows, row_ok, NORMALIZE)
    store_normalize_backward(part_ptr, D, p_ptr, stride_pj, stride_pd, dp_ptr, D, rows, row_ok, inv_p, D,
                             NORMALIZE, BR, BD)


class _Problem:
    """Shapes, tiles and the kernel arguments shared by the dx and dP passes."""

    def __init__(self, x: Tensor, prototypes: Tensor, source: GradientSource, normalize: bool) -> None:
        self.n, self.d = x.shape
        self.c, self.k, _ = prototypes.shape
        self.flat_p = rows_view(prototypes)
        self.tiles = gradient_tiles(x.device, x.dtype, self.c, self.k, source.layout)
        self.inv_x, self.inv_p = inverse_norms(x, normalize), inverse_norms(self.flat_p, normalize)
        self.meta = {**source.constexprs(), "NORMALIZE": normalize, "SCALE_DS": x.dtype == torch.float16,
                     **self.tiles.constexprs(), **dot_precision(x.dtype)}
        self.inputs = (x, *x.stride(), self.flat_p, *self.flat_p.stride(), self.inv_x, self.inv_p)
        self.shape = (self.n, self.d, self.c, self.k)


def _grad_x(x: Tensor, source: GradientSource, problem: _Problem) -> Tensor:
    n, d = x.shape
    dx = torch.empty(n, d, dtype=x.dtype, device=x.device)
    launch(_grad_x_kernel, (triton.cdiv(n, problem.tiles.block_n),), *problem.inputs, empty_rows(n, d, x), dx,
           *source.args(), *problem.shape, **problem.meta)
    return dx


def _grad_prototypes(x: Tensor, prototypes: Tensor, source: GradientSource, normalize: bool,
                     problem: _Problem) -> Tensor:
    n, d, c, k = problem.shape
    if n == 0:
        return torch.zeros_like(prototypes)
    pixel_blocks = triton.cdiv(n, problem.tiles.block_n)
    column_tiles = problem.tiles.num_column_tiles(c, k)
    wanted = gradient_splits(x.device, n, c * k, d, pixel_blocks, column_tiles)
    blocks_per_split = triton.cdiv(pixel_blocks, wanted)
    splits = triton.cdiv(pixel_blocks, blocks_per_split)  # every split non-empty
    partials = torch.empty(splits, c * k, d, dtype=torch.float32, device=x.device)
    launch(_grad_p_kernel, (column_tiles, splits), *problem.inputs, partials, *source.args(), *problem.shape,
           blocks_per_split, **problem.meta)
    dp = torch.empty(c * k, d, dtype=prototypes.dtype, device=x.device)
    finish = row_tiles(x.device, block_r=64, block_d=32)
    launch(_grad_p_finish_kernel, (triton.cdiv(c * k, finish.block_r),), partials, splits, problem.flat_p,
           *problem.flat_p.stride(), problem.inv_p, dp, c * k, d, NORMALIZE=normalize, **finish.constexprs())
    return dp.view(c, k, d)


def similarity_gradients(
    x: Tensor, prototypes: Tensor, source: GradientSource, normalize: bool, need_prototype_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """(dx in x's dtype, dP in prototypes' dtype or None) from the op's dS."""
    problem = _Problem(x, prototypes, source, normalize)
    dx = _grad_x(x, source, problem)
    dp = _grad_prototypes(x, prototypes, source, normalize, problem) if need_prototype_grad else None
    return dx, dp


def prototype_gradient(x: Tensor, prototypes: Tensor, source: GradientSource, normalize: bool) -> Tensor:
    """dP alone (for ops that compute dx another way)."""
    return _grad_prototypes(x, prototypes, source, normalize, _Problem(x, prototypes, source, normalize))
