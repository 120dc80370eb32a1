"""Row inverse norms 1 / max(‖row‖₂, eps) of a [R, D] matrix (a small pre-pass)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._config import row_tiles
from ._host import launch
from ._tiles import row_inverse_norms


@triton.jit
def _inverse_norms_kernel(t_ptr, stride_r, stride_d, out_ptr, R, D, BR: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
    ok = rows < R
    tl.store(out_ptr + rows, row_inverse_norms(t_ptr, stride_r, stride_d, rows, ok, D, BR, BD), mask=ok)


def inverse_norms(rows: Tensor, normalize: bool = True) -> Tensor | None:
    """fp32 [R] inverse norms of a [R, D] tensor; None when not normalising (the
    kernels then use 1)."""
    if not normalize:
        return None
    r, d = rows.shape
    out = torch.empty(r, dtype=torch.float32, device=rows.device)
    tiles = row_tiles(rows.device, block_r=64, block_d=32)
    launch(_inverse_norms_kernel, (triton.cdiv(r, tiles.block_r),), rows, *rows.stride(), out, r, d,
           **tiles.constexprs())
    return out
