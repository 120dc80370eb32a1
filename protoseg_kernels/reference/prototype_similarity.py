"""Reference kernels of ``prototype_similarity``: S = x̂·P̂ᵀ."""

from __future__ import annotations

from torch import Tensor

from ._common import backward_from_similarity_grad, compute_dtype, flat_similarity


def similarity_forward(x: Tensor, prototypes: Tensor, normalize: bool) -> Tensor:
    num_classes, per_class, _ = prototypes.shape
    s = flat_similarity(x, prototypes, normalize)
    return s.reshape(x.shape[0], num_classes, per_class).to(x.dtype)


def similarity_backward(
    grad: Tensor, x: Tensor, prototypes: Tensor, normalize: bool, need_prototype_grad: bool
) -> tuple[Tensor, Tensor | None]:
    c, k, _ = prototypes.shape
    grad_s = grad.reshape(x.shape[0], c * k).to(compute_dtype(x))
    return backward_from_similarity_grad(grad_s, x, prototypes, normalize, need_prototype_grad)
