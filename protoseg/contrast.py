"""PPC and PPD from the one-pass head (SPEC §7), shared by ``ProtoSegHead`` and the
benchmarks' fused step.

``class_scores(..., lse_temperature=τ)`` already gives lse_i = log Σ_j exp(S_ij/τ)
over all C·K prototypes. What PPC and PPD still need is s_i = S_{i,t_i}, the
similarity to each pixel's target prototype t_i (flat index c·K + k): a gathered
dot product, N·D work. Gathering ``prototypes[target]`` with autograd would keep an
[N, D] tensor alive until backward; :func:`target_similarity` instead gathers the
target rows block by block into one reused buffer, in forward and again in backward,
and saves nothing of size N×D besides x itself.

The prototypes are constants here (ProtoSeg's prototypes are not learned by
gradient): no gradient flows to them.
"""

from __future__ import annotations

import torch
from torch import Tensor

NORM_EPS = 1e-12  # as F.normalize
ROW_BLOCKS = 8  # the gathered rows live in a buffer of at most ⌈N/8⌉ × D elements


def _row_blocks(n: int) -> list[slice]:
    rows = max(1, -(-n // ROW_BLOCKS))
    return [slice(start, min(start + rows, n)) for start in range(0, n, rows)]


def _gather_rows(flat_prototypes: Tensor, target: Tensor, rows: slice, buffer: Tensor) -> Tensor:
    """flat_prototypes[target[rows]] written into (a prefix of) ``buffer``."""
    return torch.index_select(flat_prototypes, 0, target[rows], out=buffer[: rows.stop - rows.start])


class _TargetSimilarity(torch.autograd.Function):
    """s_i = ⟨x̂_i, p_{t_i}⟩ with x̂_i = x_i/max(‖x_i‖, ε) (``normalize``) or x_i.

    Backward: dx_i = g_i·p_t without normalisation; with it, the gradient of
    F.normalize: dx_i = g_i·(p_t − s_i·x̂_i)/‖x_i‖, or g_i·p_t/ε where the norm is
    clamped.
    """

    @staticmethod
    def forward(ctx, x: Tensor, flat_prototypes: Tensor, target: Tensor, normalize: bool) -> Tensor:
        dot = x.new_empty(x.shape[0])
        blocks = _row_blocks(x.shape[0])
        buffer = x.new_empty(blocks[0].stop if blocks else 0, x.shape[1])
        for rows in blocks:
            torch.sum(_gather_rows(flat_prototypes, target, rows, buffer).mul_(x[rows]), dim=1, out=dot[rows])
        norm = x.norm(dim=1).clamp_min(NORM_EPS) if normalize else None
        s = dot / norm if normalize else dot
        ctx.normalize = normalize
        ctx.save_for_backward(x, flat_prototypes, target, norm, s)
        return s

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        x, flat_prototypes, target, norm, s = ctx.saved_tensors
        if ctx.normalize:
            radial = torch.where(norm > NORM_EPS, s / norm, 0.0).unsqueeze(1)  # s·x̂/‖x‖ = s·x/‖x‖²
            scale = (grad / norm).unsqueeze(1)
        dx = torch.empty_like(x)
        blocks = _row_blocks(x.shape[0])
        buffer = x.new_empty(blocks[0].stop if blocks else 0, x.shape[1])
        for rows in blocks:
            p_t = _gather_rows(flat_prototypes, target, rows, buffer)
            if ctx.normalize:
                torch.addcmul(p_t, x[rows], radial[rows], value=-1, out=dx[rows])
                dx[rows].mul_(scale[rows])
            else:
                torch.mul(p_t, grad[rows].unsqueeze(1), out=dx[rows])
        return dx, None, None, None


def target_similarity(x: Tensor, flat_prototypes: Tensor, target: Tensor, *, normalize: bool) -> Tensor:
    """Similarity [N] of each pixel to its target prototype, differentiable in ``x``.

    Args:
        x: [N, D] pixel embeddings.
        flat_prototypes: [C·K, D] unit prototypes (constants: no gradient), x's dtype.
        target: [N] int64 flat target c·K + k; a negative entry reads row 0 (mask it).
        normalize: cosine of x (l2-normalised here) instead of the plain dot product.
    """
    if flat_prototypes.dtype != x.dtype:
        raise TypeError(f"flat_prototypes must have x's dtype {x.dtype}, got {flat_prototypes.dtype}")
    return _TargetSimilarity.apply(x, flat_prototypes.detach(), target.clamp_min(0), normalize)


def contrast_losses(
    x: Tensor, flat_prototypes: Tensor, lse: Tensor, target: Tensor, temperature: float, *, normalize: bool
) -> tuple[Tensor, Tensor]:
    """PPC and PPD averaged over the labelled pixels (target >= 0); 0 with zero
    gradient when there is none.

    PPC_i = lse_i − s_i/τ (``lse`` from ``class_scores(..., lse_temperature=τ)``) and
    PPD_i = (1 − s_i)², s_i = :func:`target_similarity`. Computed in ``lse``'s dtype.
    """
    labelled = target >= 0
    s = target_similarity(x.to(lse.dtype), flat_prototypes.to(lse.dtype), target, normalize=normalize)
    ppc = torch.where(labelled, lse - s / temperature, 0.0)
    ppd = torch.where(labelled, (1.0 - s) ** 2, 0.0)
    count = labelled.sum().clamp_min(1).to(lse.dtype)
    return ppc.sum() / count, ppd.sum() / count
