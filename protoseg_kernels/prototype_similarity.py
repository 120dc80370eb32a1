"""``prototype_similarity``: the full similarity tensor S [N, C, K] (docs/spec.md §3.1).

    S[i, c, k] = ⟨x̂_i, P̂_ck⟩,   x̂ = x / max(‖x‖, 1e-12) when ``normalize``.

Gradients: dx̂_i = Σ_ck dS_ick P̂_ck, dP̂_ck = Σ_i dS_ick x̂_i, then through the
normalisation: dx = (dx̂ − x̂⟨dx̂, x̂⟩)/‖x‖.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._backend import get_backend, resolve_backend
from ._checks import check_bool, check_features_and_prototypes
from ._op_utils import fake_similarity_grads, or_empty, prototype_grad_or_none

OP = "prototype_similarity"


@torch.library.custom_op("protoseg::prototype_similarity", mutates_args=())
def _similarity_op(x: Tensor, prototypes: Tensor, normalize: bool, backend: str) -> Tensor:
    return get_backend(backend).similarity_forward(x, prototypes, normalize)


@_similarity_op.register_fake
def _(x: Tensor, prototypes: Tensor, normalize: bool, backend: str) -> Tensor:
    return x.new_empty(x.shape[0], prototypes.shape[0], prototypes.shape[1])


@torch.library.custom_op("protoseg::prototype_similarity_backward", mutates_args=())
def _similarity_backward_op(
    grad: Tensor, x: Tensor, prototypes: Tensor, normalize: bool, need_prototype_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    grad_x, grad_p = get_backend(backend).similarity_backward(
        grad, x, prototypes, normalize, need_prototype_grad
    )
    return grad_x, or_empty(grad_p, prototypes)


@_similarity_backward_op.register_fake
def _(grad, x, prototypes, normalize, need_prototype_grad, backend):
    return fake_similarity_grads(x, prototypes, need_prototype_grad)


def _setup_context(ctx, inputs, output):
    x, prototypes, normalize, backend = inputs
    ctx.save_for_backward(x, prototypes)
    ctx.normalize, ctx.backend = normalize, backend


def _backward(ctx, grad):
    x, prototypes = ctx.saved_tensors
    need_p = ctx.needs_input_grad[1]
    grad_x, grad_p = _similarity_backward_op(
        grad.contiguous(), x, prototypes, ctx.normalize, need_p, ctx.backend
    )
    return grad_x, prototype_grad_or_none(grad_p, need_p), None, None


_similarity_op.register_autograd(_backward, setup_context=_setup_context)


def prototype_similarity(x: Tensor, prototypes: Tensor, *, normalize: bool = True) -> Tensor:
    """Cosine (or dot-product) similarity of every pixel to every prototype.

    Args:
        x: [N, D] pixel embeddings (fp16, bf16, fp32 or fp64).
        prototypes: [C, K, D] prototypes (cast to ``x``'s dtype).
        normalize: l2-normalise ``x`` and ``prototypes`` inside the op.

    Returns:
        S [N, C, K] in ``x``'s dtype, accumulated in fp32 (fp64 for fp64).
        Differentiable in ``x`` and ``prototypes``. O(N·C·K) memory by nature: use
        :func:`class_scores` or :func:`ppc_ppd_loss` in training.
    """
    x, prototypes = check_features_and_prototypes(OP, x, prototypes)
    normalize = check_bool(OP, "normalize", normalize)
    return _similarity_op(x, prototypes, normalize, resolve_backend(OP, x.device, x.dtype))
