"""Triton kernels of ``ppc_ppd_loss`` (docs/spec.md §3.3).

Forward, a client of the engine's row sweep (``_sweep``) over flat tiles of
prototypes: an online log-sum-exp of S/τ, and the target similarity S_it picked
from the tile that holds t_i, so ppc_i = lse_i − S_it/τ and ppd_i = (1 − S_it)² come
out of one pass. Backward recomputes S tile by tile in the engine's dx/dW passes:
dS_ij = g_ppc_i·(softmax_j(S_i/τ) − [j = t_i])/τ − 2·g_ppd_i·(1 − S_it)·[j = t_i].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._columns import Columns
from ._config import flat_forward_tiles
from ._host import check_dtype
from ._similarity_grads import GradientSource, similarity_gradients
from ._sweep import SweepClient, row_sweep
from ._tiles import logsumexp_merge, logsumexp_rows, logsumexp_value

OP = "ppc_ppd_loss"


@triton.jit
def _ppc_ppd_start(rows, row_ok, op, FLAGS: tl.constexpr):
    """(target, running max and sum of exp(S/τ − max), S_it) of each row."""
    target_ptr, inv_temperature, ppc_ptr, ppd_ptr, lse_ptr = op
    target = tl.load(target_ptr + rows, mask=row_ok, other=-1)
    run_max = tl.full(rows.shape, float("-inf"), dtype=tl.float32)
    return target, run_max, tl.zeros(rows.shape, dtype=tl.float32), tl.zeros(rows.shape, dtype=tl.float32)


@triton.jit
def _ppc_ppd_step(state, s, rows, row_ok, cols, tile, op, FLAGS: tl.constexpr, KS: tl.constexpr, BC: tl.constexpr):
    target, run_max, run_sum, s_target = state
    target_ptr, inv_temperature, ppc_ptr, ppd_ptr, lse_ptr = op
    j, c, k, col_ok = tile
    # Column j is t_i in exactly one tile (never for t_i = -1).
    s_target += tl.sum(tl.where(j[None, :] == target[:, None], s, 0.0), axis=1)
    tile_max, tile_sum = logsumexp_rows(tl.where(col_ok[None, :], s * inv_temperature, float("-inf")), 1)
    run_max, run_sum = logsumexp_merge(run_max, run_sum, tile_max, tile_sum)
    return target, run_max, run_sum, s_target


@triton.jit
def _ppc_ppd_finish(state, rows, row_ok, op, FLAGS: tl.constexpr):
    target, run_max, run_sum, s_target = state
    target_ptr, inv_temperature, ppc_ptr, ppd_ptr, lse_ptr = op
    lse = logsumexp_value(run_max, run_sum)
    valid = target >= 0
    tl.store(ppc_ptr + rows, tl.where(valid, lse - s_target * inv_temperature, 0.0), mask=row_ok)
    tl.store(ppd_ptr + rows, tl.where(valid, (1.0 - s_target) * (1.0 - s_target), 0.0), mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)


@triton.jit
def _ppc_ppd_grad(s, rows, row_ok, cols, tile, op, FLAGS: tl.constexpr, KS: tl.constexpr, BC: tl.constexpr):
    g_ppc_ptr, stride_ppc, g_ppd_ptr, stride_ppd, target_ptr, stride_target, lse_ptr, inv_temperature = op
    j, c, k, col_ok = tile
    target = tl.load(target_ptr + rows * stride_target, mask=row_ok, other=-1)
    valid = row_ok & (target >= 0)
    at_target = j[None, :] == target[:, None]
    ds = tl.zeros(s.shape, dtype=tl.float32)
    if g_ppc_ptr is not None:
        g = tl.load(g_ppc_ptr + rows * stride_ppc, mask=valid, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + rows, mask=valid, other=0.0)
        softmax = tl.exp(s * inv_temperature - lse[:, None])
        ds += g[:, None] * (softmax - tl.where(at_target, 1.0, 0.0)) * inv_temperature
    if g_ppd_ptr is not None:
        g_ppd = tl.load(g_ppd_ptr + rows * stride_ppd, mask=valid, other=0.0).to(tl.float32)
        ds += tl.where(at_target, -2.0 * g_ppd[:, None] * (1.0 - s), 0.0)
    return tl.where(valid[:, None] & col_ok[None, :], ds, 0.0)


def ppc_ppd_forward(
    x: Tensor, prototypes: Tensor, target: Tensor, normalize: bool, temperature: float,
) -> tuple[Tensor, Tensor, Tensor]:
    check_dtype(OP, "x", x)
    n = x.shape[0]
    c, k, _ = prototypes.shape
    ppc, ppd, lse = (torch.empty(n, dtype=torch.float32, device=x.device) for _ in range(3))
    client = SweepClient(_ppc_ppd_start, _ppc_ppd_step, _ppc_ppd_finish,
                         args=(target.contiguous(), 1.0 / temperature, ppc, ppd, lse))
    row_sweep(x, Columns.of_prototypes(prototypes), client, normalize, flat_forward_tiles(x.device, x.dtype, c, k))
    return ppc, ppd, lse


def ppc_ppd_backward(
    grad_ppc: Tensor | None, grad_ppd: Tensor | None, x: Tensor, prototypes: Tensor, target: Tensor,
    lse: Tensor, normalize: bool, temperature: float, need_prototype_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    check_dtype(OP, "x", x)
    grads = [(g, 0 if g is None else g.stride(0)) for g in (grad_ppc, grad_ppd)]  # a 0 stride repeats g
    source = GradientSource(_ppc_ppd_grad, needs_similarity=True,
                            args=(*grads[0], *grads[1], target, target.stride(0), lse, 1.0 / temperature))
    dx, dp = similarity_gradients(x, Columns.of_prototypes(prototypes), source, normalize, need_prototype_grad)
    return dx, None if dp is None else dp.view(prototypes.shape)
