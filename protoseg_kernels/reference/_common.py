"""Shared pieces of the reference backend: normalisation, the similarity GEMM
and its backward. Readable PyTorch; this backend is the oracle, not the fast path."""

from __future__ import annotations

import torch
from torch import Tensor

NORM_EPS = 1e-12


def compute_dtype(t: Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (docs/spec.md §3)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def normalize_rows(t: Tensor) -> Tensor:
    """t / max(‖t‖₂, 1e-12) over the last dimension (what F.normalize does)."""
    return t / t.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def normalize_rows_backward(t: Tensor, grad_hat: Tensor) -> Tensor:
    """Gradient through t̂ = t / max(‖t‖, ε):
    (g − t̂⟨g, t̂⟩)/‖t‖ where ‖t‖ > ε, else g/ε (the clamp is then constant)."""
    norm = t.norm(dim=-1, keepdim=True)
    hat = t / norm.clamp_min(NORM_EPS)
    projected = grad_hat - hat * (grad_hat * hat).sum(-1, keepdim=True)
    return torch.where(norm > NORM_EPS, projected / norm.clamp_min(NORM_EPS), grad_hat / NORM_EPS)


def prepared(x: Tensor, prototypes: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    """(x̂ [N, D], P̂ [C·K, D]) in the compute dtype."""
    dtype = compute_dtype(x)
    xs = x.to(dtype)
    ps = prototypes.to(dtype).reshape(-1, prototypes.shape[-1])
    if normalize:
        xs, ps = normalize_rows(xs), normalize_rows(ps)
    return xs, ps


def flat_similarity(x: Tensor, prototypes: Tensor, normalize: bool) -> Tensor:
    """S [N, C·K] in the compute dtype."""
    xs, ps = prepared(x, prototypes, normalize)
    return xs @ ps.T


def backward_from_similarity_grad(
    grad_s: Tensor, x: Tensor, prototypes: Tensor, normalize: bool, need_prototype_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Given dS [N, C·K] (compute dtype), return (dx, dP) in the inputs' dtypes."""
    dtype = compute_dtype(x)
    xs, ps = prepared(x, prototypes, normalize)
    grad_x = grad_s @ ps
    if normalize:
        grad_x = normalize_rows_backward(x.to(dtype), grad_x)
    grad_p = None
    if need_prototype_grad:
        grad_p = grad_s.T @ xs
        if normalize:
            grad_p = normalize_rows_backward(prototypes.to(dtype).reshape(grad_p.shape), grad_p)
        grad_p = grad_p.reshape(prototypes.shape).to(prototypes.dtype)
    return grad_x.to(x.dtype), grad_p
