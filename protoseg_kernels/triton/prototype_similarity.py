"""Triton kernels of ``prototype_similarity``: S [N, C·K] = x̂·P̂ᵀ, a plain GEMM with
the normalisation fused (row inverse norms scale the fp32 accumulator)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._columns import Columns, row_args
from ._config import flat_forward_tiles
from ._host import check_dtype, dot_precision, launch
from ._norms import inverse_norms
from ._similarity_grads import GradientSource, similarity_gradients
from ._tiles import column_tile, dot_tile, load_inverse_norms, num_columns, to_dtype

OP = "prototype_similarity"


@triton.jit
def _similarity_kernel(x, cols, inv_x_ptr, inv_p_ptr, s_ptr, NORMALIZE: tl.constexpr, BN: tl.constexpr,
                       BD: tl.constexpr, KS: tl.constexpr, BC: tl.constexpr, FLAT: tl.constexpr,
                       PRECISION: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)
    row_ok = rows < x.n
    j, c, k, col_ok = column_tile(tl.program_id(1), cols, FLAT, KS, BC)
    s = dot_tile(x, rows, row_ok, cols, j, col_ok, BN, KS * BC, BD, PRECISION)
    # The norms are loaded after the dot: not live during its loop.
    s = s * load_inverse_norms(inv_x_ptr, rows, row_ok, NORMALIZE)[:, None]
    s = s * load_inverse_norms(inv_p_ptr, j, col_ok, NORMALIZE)[None, :]
    tl.store(s_ptr + rows[:, None] * num_columns(cols) + j[None, :], to_dtype(s, s_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _loaded_grad(s, rows, row_ok, cols, tile, op, FLAGS: tl.constexpr, KS: tl.constexpr, BC: tl.constexpr):
    """dS is the upstream gradient itself, a [N, C, K] tensor."""
    g_ptr, stride_n, stride_c, stride_k = op
    j, c, k, col_ok = tile
    return tl.load(g_ptr + rows[:, None] * stride_n + c[None, :] * stride_c + k[None, :] * stride_k,
                   mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)


def similarity_forward(x: Tensor, prototypes: Tensor, normalize: bool) -> Tensor:
    check_dtype(OP, "x", x)
    n = x.shape[0]
    c, k, _ = prototypes.shape
    columns = Columns.of_prototypes(prototypes)
    out = torch.empty(n, c, k, dtype=x.dtype, device=x.device)
    tiles = flat_forward_tiles(x.device, x.dtype, c, k)
    grid = (triton.cdiv(n, tiles.block_n), tiles.num_column_tiles(c, k))
    launch(_similarity_kernel, grid, row_args(x), columns.kernel_arg(), inverse_norms(x, normalize),
           inverse_norms(columns.values, normalize), out, NORMALIZE=normalize, **tiles.constexprs(),
           **dot_precision(x.dtype))
    return out


def similarity_backward(
    grad: Tensor, x: Tensor, prototypes: Tensor, normalize: bool, need_prototype_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    check_dtype(OP, "x", x)
    source = GradientSource(_loaded_grad, needs_similarity=False, args=(grad, *grad.stride()))
    dx, dp = similarity_gradients(x, Columns.of_prototypes(prototypes), source, normalize, need_prototype_grad)
    return dx, None if dp is None else dp.view(prototypes.shape)
