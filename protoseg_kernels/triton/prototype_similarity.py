"""Triton kernels of ``prototype_similarity``: S [N, C·K] = x̂·P̂ᵀ, a plain GEMM with
the normalisation fused (row inverse norms scale the fp32 accumulator)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._config import flat_forward_tiles
from ._host import check_dtype, dot_precision, launch, rows_view
from ._norms import inverse_norms
from ._similarity_grads import GradientSource, similarity_gradients
from ._tiles import column_tile, dot_tile, load_inverse_norms, to_dtype

OP = "prototype_similarity"


@triton.jit
def _similarity_kernel(x_ptr, stride_xn, stride_xd, p_ptr, stride_pj, stride_pd, inv_x_ptr, inv_p_ptr, s_ptr,
                       N, D, C, K, NORMALIZE: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                       KS: tl.constexpr, BC: tl.constexpr, FLAT: tl.constexpr,
                       PRECISION: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)
    row_ok = rows < N
    j, c, k, col_ok = column_tile(tl.program_id(1), C, K, FLAT, KS, BC)
    s = dot_tile(x_ptr, stride_xn, stride_xd, rows, row_ok, p_ptr, stride_pj, stride_pd, j, col_ok, D,
                 BN, KS * BC, BD, PRECISION)
    s = s * load_inverse_norms(inv_x_ptr, rows, row_ok, NORMALIZE)[:, None]
    s = s * load_inverse_norms(inv_p_ptr, j, col_ok, NORMALIZE)[None, :]
    tl.store(s_ptr + rows[:, None] * (C * K) + j[None, :], to_dtype(s, s_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _loaded_grad(s, rows, row_ok, j, c, k, col_ok, a_ptr, stride_an, stride_ac, stride_ak, b_ptr, stride_b,
                 idx_ptr, stride_in, stride_ic, lse_ptr, scale_a, scale_b,
                 HAS_A: tl.constexpr, HAS_B: tl.constexpr, VARIANT: tl.constexpr, KS: tl.constexpr,
                 BC: tl.constexpr):
    """dS is the upstream gradient itself, a [N, C, K] tensor."""
    return tl.load(a_ptr + rows[:, None] * stride_an + c[None, :] * stride_ac + k[None, :] * stride_ak,
                   mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)


def similarity_forward(x: Tensor, prototypes: Tensor, normalize: bool) -> Tensor:
    check_dtype(OP, "x", x)
    n, d = x.shape
    c, k, _ = prototypes.shape
    flat_p = rows_view(prototypes)
    out = torch.empty(n, c, k, dtype=x.dtype, device=x.device)
    tiles = flat_forward_tiles(x.device, x.dtype, c, k)
    grid = (triton.cdiv(n, tiles.block_n), tiles.num_column_tiles(c, k))
    launch(_similarity_kernel, grid, x, *x.stride(), flat_p, *flat_p.stride(), inverse_norms(x, normalize),
           inverse_norms(flat_p, normalize), out, n, d, c, k, NORMALIZE=normalize, **tiles.constexprs(),
           **dot_precision(x.dtype))
    return out


def similarity_backward(
    grad: Tensor, x: Tensor, prototypes: Tensor, normalize: bool, need_prototype_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    check_dtype(OP, "x", x)
    source = GradientSource(_loaded_grad, needs_similarity=False, a=grad, a_strides=tuple(grad.stride()))
    return similarity_gradients(x, prototypes, source, normalize, need_prototype_grad)
