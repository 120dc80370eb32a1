"""A test-side client of the Triton similarity engine on labelled columns: the
log-sum-exp of each row over the columns of another label,

    lse_i = log Σ_{j : label_j ≠ y_i} exp(S_ij / τ),   S = x̂·Ŵᵀ, W [M, D] any M,

forward through the row sweep, gradient through the dx / dW passes, with
dS_ij = g_i·exp(S_ij/τ − lse_i)/τ on those columns (-inf and no gradient for a row
without such columns). It touches none of the engine's code: what a memory-bank op
(docs/spec.md §10) needs. (A module of its own: Triton resolves a kernel's helpers through
module globals.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from protoseg_kernels.triton import _config
from protoseg_kernels.triton._columns import Columns
from protoseg_kernels.triton._similarity_grads import GradientSource, similarity_gradients
from protoseg_kernels.triton._sweep import SweepClient, row_sweep
from protoseg_kernels.triton._tiles import column_labels, logsumexp_merge, logsumexp_rows, logsumexp_value


@triton.jit
def _negatives(row_label, row_ok, cols, tile):
    """[BN, tile] mask of the valid columns whose label differs from the row's."""
    j, c, k, col_ok = tile
    other = column_labels(cols, tile)[None, :] != row_label[:, None]
    return row_ok[:, None] & col_ok[None, :] & other


@triton.jit
def _start(rows, row_ok, op, FLAGS: tl.constexpr):
    row_label_ptr, inv_temperature, lse_ptr = op
    row_label = tl.load(row_label_ptr + rows, mask=row_ok, other=-1)
    return row_label, tl.full(rows.shape, float("-inf"), dtype=tl.float32), tl.zeros(rows.shape, dtype=tl.float32)


@triton.jit
def _step(state, s, rows, row_ok, cols, tile, op, FLAGS: tl.constexpr, KS: tl.constexpr, BC: tl.constexpr):
    row_label, run_max, run_sum = state
    row_label_ptr, inv_temperature, lse_ptr = op
    z = tl.where(_negatives(row_label, row_ok, cols, tile), s * inv_temperature, float("-inf"))
    tile_max, tile_sum = logsumexp_rows(z, 1)
    run_max, run_sum = logsumexp_merge(run_max, run_sum, tile_max, tile_sum)
    return row_label, run_max, run_sum


@triton.jit
def _finish(state, rows, row_ok, op, FLAGS: tl.constexpr):
    row_label, run_max, run_sum = state
    row_label_ptr, inv_temperature, lse_ptr = op
    tl.store(lse_ptr + rows, logsumexp_value(run_max, run_sum), mask=row_ok)


@triton.jit
def _grad(s, rows, row_ok, cols, tile, op, FLAGS: tl.constexpr, KS: tl.constexpr, BC: tl.constexpr):
    g_ptr, row_label_ptr, lse_ptr, inv_temperature = op
    row_label = tl.load(row_label_ptr + rows, mask=row_ok, other=-1)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)  # a row without other labels has no gradient
    softmax = tl.exp(s * inv_temperature - lse[:, None])
    return tl.where(_negatives(row_label, row_ok, cols, tile), g[:, None] * softmax * inv_temperature, 0.0)


def _columns(bank: Tensor, labels: Tensor | None, group: int) -> Columns:
    return Columns(bank, None if labels is None else labels.contiguous(), group)


def negative_logsumexp(x: Tensor, bank: Tensor, labels: Tensor | None, row_labels: Tensor, temperature: float,
                       normalize: bool, group: int = 1) -> Tensor:
    """fp32 [N] lse of each row of x over the columns of ``bank`` [M, D] labelled otherwise."""
    columns = _columns(bank, labels, group)
    lse = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    tiles = _config.flat_forward_tiles(x.device, x.dtype, columns.num_groups, columns.group)
    row_sweep(x, columns, SweepClient(_start, _step, _finish, args=(row_labels.contiguous(), 1.0 / temperature, lse)),
              normalize, tiles)
    return lse


def negative_logsumexp_backward(grad: Tensor, x: Tensor, bank: Tensor, labels: Tensor | None, row_labels: Tensor,
                                lse: Tensor, temperature: float, normalize: bool, group: int = 1,
                                layout: str = "flat") -> tuple[Tensor, Tensor | None]:
    """(dx [N, D], dW [M, D]) of Σ_i grad_i·lse_i."""
    source = GradientSource(_grad, needs_similarity=True, layout=layout,
                            args=(grad.float().contiguous(), row_labels.contiguous(), lse, 1.0 / temperature))
    return similarity_gradients(x, _columns(bank, labels, group), source, normalize, need_column_grad=True)
