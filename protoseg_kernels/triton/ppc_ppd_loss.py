"""Triton kernels of ``ppc_ppd_loss`` (SPEC §3.3).

Forward, one program per block of pixels: an online log-sum-exp of S/τ over flat
tiles of prototypes (FlashAttention-style), and the target similarity S_it picked
from the tile that holds t_i, so ppc_i = lse_i − S_it/τ and ppd_i = (1 − S_it)² come
out of one pass. Backward recomputes S tile by tile in the shared dx/dP passes:
dS_ij = g_ppc_i·(softmax_j(S_i/τ) − [j = t_i])/τ − 2·g_ppd_i·(1 − S_it)·[j = t_i].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._config import flat_forward_tiles
from ._host import check_dtype, dot_precision, launch, rows_view
from ._norms import inverse_norms
from ._similarity_grads import GradientSource, similarity_gradients
from ._tiles import (
    column_tile,
    dot_tile,
    load_inverse_norms,
    logsumexp_merge,
    logsumexp_rows,
    logsumexp_value,
    num_column_tiles,
    row_inverse_norms,
)

OP = "ppc_ppd_loss"


@triton.jit
def _ppc_ppd_forward_kernel(
    x_ptr, stride_xn, stride_xd, p_ptr, stride_pj, stride_pd, inv_p_ptr, target_ptr, ppc_ptr, ppd_ptr, lse_ptr,
    N, D, C, K, inv_temperature,
    NORMALIZE: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, KS: tl.constexpr, BC: tl.constexpr,
    FLAT: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)
    row_ok = rows < N
    inv_x = tl.where(row_ok, 1.0, 0.0)
    if NORMALIZE:
        inv_x = row_inverse_norms(x_ptr, stride_xn, stride_xd, rows, row_ok, D, BN, BD)
    target = tl.load(target_ptr + rows, mask=row_ok, other=-1)
    run_max = tl.full([BN], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BN], dtype=tl.float32)
    s_target = tl.zeros([BN], dtype=tl.float32)
    for t in range(num_column_tiles(C, K, FLAT, KS, BC)):
        j, c, k, col_ok = column_tile(t, C, K, FLAT, KS, BC)
        s = dot_tile(x_ptr, stride_xn, stride_xd, rows, row_ok, p_ptr, stride_pj, stride_pd, j, col_ok, D,
                     BN, KS * BC, BD, PRECISION)
        s = s * inv_x[:, None] * load_inverse_norms(inv_p_ptr, j, col_ok, NORMALIZE)[None, :]
        # Column j is t_i in exactly one tile (never for t_i = -1).
        s_target += tl.sum(tl.where(j[None, :] == target[:, None], s, 0.0), axis=1)
        tile_max, tile_sum = logsumexp_rows(tl.where(col_ok[None, :], s * inv_temperature, float("-inf")), 1)
        run_max, run_sum = logsumexp_merge(run_max, run_sum, tile_max, tile_sum)
    lse = logsumexp_value(run_max, run_sum)
    valid = target >= 0
    tl.store(ppc_ptr + rows, tl.where(valid, lse - s_target * inv_temperature, 0.0), mask=row_ok)
    tl.store(ppd_ptr + rows, tl.where(valid, (1.0 - s_target) * (1.0 - s_target), 0.0), mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)


@triton.jit
def _ppc_ppd_grad(s, rows, row_ok, j, c, k, col_ok, a_ptr, stride_an, stride_ac, stride_ak, b_ptr, stride_b,
                  idx_ptr, stride_in, stride_ic, lse_ptr, inv_temperature, scale_b,
                  HAS_A: tl.constexpr, HAS_B: tl.constexpr, VARIANT: tl.constexpr, KS: tl.constexpr,
                  BC: tl.constexpr):
    target = tl.load(idx_ptr + rows * stride_in, mask=row_ok, other=-1)
    valid = row_ok & (target >= 0)
    at_target = j[None, :] == target[:, None]
    ds = tl.zeros(s.shape, dtype=tl.float32)
    if HAS_A:
        g = tl.load(a_ptr + rows * stride_an, mask=valid, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + rows, mask=valid, other=0.0)
        softmax = tl.exp(s * inv_temperature - lse[:, None])
        ds += g[:, None] * (softmax - tl.where(at_target, 1.0, 0.0)) * inv_temperature
    if HAS_B:
        g_ppd = tl.load(b_ptr + rows * stride_b, mask=valid, other=0.0).to(tl.float32)
        ds += tl.where(at_target, -2.0 * g_ppd[:, None] * (1.0 - s), 0.0)
    return tl.where(valid[:, None] & col_ok[None, :], ds, 0.0)


def ppc_ppd_forward(
    x: Tensor, prototypes: Tensor, target: Tensor, normalize: bool, temperature: float,
) -> tuple[Tensor, Tensor, Tensor]:
    check_dtype(OP, "x", x)
    n, d = x.shape
    c, k, _ = prototypes.shape
    flat_p = rows_view(prototypes)
    ppc, ppd, lse = (torch.empty(n, dtype=torch.float32, device=x.device) for _ in range(3))
    tiles = flat_forward_tiles(x.device, x.dtype, c, k)
    launch(_ppc_ppd_forward_kernel, (triton.cdiv(n, tiles.block_n),), x, *x.stride(), flat_p, *flat_p.stride(),
           inverse_norms(flat_p, normalize), target.contiguous(), ppc, ppd, lse, n, d, c, k, 1.0 / temperature,
           NORMALIZE=normalize, **tiles.constexprs(), **dot_precision(x.dtype))
    return ppc, ppd, lse


def ppc_ppd_backward(
    grad_ppc: Tensor | None, grad_ppd: Tensor | None, x: Tensor, prototypes: Tensor, target: Tensor,
    lse: Tensor, normalize: bool, temperature: float, need_prototype_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    check_dtype(OP, "x", x)
    source = GradientSource(
        _ppc_ppd_grad, needs_similarity=True,
        a=grad_ppc, a_strides=(0, 0, 0) if grad_ppc is None else (grad_ppc.stride(0), 0, 0),
        b=grad_ppd, index=target, index_strides=(target.stride(0), 0), lse=lse, scale_a=1.0 / temperature,
    )
    return similarity_gradients(x, prototypes, source, normalize, need_prototype_grad)
