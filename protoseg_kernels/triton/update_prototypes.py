"""Triton kernels of ``update_prototypes`` (docs/spec.md §3.5).

Segmented sums without atomics: the pixels are stably sorted by key (flat
prototype c·K + k, -1 first), each prototype's pixels are then one contiguous run
whose bounds come from ``searchsorted``, and one program per (prototype, D chunk)
adds its run in order. Deterministic and bitwise reproducible; no host
synchronisation. The momentum step is one program per prototype row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._config import row_tiles
from ._host import check_dtype, launch, rows_view
from ._norms import inverse_norms
from ._tiles import inverse_norm, load_inverse_norms, to_dtype

OP = "update_prototypes"


@triton.jit
def _segment_sums_kernel(x_ptr, stride_xn, stride_xd, inv_x_ptr, order_ptr, bounds_ptr, sums_ptr, D,
                         NORMALIZE: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """sums[j, chunk] = Σ x̂[order[i]] over i in [bounds[j], bounds[j + 1]), in order."""
    j = tl.program_id(0).to(tl.int64)
    dd = tl.program_id(1).to(tl.int64) * BD + tl.arange(0, BD).to(tl.int64)
    d_ok = dd < D
    start = tl.load(bounds_ptr + j)
    end = tl.load(bounds_ptr + j + 1)
    acc = tl.zeros([BR, BD], dtype=tl.float32)
    for i0 in range(start, end, BR):
        i = i0 + tl.arange(0, BR).to(tl.int64)
        ok = i < end
        pixel = tl.load(order_ptr + i, mask=ok, other=0)
        xv = tl.load(x_ptr + pixel[:, None] * stride_xn + dd[None, :] * stride_xd,
                     mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc += xv * load_inverse_norms(inv_x_ptr, pixel, ok, NORMALIZE)[:, None]
    tl.store(sums_ptr + j * D + dd, tl.sum(acc, axis=0), mask=d_ok)


@triton.jit
def _sqrt(v, COMPUTE: tl.constexpr):
    """Correctly rounded square root (``sqrt_rn`` takes fp32 only)."""
    if COMPUTE == tl.float64:
        root = tl.sqrt(v)
    else:
        root = tl.sqrt_rn(v)
    return root


@triton.jit
def _row_norms_of_pair(p_ptr, stride_pj, stride_pd, s_ptr, rows, row_ok, D, COMPUTE: tl.constexpr,
                       BR: tl.constexpr, BD: tl.constexpr):
    """(‖P_row‖, ‖s_row‖) in the compute dtype."""
    p_sq = tl.zeros([BR], dtype=COMPUTE)
    s_sq = tl.zeros([BR], dtype=COMPUTE)
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD).to(tl.int64)
        ok = row_ok[:, None] & (dd < D)[None, :]
        p = tl.load(p_ptr + rows[:, None] * stride_pj + dd[None, :] * stride_pd, mask=ok, other=0.0).to(COMPUTE)
        s = tl.load(s_ptr + rows[:, None] * D + dd[None, :], mask=ok, other=0.0).to(COMPUTE)
        p_sq += tl.sum(p * p, axis=1)
        s_sq += tl.sum(s * s, axis=1)
    return _sqrt(p_sq, COMPUTE), _sqrt(s_sq, COMPUTE)


@triton.jit
def _blend_chunk(p_ptr, stride_pj, stride_pd, s_ptr, rows, row_ok, d0, D, p_scale, s_scale, momentum,
                 COMPUTE: tl.constexpr, BD: tl.constexpr):
    """(columns, mask, P̂, γ·P̂ + (1 − γ)·ŝ) of one chunk, with P̂ = P·p_scale and ŝ = s·s_scale."""
    dd = d0 + tl.arange(0, BD).to(tl.int64)
    ok = row_ok[:, None] & (dd < D)[None, :]
    p = tl.load(p_ptr + rows[:, None] * stride_pj + dd[None, :] * stride_pd, mask=ok, other=0.0).to(COMPUTE)
    s = tl.load(s_ptr + rows[:, None] * D + dd[None, :], mask=ok, other=0.0).to(COMPUTE)
    p_hat = p * p_scale[:, None]
    return dd, ok, p_hat, momentum * p_hat + (1.0 - momentum) * (s * s_scale[:, None])


@triton.jit
def _momentum_kernel(p_ptr, stride_pj, stride_pd, s_ptr, counts_ptr, out_ptr, CK, D, momentum,
                     NORMALIZE: tl.constexpr, COMPUTE: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """out = normalize(γ·P̂ + (1 − γ)·normalize(s)) where count > 0, else P̂."""
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
    row_ok = rows < CK
    moved = tl.load(counts_ptr + rows, mask=row_ok, other=0) > 0
    p_norm, s_norm = _row_norms_of_pair(p_ptr, stride_pj, stride_pd, s_ptr, rows, row_ok, D, COMPUTE, BR, BD)
    p_scale = tl.full([BR], 1.0, dtype=COMPUTE)
    if NORMALIZE:
        p_scale = inverse_norm(p_norm)
    s_scale = inverse_norm(s_norm)
    # ‖γ·P̂ + (1 − γ)·ŝ‖, then the blend again, normalised, chunk by chunk.
    v_sq = tl.zeros([BR], dtype=COMPUTE)
    for d0 in range(0, D, BD):
        _, _, _, v = _blend_chunk(p_ptr, stride_pj, stride_pd, s_ptr, rows, row_ok, d0, D, p_scale, s_scale,
                                  momentum, COMPUTE, BD)
        v_sq += tl.sum(v * v, axis=1)
    v_scale = inverse_norm(_sqrt(v_sq, COMPUTE))
    for d0 in range(0, D, BD):
        dd, ok, p_hat, v = _blend_chunk(p_ptr, stride_pj, stride_pd, s_ptr, rows, row_ok, d0, D, p_scale, s_scale,
                                        momentum, COMPUTE, BD)
        out = tl.where(moved[:, None], v * v_scale[:, None], p_hat)
        tl.store(out_ptr + rows[:, None] * D + dd[None, :], to_dtype(out, out_ptr.dtype.element_ty), mask=ok)


def prototype_sums(x: Tensor, key: Tensor, num_prototypes: int, normalize: bool) -> tuple[Tensor, Tensor]:
    check_dtype(OP, "x", x)
    n, d = x.shape
    sorted_key, order = torch.sort(key, stable=True)
    wanted = torch.arange(num_prototypes + 1, dtype=sorted_key.dtype, device=x.device)
    bounds = torch.searchsorted(sorted_key, wanted)  # run of prototype j: [bounds[j], bounds[j + 1])
    counts = bounds[1:] - bounds[:-1]
    sums = torch.empty(num_prototypes, d, dtype=torch.float32, device=x.device)
    tiles = row_tiles(x.device, block_r=32, block_d=64)
    launch(_segment_sums_kernel, (num_prototypes, triton.cdiv(d, tiles.block_d)), x, *x.stride(),
           inverse_norms(x, normalize), order, bounds, sums, d, NORMALIZE=normalize, **tiles.constexprs())
    return sums, counts


def momentum_update(prototypes: Tensor, sums: Tensor, counts: Tensor, momentum: float, normalize: bool) -> Tensor:
    if prototypes.dtype != torch.float64:
        check_dtype(OP, "prototypes", prototypes)
    c, k, d = prototypes.shape
    flat_p = rows_view(prototypes)
    out = torch.empty(c, k, d, dtype=prototypes.dtype, device=prototypes.device)
    compute = tl.float64 if prototypes.dtype == torch.float64 else tl.float32
    tiles = row_tiles(prototypes.device, block_r=8, block_d=128)
    launch(_momentum_kernel, (triton.cdiv(c * k, tiles.block_r),), flat_p, *flat_p.stride(), sums.contiguous(),
           counts.contiguous(), out, c * k, d, momentum, NORMALIZE=normalize, COMPUTE=compute, **tiles.constexprs())
    return out
