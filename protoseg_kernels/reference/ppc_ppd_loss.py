"""Reference kernels of ``ppc_ppd_loss`` (per pixel; the reduction is done by the op).

ppc_i = logsumexp_j(S_ij/τ) − S_it/τ,  ppd_i = (1 − S_it)²,  zero where t_i = -1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import backward_from_similarity_grad, flat_similarity


def _target_similarity(flat: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    valid = target >= 0
    safe = target.clamp_min(0)
    return flat.gather(1, safe.unsqueeze(1)).squeeze(1), valid, safe


def ppc_ppd_forward(
    x: Tensor, prototypes: Tensor, target: Tensor, normalize: bool, temperature: float
) -> tuple[Tensor, Tensor, Tensor]:
    flat = flat_similarity(x, prototypes, normalize)
    lse = torch.logsumexp(flat / temperature, dim=-1)
    s_target, valid, _ = _target_similarity(flat, target)
    zero = flat.new_zeros(())
    ppc = torch.where(valid, lse - s_target / temperature, zero)
    ppd = torch.where(valid, (1 - s_target) ** 2, zero)
    return ppc, ppd, lse


def ppc_ppd_backward(
    grad_ppc: Tensor | None, grad_ppd: Tensor | None, x: Tensor, prototypes: Tensor,
    target: Tensor, lse: Tensor, normalize: bool, temperature: float, need_prototype_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    flat = flat_similarity(x, prototypes, normalize)
    s_target, valid, safe = _target_similarity(flat, target)
    grad_s = torch.zeros_like(flat)
    at_target = torch.zeros_like(s_target)
    if grad_ppc is not None:
        g = grad_ppc.to(flat.dtype)
        grad_s += g.unsqueeze(1) * torch.softmax(flat / temperature, dim=-1) / temperature
        at_target -= g / temperature
    if grad_ppd is not None:
        at_target -= 2 * grad_ppd.to(flat.dtype) * (1 - s_target)
    grad_s.scatter_add_(1, safe.unsqueeze(1), at_target.unsqueeze(1))
    grad_s *= valid.unsqueeze(1)
    return backward_from_similarity_grad(grad_s, x, prototypes, normalize, need_prototype_grad)
