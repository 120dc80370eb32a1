"""Triton kernels of the Sinkhorn β recurrence (docs/spec.md §3.4), orchestrated by
``protoseg_kernels.sinkhorn_assign.run_sinkhorn``.

* logits: L_i = S[i, class_i, :]/ε, each pixel against its own class's K
  prototypes only (N·K·D work), computed once.
* per-class reductions into [C, K] (max of L; Σ exp(L − m); Σ softmax(L + β)):
  each program reduces a fixed range of pixels for a block of classes into its own
  partial [C, K] slot (skipping pixel blocks without a pixel of those classes), and
  a second kernel combines the partials in a fixed order: deterministic, no atomics,
  no host synchronisation, no data-dependent shapes.
* finalize: first argmax and softmax of L_i + β_{class_i} per pixel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._config import interpreted, own_class_tiles, row_tiles, segment_tiles
from ._host import check_dtype, launch, rows_view
from ._norms import inverse_norms
from ._tiles import first_argmax, load_inverse_norms, row_inverse_norms

OP = "sinkhorn_assign"
# What a partial reduction accumulates per (class, prototype).
CLASS_MAX, SUM_EXP, SUM_SOFTMAX = 0, 1, 2


@triton.jit
def _own_class_logits_kernel(x_ptr, stride_xn, stride_xd, p_ptr, stride_pj, stride_pd, inv_p_ptr, seg_ptr,
                             out_ptr, N, C, D, K, inv_epsilon, NORMALIZE: tl.constexpr, BN: tl.constexpr,
                             KP: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)
    row_ok = rows < N
    seg = tl.load(seg_ptr + rows, mask=row_ok, other=-1)
    valid = row_ok & (seg >= 0) & (seg < C)  # an out-of-range class is never an address
    kk = tl.arange(0, KP)
    ok = valid[:, None] & (kk < K)[None, :]
    j = tl.where(valid, seg, 0)[:, None] * K + kk[None, :]
    acc = tl.zeros([BN, KP], dtype=tl.float32)
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD).to(tl.int64)
        d_ok = dd < D
        xv = tl.load(x_ptr + rows[:, None] * stride_xn + dd[None, :] * stride_xd,
                     mask=valid[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        pv = tl.load(p_ptr + j[:, :, None] * stride_pj + dd[None, None, :] * stride_pd,
                     mask=ok[:, :, None] & d_ok[None, None, :], other=0.0).to(tl.float32)
        acc += tl.sum(xv[:, None, :] * pv, axis=2)
    scale = load_inverse_norms(inv_p_ptr, j, ok, NORMALIZE) * inv_epsilon
    if NORMALIZE:
        scale = scale * row_inverse_norms(x_ptr, stride_xn, stride_xd, rows, valid, D, BN, BD)[:, None]
    tl.store(out_ptr + rows[:, None] * K + kk[None, :], tl.where(ok, acc * scale, 0.0),
             mask=row_ok[:, None] & (kk < K)[None, :])


@triton.jit
def _softmax_rows(z):
    """softmax along axis 1; all-zero rows where z is all -inf, all-NaN rows where z holds
    a NaN (the max may skip it; the sum carries it)."""
    m = tl.max(z, axis=1)
    e = tl.exp(z - tl.where(m == float("-inf"), 0.0, m)[:, None])
    total = tl.sum(e, axis=1)
    return e / tl.where(total == 0, 1.0, total)[:, None]


@triton.jit
def _pixel_values(l_ptr, aux_ptr, rows, seg, valid, kk, K, MODE: tl.constexpr):
    """Per pixel and slot, what MODE reduces: L; exp(L − m_class); softmax(L + β_class)."""
    ok = valid[:, None] & (kk < K)[None, :]
    logits = tl.load(l_ptr + rows[:, None] * K + kk[None, :], mask=ok, other=0.0)
    class_row = tl.where(valid, seg, 0)[:, None] * K + kk[None, :]
    if MODE == 0:
        values = tl.where(ok, logits, float("-inf"))
    elif MODE == 1:
        class_max = tl.load(aux_ptr + class_row, mask=ok, other=0.0)
        values = tl.where(ok, tl.exp(logits - class_max), 0.0)
    else:
        beta = tl.load(aux_ptr + class_row, mask=ok, other=0.0)
        values = tl.where(ok, _softmax_rows(tl.where(ok, logits + beta, float("-inf"))), 0.0)
    return values


@triton.jit
def _class_partials_kernel(l_ptr, seg_ptr, aux_ptr, part_ptr, N, C, K, PIXELS, MODE: tl.constexpr,
                           BN: tl.constexpr, BCC: tl.constexpr, KP: tl.constexpr):
    """Partial [C, K] reduction of PIXELS consecutive pixels (program axis 0) for BCC
    classes (axis 1): a max for MODE 0, a sum otherwise."""
    chunk = tl.program_id(0)
    cls = tl.program_id(1) * BCC + tl.arange(0, BCC)
    kk = tl.arange(0, KP)
    if MODE == 0:
        acc = tl.full([BCC, KP], float("-inf"), dtype=tl.float32)
    else:
        acc = tl.zeros([BCC, KP], dtype=tl.float32)
    start = chunk * PIXELS
    for r0 in range(start, tl.minimum(start + PIXELS, N), BN):
        rows = r0 + tl.arange(0, BN).to(tl.int64)
        row_ok = rows < N
        seg = tl.load(seg_ptr + rows, mask=row_ok, other=-1)
        member = seg[:, None] == cls[None, :]  # never for seg = -1
        if tl.max(member.to(tl.int32)) > 0:
            values = _pixel_values(l_ptr, aux_ptr, rows, seg, row_ok & (seg >= 0) & (seg < C), kk, K, MODE)
            if MODE == 0:
                acc = tl.maximum(acc, tl.max(tl.where(member[:, :, None], values[:, None, :], float("-inf")), axis=0))
            else:
                acc += tl.sum(tl.where(member[:, :, None], values[:, None, :], 0.0), axis=0)
    out = chunk.to(tl.int64) * C * K + cls[:, None].to(tl.int64) * K + kk[None, :]
    tl.store(part_ptr + out, acc, mask=(cls < C)[:, None] & (kk < K)[None, :])


@triton.jit
def _combine_partials_kernel(part_ptr, out_ptr, num_partials, CK, MODE: tl.constexpr, BR: tl.constexpr):
    """out[e] = max or sum over the partials of element e, in partial order."""
    e = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
    ok = e < CK
    if MODE == 0:
        acc = tl.full([BR], float("-inf"), dtype=tl.float32)
    else:
        acc = tl.zeros([BR], dtype=tl.float32)
    ptrs = part_ptr + e
    for _ in range(0, num_partials):
        v = tl.load(ptrs, mask=ok, other=0.0)
        if MODE == 0:
            acc = tl.maximum(acc, v)
        else:
            acc += v
        ptrs += CK
    tl.store(out_ptr + e, acc, mask=ok)


@triton.jit
def _finalize_kernel(l_ptr, seg_ptr, beta_ptr, index_ptr, q_ptr, N, C, K, WITH_Q: tl.constexpr,
                     BN: tl.constexpr, KP: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)
    row_ok = rows < N
    seg = tl.load(seg_ptr + rows, mask=row_ok, other=-1)
    valid = row_ok & (seg >= 0) & (seg < C)  # an out-of-range class is never an address
    kk = tl.arange(0, KP)
    ok = valid[:, None] & (kk < K)[None, :]
    logits = tl.load(l_ptr + rows[:, None] * K + kk[None, :], mask=ok, other=0.0)
    beta = tl.load(beta_ptr + tl.where(valid, seg, 0)[:, None] * K + kk[None, :], mask=ok, other=0.0)
    z = tl.where(ok, logits + beta, float("-inf"))
    best_z, best = first_argmax(z, kk[None, :], KP, 1)
    best = tl.where(best_z != best_z, -1, best)  # a NaN in z: the pixel's class is invalid
    tl.store(index_ptr + rows, tl.where(valid, best, -1).to(tl.int64), mask=row_ok)
    if WITH_Q:
        q = tl.where(ok, _softmax_rows(z), 0.0)
        tl.store(q_ptr + rows[:, None] * K + kk[None, :], q, mask=row_ok[:, None] & (kk < K)[None, :])


def sinkhorn_logits(x: Tensor, prototypes: Tensor, segment: Tensor, normalize: bool, epsilon: float) -> Tensor:
    check_dtype(OP, "x", x)
    n, d = x.shape
    k = prototypes.shape[1]
    flat_p = rows_view(prototypes)
    logits = torch.empty(n, k, dtype=torch.float32, device=x.device)
    block_n, k_pad, block_d = own_class_tiles(x.device, k)
    launch(_own_class_logits_kernel, (triton.cdiv(n, block_n),), x, *x.stride(), flat_p, *flat_p.stride(),
           inverse_norms(flat_p, normalize), segment.contiguous(), logits, n, prototypes.shape[0], d, k, 1.0 / epsilon,
           NORMALIZE=normalize, BN=block_n, KP=k_pad, BD=block_d)
    return logits


def _reduce_by_class(logits: Tensor, segment: Tensor, num_classes: int, mode: int,
                     aux: Tensor | None = None) -> Tensor:
    """[C, K] max (CLASS_MAX) or sum over each class's pixels of ``_pixel_values``."""
    n, k = logits.shape
    tiles = segment_tiles(logits.device, num_classes, k)
    chunks = triton.cdiv(n, tiles.pixels)
    partials = torch.empty(chunks, num_classes, k, dtype=torch.float32, device=logits.device)
    launch(_class_partials_kernel, (chunks, triton.cdiv(num_classes, tiles.block_c)), logits,
           segment.contiguous(), aux, partials, n, num_classes, k, tiles.pixels, MODE=mode, **tiles.constexprs())
    out = torch.empty(num_classes, k, dtype=torch.float32, device=logits.device)
    combine = row_tiles(logits.device, block_r=256)
    launch(_combine_partials_kernel, (triton.cdiv(num_classes * k, combine.block_r),), partials, out, chunks,
           num_classes * k, MODE=mode, BR=combine.block_r, num_warps=combine.num_warps)
    return out


def sinkhorn_class_logsumexp(logits: Tensor, segment: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    class_max = _reduce_by_class(logits, segment, num_classes, CLASS_MAX)
    return class_max, _reduce_by_class(logits, segment, num_classes, SUM_EXP, class_max)


def sinkhorn_marginals(logits: Tensor, segment: Tensor, beta: Tensor) -> Tensor:
    return _reduce_by_class(logits, segment, beta.shape[0], SUM_SOFTMAX, beta.contiguous())


def sinkhorn_finalize(logits: Tensor, segment: Tensor, beta: Tensor, return_q: bool) -> tuple[Tensor, Tensor]:
    n, k = logits.shape
    index = torch.empty(n, dtype=torch.int64, device=logits.device)
    q = torch.empty(n if return_q else 0, k, dtype=torch.float32, device=logits.device)
    block_n = 32 if interpreted(logits.device) else 128
    launch(_finalize_kernel, (triton.cdiv(n, block_n),), logits, segment.contiguous(), beta.contiguous(), index,
           q, n, beta.shape[0], k, WITH_Q=return_q, BN=block_n, KP=triton.next_power_of_2(k))
    return index, q if return_q else logits.new_empty(0)
