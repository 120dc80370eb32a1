"""Triton kernels of ``class_scores`` (docs/spec.md §3.2).

Forward, one program per block of pixels: for each block of classes, the tiles
[pixels × (slots × classes)] of S are computed with ``tl.dot`` one slot block at a
time; the epilogue keeps, per (pixel, class), the running max with its first argmax
and (for ``"logsumexp"``) a running log-sum-exp over the K prototypes, and per pixel
a running log-sum-exp of S/τ' over all C·K prototypes. Nothing N×C×K is stored.

Backward:
* ``"max"`` without an lse gradient: dS is g at the argmax only, so
  dx̂_i = Σ_c g_ic·P̂_{c, index_ic} is a gather over C prototype rows per pixel (no
  GEMM); dP uses the shared dP pass with that one-hot dS (no recomputation).
* otherwise: the shared recompute passes (``_similarity_grads``) with the dS below.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._columns import Columns, row_args
from ._config import class_scores_forward_tiles, row_tiles
from ._host import check_dtype, dot_precision, empty_rows, launch
from ._norms import inverse_norms
from ._similarity_grads import GradientSource, column_gradient, similarity_gradients
from ._tiles import (
    dot_tile,
    first_argmax,
    load_inverse_norms,
    logsumexp_merge,
    logsumexp_rows,
    logsumexp_value,
    replaces_max,
    row_inverse_norms,
    store_normalize_backward,
    to_dtype,
)

OP = "class_scores"
# The FLAGS of the gradient: how g_scores enters dS.
MAX, SOFT = 0, 1


@triton.jit
def _class_scores_forward_kernel(
    x, cols, inv_p_ptr, scores_ptr, index_ptr, lse_ptr, inv_temperature, inv_lse_temperature,
    NORMALIZE: tl.constexpr, SOFT: tl.constexpr, WITH_LSE: tl.constexpr,
    BN: tl.constexpr, BD: tl.constexpr, KS: tl.constexpr, BC: tl.constexpr, FLAT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    K = cols.group
    C = cols.groups
    rows = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)
    row_ok = rows < x.n
    inv_x = tl.where(row_ok, 1.0, 0.0)
    if NORMALIZE:
        inv_x = row_inverse_norms(x.ptr, x.stride_n, x.stride_d, rows, row_ok, x.d, BN, BD)
    r = tl.arange(0, KS * BC)
    slot_3d = tl.arange(0, KS)[None, :, None]
    all_m = tl.full([BN], float("-inf"), dtype=tl.float32)
    all_sum = tl.zeros([BN], dtype=tl.float32)
    for c0 in range(0, C, BC):
        c = (c0 + r % BC).to(tl.int64)
        best = tl.full([BN, BC], float("-inf"), dtype=tl.float32)
        best_k = tl.zeros([BN, BC], dtype=tl.int32)
        soft_m = tl.full([BN, BC], float("-inf"), dtype=tl.float32)
        soft_sum = tl.zeros([BN, BC], dtype=tl.float32)
        for k0 in range(0, K, KS):
            k = k0 + r // BC
            col_ok = (c < C) & (k < K)
            j = c * K + k
            s = dot_tile(x, rows, row_ok, cols, j, col_ok, BN, KS * BC, BD, PRECISION)
            s = s * inv_x[:, None] * load_inverse_norms(inv_p_ptr, j, col_ok, NORMALIZE)[None, :]
            s = tl.where(col_ok[None, :], s, float("-inf"))
            # Per class: the slots of this block lie along axis 1.
            s_3d = tl.reshape(s, [BN, KS, BC])
            block_max, block_arg = first_argmax(s_3d, slot_3d, KS, 1)
            better = replaces_max(block_max, best)  # an earlier slot block keeps ties and NaN
            best_k = tl.where(better, k0 + block_arg, best_k)
            best = tl.where(better, block_max, best)
            if SOFT:
                block_m, block_sum = logsumexp_rows(s_3d * inv_temperature, 1)
                soft_m, soft_sum = logsumexp_merge(soft_m, soft_sum, block_m, block_sum)
            if WITH_LSE:
                tile_m, tile_sum = logsumexp_rows(s * inv_lse_temperature, 1)
                all_m, all_sum = logsumexp_merge(all_m, all_sum, tile_m, tile_sum)
        cls = c0 + tl.arange(0, BC).to(tl.int64)
        out_ok = row_ok[:, None] & (cls < C)[None, :]
        out = rows[:, None] * C + cls[None, :]
        if SOFT:
            scores = logsumexp_value(soft_m, soft_sum) / inv_temperature
        else:
            scores = best
        tl.store(scores_ptr + out, to_dtype(scores, scores_ptr.dtype.element_ty), mask=out_ok)
        tl.store(index_ptr + out, tl.minimum(best_k, K - 1).to(tl.int64), mask=out_ok)
    if WITH_LSE:
        tl.store(lse_ptr + rows, logsumexp_value(all_m, all_sum), mask=row_ok)


@triton.jit
def _per_column(v, KS: tl.constexpr, BC: tl.constexpr):
    """A [rows, BC] per-class tile repeated over the KS slots of a class-layout tile."""
    return tl.reshape(tl.broadcast_to(v[:, None, :], [v.shape[0], KS, BC]), [v.shape[0], KS * BC])


@triton.jit
def _class_scores_grad(s, rows, row_ok, cols, tile, op, FLAGS: tl.constexpr, KS: tl.constexpr, BC: tl.constexpr):
    """dS = g_ic·[k = index_ic] (MAX) or g_ic·softmax_k(S_ic/τ) (SOFT, whole classes per
    tile), plus g_lse_i·softmax_j(S_i/τ')/τ'. Class-layout tiles: the per-class values
    are loaded once per class ([rows, BC]) and repeated over the slots."""
    (g_ptr, stride_gn, stride_gc, g_lse_ptr, stride_g_lse, idx_ptr, stride_in, stride_ic, lse_ptr,
     inv_temperature, inv_lse_temperature) = op
    j, c, k, col_ok = tile
    ds = tl.zeros(s.shape, dtype=tl.float32)
    if g_ptr is not None:
        classes = tl.min(c) + tl.arange(0, BC)  # c = first class + column % BC
        class_ok = tl.max(tl.reshape(col_ok, [KS, BC]).to(tl.int32), axis=0) > 0
        ok = row_ok[:, None] & class_ok[None, :]
        g = tl.load(g_ptr + rows[:, None] * stride_gn + classes[None, :] * stride_gc, mask=ok, other=0.0)
        g = _per_column(g.to(tl.float32), KS, BC)
        if FLAGS[0] == 1:  # SOFT
            z = tl.where(col_ok[None, :], s * inv_temperature, float("-inf"))
            z_3d = tl.reshape(z, [s.shape[0], KS, BC])
            class_max, class_sum = logsumexp_rows(z_3d, 1)
            class_lse = logsumexp_value(class_max, class_sum)
            class_lse = tl.where(class_lse == float("-inf"), 0.0, class_lse)  # classes beyond C
            ds += g * tl.reshape(tl.exp(z_3d - class_lse[:, None, :]), s.shape)
        else:
            index = tl.load(idx_ptr + rows[:, None] * stride_in + classes[None, :] * stride_ic, mask=ok, other=-1)
            ds += tl.where(_per_column(index, KS, BC) == k[None, :], g, 0.0)
    if g_lse_ptr is not None:
        g_lse = tl.load(g_lse_ptr + rows * stride_g_lse, mask=row_ok, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        ds += g_lse[:, None] * tl.exp(s * inv_lse_temperature - lse[:, None]) * inv_lse_temperature
    return tl.where(row_ok[:, None] & col_ok[None, :], ds, 0.0)


@triton.jit
def _argmax_gather_grad_x_kernel(
    g_ptr, stride_gn, stride_gc, idx_ptr, stride_in, stride_ic, x, cols, inv_x_ptr, inv_p_ptr, acc_ptr, dx_ptr,
    NORMALIZE: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
):
    """dx̂_i = Σ_c g_ic·P̂_{c, index_ic}: C gathered prototype rows per pixel."""
    D = x.d
    K = cols.group
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
    row_ok = rows < x.n
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD).to(tl.int64)
        d_ok = dd < D
        acc = tl.zeros([BR, BD], dtype=tl.float32)
        for c in range(0, cols.groups):
            slot = tl.load(idx_ptr + rows * stride_in + c * stride_ic, mask=row_ok, other=-1)
            ok = row_ok & (slot >= 0) & (slot < K)
            j = tl.where(ok, c * K + slot, 0)
            weight = tl.load(g_ptr + rows * stride_gn + c * stride_gc, mask=ok, other=0.0).to(tl.float32)
            weight *= load_inverse_norms(inv_p_ptr, j, ok, NORMALIZE)
            prototype = tl.load(cols.ptr + j[:, None] * cols.stride_m + dd[None, :] * cols.stride_d,
                                mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            acc += weight[:, None] * prototype
        tl.store(acc_ptr + rows[:, None] * D + dd[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
    tl.debug_barrier()
    inv_x = load_inverse_norms(inv_x_ptr, rows, row_ok, NORMALIZE)
    store_normalize_backward(acc_ptr, D, x.ptr, x.stride_n, x.stride_d, dx_ptr, D, rows, row_ok, inv_x, D,
                             NORMALIZE, BR, BD)


def class_scores_forward(
    x: Tensor, prototypes: Tensor, normalize: bool, reduction: str, temperature: float,
    lse_temperature: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    check_dtype(OP, "x", x)
    n = x.shape[0]
    c, k, _ = prototypes.shape
    columns = Columns.of_prototypes(prototypes)
    scores = torch.empty(n, c, dtype=x.dtype, device=x.device)
    index = torch.empty(n, c, dtype=torch.int64, device=x.device)
    with_lse = lse_temperature is not None
    lse = torch.empty(n if with_lse else 0, dtype=torch.float32, device=x.device)
    tiles = class_scores_forward_tiles(x.device, x.dtype, c, k)
    launch(_class_scores_forward_kernel, (triton.cdiv(n, tiles.block_n),), row_args(x), columns.kernel_arg(),
           inverse_norms(columns.values, normalize), scores, index, lse, 1.0 / temperature,
           1.0 / (lse_temperature or 1.0), NORMALIZE=normalize, SOFT=reduction == "logsumexp",
           WITH_LSE=with_lse, **tiles.constexprs(), **dot_precision(x.dtype))
    return scores, index, lse


def _argmax_gather_grad_x(grad_scores: Tensor, index: Tensor, x: Tensor, columns: Columns,
                          normalize: bool) -> Tensor:
    n, d = x.shape
    dx = torch.empty(n, d, dtype=x.dtype, device=x.device)
    tiles = row_tiles(x.device, block_r=64, block_d=64)
    launch(_argmax_gather_grad_x_kernel, (triton.cdiv(n, tiles.block_r),), grad_scores, *grad_scores.stride(),
           index, *index.stride(), row_args(x), columns.kernel_arg(), inverse_norms(x, normalize),
           inverse_norms(columns.values, normalize), empty_rows(n, d, x), dx, NORMALIZE=normalize,
           **tiles.constexprs())
    return dx


def class_scores_backward(
    grad_scores: Tensor | None, grad_lse: Tensor | None, x: Tensor, prototypes: Tensor, index: Tensor,
    lse: Tensor, normalize: bool, reduction: str, temperature: float, lse_temperature: float | None,
    need_prototype_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    check_dtype(OP, "x", x)
    if lse_temperature is None:
        grad_lse = None
    soft = reduction == "logsumexp" and grad_scores is not None
    g_strides = (0, 0) if grad_scores is None else grad_scores.stride()
    g_lse_stride = 0 if grad_lse is None else grad_lse.stride(0)  # a 0 stride repeats g_lse
    source = GradientSource(
        _class_scores_grad, needs_similarity=soft or grad_lse is not None,
        args=(grad_scores, *g_strides, grad_lse, g_lse_stride, index, *index.stride(), lse, 1.0 / temperature,
              1.0 / (lse_temperature or 1.0)),
        flags=(SOFT if soft else MAX,), layout="whole_classes" if soft else "class",
    )
    columns = Columns.of_prototypes(prototypes)
    if source.needs_similarity or grad_scores is None:
        dx, dp = similarity_gradients(x, columns, source, normalize, need_prototype_grad)
    else:
        # "max" with only g_scores: dS is one-hot, so dx is a gather and dP needs no recomputation.
        dx = _argmax_gather_grad_x(grad_scores, index, x, columns, normalize)
        dp = column_gradient(x, columns, source, normalize) if need_prototype_grad else None
    return dx, None if dp is None else dp.view(prototypes.shape)
