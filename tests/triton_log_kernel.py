"""A one-kernel wrapper of the Triton backend's ``natural_log`` for its accuracy test
(a module of its own: Triton resolves a kernel's helpers through module globals)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from protoseg_kernels.triton._tiles import natural_log


@triton.jit
def _log_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < n
    tl.store(out_ptr + offsets, natural_log(tl.load(x_ptr + offsets, mask=ok, other=1.0)), mask=ok)


def natural_log_of(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    _log_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    return out
