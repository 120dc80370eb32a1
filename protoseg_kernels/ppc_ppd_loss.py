"""``ppc_ppd_loss``: the prototype contrast (PPC) and distance (PPD) losses (docs/spec.md §3.3).

For each valid pixel i with target prototype t_i (a flat index c·K + k):

    ppc_i = log Σ_j exp(S_ij/τ) − S_it/τ        (cross-entropy over all C·K)
    ppd_i = (1 − S_it)²

Gradient: dS_ij = g_ppc·(softmax_j(S_i/τ) − [j = t_i])/τ − 2·g_ppd·(1 − S_it)·[j = t_i].
Fused backends run an online log-sum-exp over prototype blocks forward and
recompute S in backward, never holding N×C×K.

With ``lse=`` (the log-sum-exp that ``class_scores(..., lse_temperature=τ)`` already
computed) only s_it is computed, by the ``target_similarity`` op (N·D work), and
the gradient of lse flows back through ``class_scores``' own backward: scores,
PPC and PPD together cost 3 similarity GEMMs per step (docs/spec.md §7).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._backend import get_backend, resolve_backend
from ._checks import (
    IGNORE_INDEX,
    check_bool,
    check_choice,
    check_features_and_prototypes,
    check_index_range,
    check_index_tensor,
    check_int,
    check_positive_finite,
    check_tensor,
    sanitize_index,
    valid_index_mask,
)
from ._op_utils import (
    compute_dtype,
    fake_similarity_grads,
    keep_ungiven_grads_none,
    or_empty,
    prototype_grad_or_none,
    reduce_loss,
)
from .target_similarity import _target_similarity_op

OP = "ppc_ppd_loss"
REDUCTIONS = ("mean", "sum", "none")


class PpcPpdLoss(NamedTuple):
    ppc: Tensor
    ppd: Tensor


@torch.library.custom_op("protoseg::ppc_ppd_loss", mutates_args=())
def _ppc_ppd_op(
    x: Tensor, prototypes: Tensor, target: Tensor, normalize: bool, temperature: float,
    ignore_index: int, validate: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    upper = prototypes.shape[0] * prototypes.shape[1]
    if validate:
        check_index_range(OP, "target", target, upper, ignore_index, "flat prototype indices")
    flat_target = sanitize_index(target, upper, ignore_index)
    return get_backend(backend).ppc_ppd_forward(x, prototypes, flat_target, normalize, temperature)


@_ppc_ppd_op.register_fake
def _(x, prototypes, target, normalize, temperature, ignore_index, validate, backend):
    n, dtype = x.shape[0], compute_dtype(x.dtype)
    return x.new_empty(n, dtype=dtype), x.new_empty(n, dtype=dtype), x.new_empty(n, dtype=dtype)


@torch.library.custom_op("protoseg::ppc_ppd_loss_backward", mutates_args=())
def _ppc_ppd_backward_op(
    grad_ppc: Tensor | None, grad_ppd: Tensor | None, x: Tensor, prototypes: Tensor,
    target: Tensor, lse: Tensor, normalize: bool, temperature: float, ignore_index: int,
    need_prototype_grad: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    flat_target = sanitize_index(target, prototypes.shape[0] * prototypes.shape[1], ignore_index)
    grad_x, grad_p = get_backend(backend).ppc_ppd_backward(
        grad_ppc, grad_ppd, x, prototypes, flat_target, lse, normalize, temperature,
        need_prototype_grad,
    )
    return grad_x, or_empty(grad_p, prototypes)


@_ppc_ppd_backward_op.register_fake
def _(grad_ppc, grad_ppd, x, prototypes, target, lse, normalize, temperature, ignore_index,
      need_prototype_grad, backend):
    return fake_similarity_grads(x, prototypes, need_prototype_grad)


def _setup_context(ctx, inputs, output):
    x, prototypes, target, normalize, temperature, ignore_index, _, backend = inputs
    ctx.save_for_backward(x, prototypes, target, output[2])
    ctx.args = (normalize, temperature, ignore_index)
    ctx.backend = backend
    keep_ungiven_grads_none(ctx)


def _backward(ctx, grad_ppc, grad_ppd, grad_lse):
    x, prototypes, target, lse = ctx.saved_tensors
    need_p = ctx.needs_input_grad[1]
    nones = (None,) * 6
    if grad_ppc is None and grad_ppd is None:
        return (None, None, *nones)
    grad_x, grad_p = _ppc_ppd_backward_op(
        grad_ppc, grad_ppd, x, prototypes, target, lse, *ctx.args, need_p, ctx.backend
    )
    return (grad_x, prototype_grad_or_none(grad_p, need_p), *nones)


_ppc_ppd_op.register_autograd(_backward, setup_context=_setup_context)


def _check_lse(lse: object, x: Tensor) -> Tensor:
    """lse [N] in the compute dtype of ``x`` on its device, as class_scores returns it."""
    lse = check_tensor(OP, "lse", lse)
    if lse.dim() != 1 or lse.shape[0] != x.shape[0]:
        raise ValueError(f"{OP}: lse must have shape [N] = ({x.shape[0]},), got shape {tuple(lse.shape)}")
    expected = compute_dtype(x.dtype)
    if lse.dtype != expected:
        raise TypeError(
            f"{OP}: lse must have dtype {expected} (the compute dtype of x's {x.dtype}, what "
            f"class_scores(..., lse_temperature=...) returns), got {lse.dtype}"
        )
    if lse.device != x.device:
        raise ValueError(f"{OP}: lse must be on the same device as x ({x.device}), got {lse.device}")
    return lse


def _losses_from_lse(
    x: Tensor, prototypes: Tensor, target: Tensor, lse: Tensor, normalize: bool,
    temperature: float, ignore_index: int, validate: bool, valid: Tensor,
) -> tuple[Tensor, Tensor]:
    """Per-pixel (ppc, ppd) from the given lse and the gathered target similarity."""
    s = _target_similarity_op(x, prototypes, target, normalize, ignore_index, validate)
    ppc = torch.where(valid, lse - s / temperature, 0.0)
    ppd = torch.where(valid, (1.0 - s) ** 2, 0.0)
    return ppc, ppd


def ppc_ppd_loss(
    x: Tensor,
    prototypes: Tensor,
    target: Tensor,
    *,
    lse: Tensor | None = None,
    normalize: bool = True,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    validate: bool = True,
) -> PpcPpdLoss:
    """Pixel-prototype contrastive (PPC) and distance (PPD) losses.

    Args:
        x: [N, D] pixel embeddings.
        prototypes: [C, K, D] (cast to ``x``'s dtype).
        target: [N] integer flat prototype indices c·K + k, or ``ignore_index``.
        normalize: l2-normalise ``x`` and ``prototypes`` inside the op.
        temperature: τ of the PPC softmax over all C·K prototypes.
        ignore_index: target value of pixels without a loss.
        reduction: ``"mean"`` over valid pixels (0 with zero gradient if none),
            ``"sum"``, or ``"none"`` ([N], 0 at ignored pixels).
        lse: optional [N] log Σ_j exp(S_ij/τ) over all C·K prototypes, as returned by
            ``class_scores(x, prototypes, normalize=normalize, lse_temperature=temperature)``
            (fp32, fp64 for fp64 ``x``). It must come from the same ``x``,
            ``prototypes``, ``normalize`` and temperature: it is used as given, not
            checked against them. Then only the target similarity is computed (N·D
            work) and the PPC normaliser's gradient flows through ``class_scores``.
        validate: raise ``ValueError`` on targets outside [0, C·K) that are not
            ``ignore_index`` (one host sync); with ``False`` they are ignored.

    Returns:
        ``PpcPpdLoss(ppc, ppd)``, fp32 (fp64 for fp64 inputs). Differentiable in
        ``x`` and ``prototypes`` (and ``lse``).

    The 3-GEMM training head (docs/spec.md §7)::

        scores, lse = pk.class_scores(x, prototypes, lse_temperature=tau)
        ppc, ppd = pk.ppc_ppd_loss(x, prototypes, target, lse=lse, temperature=tau)
    """
    x, prototypes = check_features_and_prototypes(OP, x, prototypes)
    target = check_index_tensor(OP, "target", target, x.shape[0], x.device)
    normalize = check_bool(OP, "normalize", normalize)
    temperature = check_positive_finite(OP, "temperature", temperature, x.dtype)
    ignore_index = check_int(OP, "ignore_index", ignore_index)
    reduction = check_choice(OP, "reduction", reduction, REDUCTIONS)
    validate = check_bool(OP, "validate", validate)
    valid = valid_index_mask(target, prototypes.shape[0] * prototypes.shape[1], ignore_index)
    if lse is not None:
        ppc, ppd = _losses_from_lse(
            x, prototypes, target, _check_lse(lse, x), normalize, temperature, ignore_index,
            validate, valid,
        )
        return PpcPpdLoss(reduce_loss(ppc, valid, reduction), reduce_loss(ppd, valid, reduction))
    ppc, ppd, _ = _ppc_ppd_op(
        x, prototypes, target, normalize, temperature, ignore_index, validate,
        resolve_backend(OP, x.device, x.dtype),
    )
    return PpcPpdLoss(reduce_loss(ppc, valid, reduction), reduce_loss(ppd, valid, reduction))
