"""Reference kernels of ``update_prototypes``: segmented sums and the momentum step."""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import compute_dtype, normalize_rows


def prototype_sums(
    x: Tensor, key: Tensor, num_prototypes: int, normalize: bool
) -> tuple[Tensor, Tensor]:
    dtype = compute_dtype(x)
    xs = normalize_rows(x.to(dtype)) if normalize else x.to(dtype)
    valid = key >= 0
    safe = key.clamp_min(0)
    sums = xs.new_zeros(num_prototypes, x.shape[1])
    # where, not a product: an ignored pixel's NaN must not reach prototype 0 (0·NaN = NaN)
    sums.index_add_(0, safe, torch.where(valid.unsqueeze(1), xs, 0.0))
    counts = torch.zeros(num_prototypes, dtype=torch.int64, device=x.device)
    counts.index_add_(0, safe, valid.long())
    return sums, counts


def momentum_update(
    prototypes: Tensor, sums: Tensor, counts: Tensor, momentum: float, normalize: bool
) -> Tensor:
    dtype = compute_dtype(prototypes)
    p = prototypes.to(dtype).reshape(sums.shape)
    if normalize:
        p = normalize_rows(p)
    moved = normalize_rows(momentum * p + (1 - momentum) * normalize_rows(sums.to(dtype)))
    new = torch.where((counts > 0).unsqueeze(1), moved, p)
    return new.reshape(prototypes.shape).to(prototypes.dtype)
