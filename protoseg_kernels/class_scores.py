"""``class_scores``: per-class scores from K prototypes per class (docs/spec.md §3.2).

With S[i, c, k] = ⟨x̂_i, P̂_ck⟩:

* ``reduction="max"``: scores_ic = max_k S_ick, index_ic = first argmax.
  Backward routes g_ic to the argmax prototype only: dS_ick = g_ic·[k = index_ic].
  (``torch.amax`` instead splits the gradient evenly between exact ties.)
* ``reduction="logsumexp"``: scores_ic = τ·log Σ_k exp(S_ick/τ), a soft mixture;
  dS_ick = g_ic·softmax_k(S_ic/τ).
* ``lse_temperature=τ'``: also lse_i = log Σ_j exp(S_ij/τ') over all C·K
  prototypes, from the same pass; dS_ij += g_i·softmax_j(S_i/τ')/τ'.

The training-head recipe (docs/spec.md §7): with ``lse_temperature=τ``, the PPC loss of
pixel i with target prototype t_i is ``lse_i − s_t/τ`` where
``s_t = (x̂_i · P̂_{t_i}).sum()`` is a cheap gathered dot product, so class scores
and the PPC normaliser cost one GEMM pass forward and two backward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._backend import get_backend, resolve_backend
from ._checks import (
    check_bool,
    check_choice,
    check_features_and_prototypes,
    check_positive_finite,
)
from ._op_utils import (
    compute_dtype,
    fake_similarity_grads,
    keep_ungiven_grads_none,
    or_empty,
    prototype_grad_or_none,
)

OP = "class_scores"
REDUCTIONS = ("max", "logsumexp")


class ScoresWithIndex(NamedTuple):
    scores: Tensor
    index: Tensor


class ScoresWithLse(NamedTuple):
    scores: Tensor
    lse: Tensor


class ScoresWithIndexAndLse(NamedTuple):
    scores: Tensor
    index: Tensor
    lse: Tensor


@torch.library.custom_op("protoseg::class_scores", mutates_args=())
def _class_scores_op(
    x: Tensor, prototypes: Tensor, normalize: bool, reduction: str, temperature: float,
    lse_temperature: float | None, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return get_backend(backend).class_scores_forward(
        x, prototypes, normalize, reduction, temperature, lse_temperature
    )


@_class_scores_op.register_fake
def _(x, prototypes, normalize, reduction, temperature, lse_temperature, backend):
    n, (c, _, _) = x.shape[0], prototypes.shape
    lse_len = 0 if lse_temperature is None else n
    return (
        x.new_empty(n, c),
        x.new_empty(n, c, dtype=torch.int64),
        x.new_empty(lse_len, dtype=compute_dtype(x.dtype)),
    )


@torch.library.custom_op("protoseg::class_scores_backward", mutates_args=())
def _class_scores_backward_op(
    grad_scores: Tensor | None, grad_lse: Tensor | None, x: Tensor, prototypes: Tensor,
    index: Tensor, lse: Tensor, normalize: bool, reduction: str, temperature: float,
    lse_temperature: float | None, need_prototype_grad: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    grad_x, grad_p = get_backend(backend).class_scores_backward(
        grad_scores, grad_lse, x, prototypes, index, lse, normalize, reduction, temperature,
        lse_temperature, need_prototype_grad,
    )
    return grad_x, or_empty(grad_p, prototypes)


@_class_scores_backward_op.register_fake
def _(grad_scores, grad_lse, x, prototypes, index, lse, normalize, reduction, temperature,
      lse_temperature, need_prototype_grad, backend):
    return fake_similarity_grads(x, prototypes, need_prototype_grad)


def _setup_context(ctx, inputs, output):
    x, prototypes, normalize, reduction, temperature, lse_temperature, backend = inputs
    _, index, lse = output
    ctx.save_for_backward(x, prototypes, index, lse)
    ctx.args = (normalize, reduction, temperature, lse_temperature)
    ctx.backend = backend
    ctx.mark_non_differentiable(index)
    keep_ungiven_grads_none(ctx)


def _backward(ctx, grad_scores, grad_index, grad_lse):
    x, prototypes, index, lse = ctx.saved_tensors
    need_p = ctx.needs_input_grad[1]
    if grad_scores is None and grad_lse is None:
        return None, None, None, None, None, None, None
    grad_x, grad_p = _class_scores_backward_op(
        grad_scores, grad_lse, x, prototypes, index, lse, *ctx.args, need_p, ctx.backend
    )
    return grad_x, prototype_grad_or_none(grad_p, need_p), None, None, None, None, None


_class_scores_op.register_autograd(_backward, setup_context=_setup_context)


def class_scores(
    x: Tensor,
    prototypes: Tensor,
    *,
    normalize: bool = True,
    reduction: str = "max",
    temperature: float = 1.0,
    return_index: bool = False,
    lse_temperature: float | None = None,
) -> Tensor | ScoresWithIndex | ScoresWithLse | ScoresWithIndexAndLse:
    """Class scores [N, C] from the K prototypes of each class, without N×C×K memory
    on the fused backends.

    Args:
        x: [N, D] pixel embeddings.
        prototypes: [C, K, D] (cast to ``x``'s dtype).
        normalize: l2-normalise both inside the op (cosine similarity).
        reduction: ``"max"`` (ProtoSeg) or ``"logsumexp"`` (soft mixture).
        temperature: τ of ``"logsumexp"`` (unused by ``"max"``).
        return_index: also return index [N, C] int64, the first argmax over K.
        lse_temperature: τ'; also return lse [N] = log Σ_j exp(S_ij/τ') over all C·K
            prototypes (fp32, fp64 for fp64 inputs).

    Returns:
        ``scores`` (in ``x``'s dtype) alone, or a named tuple
        ``(scores, index)``, ``(scores, lse)`` or ``(scores, index, lse)``.
        Differentiable in ``x`` and ``prototypes`` through scores and lse.
    """
    x, prototypes = check_features_and_prototypes(OP, x, prototypes)
    normalize = check_bool(OP, "normalize", normalize)
    reduction = check_choice(OP, "reduction", reduction, REDUCTIONS)
    temperature = check_positive_finite(OP, "temperature", temperature, x.dtype)
    return_index = check_bool(OP, "return_index", return_index)
    if lse_temperature is not None:
        lse_temperature = check_positive_finite(OP, "lse_temperature", lse_temperature, x.dtype)
    scores, index, lse = _class_scores_op(
        x, prototypes, normalize, reduction, temperature, lse_temperature,
        resolve_backend(OP, x.device, x.dtype),
    )
    if lse_temperature is None:
        return ScoresWithIndex(scores, index) if return_index else scores
    if return_index:
        return ScoresWithIndexAndLse(scores, index, lse)
    return ScoresWithLse(scores, lse)
