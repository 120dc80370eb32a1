"""Reference kernels of ``class_scores``.

Forward: S [N, C, K]; scores = max_k S (or τ·logsumexp_k(S/τ)); index = first
argmax_k S; lse_i = logsumexp_j(S_ij/τ') over all C·K prototypes.
Backward: dS as in the kernel contract, then the similarity backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import backward_from_similarity_grad, flat_similarity


def class_scores_forward(
    x: Tensor, prototypes: Tensor, normalize: bool, reduction: str, temperature: float,
    lse_temperature: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    num_classes, per_class, _ = prototypes.shape
    flat = flat_similarity(x, prototypes, normalize)
    s = flat.reshape(-1, num_classes, per_class)
    index = s.argmax(dim=-1)  # first maximum on ties
    if reduction == "max":
        scores = s.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    else:
        scores = temperature * torch.logsumexp(s / temperature, dim=-1)
    if lse_temperature is None:
        lse = flat.new_empty(0)
    else:
        lse = torch.logsumexp(flat / lse_temperature, dim=-1)
    return scores.to(x.dtype), index, lse


def class_scores_backward(
    grad_scores: Tensor | None, grad_lse: Tensor | None, x: Tensor, prototypes: Tensor,
    index: Tensor, lse: Tensor, normalize: bool, reduction: str, temperature: float,
    lse_temperature: float | None, need_prototype_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    num_classes, per_class, _ = prototypes.shape
    flat = flat_similarity(x, prototypes, normalize)
    s = flat.reshape(-1, num_classes, per_class)
    grad_s = torch.zeros_like(s)
    if grad_scores is not None:
        g = grad_scores.to(s.dtype).unsqueeze(-1)
        if reduction == "max":
            grad_s.scatter_(-1, index.unsqueeze(-1), g)
        else:
            grad_s += g * torch.softmax(s / temperature, dim=-1)
    if grad_lse is not None and lse_temperature is not None:
        weights = torch.softmax(flat / lse_temperature, dim=-1) / lse_temperature
        grad_s += (grad_lse.to(s.dtype).unsqueeze(-1) * weights).reshape(s.shape)
    return backward_from_similarity_grad(
        grad_s.reshape(flat.shape), x, prototypes, normalize, need_prototype_grad
    )
