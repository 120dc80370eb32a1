"""``pixel_contrast_loss``: ContrastiveSeg's supervised pixel contrast (docs/spec.md §10.1).

Anchors a_i [A, D] with labels y_i; a contrast set c_j [M, D] with labels z_j (a memory
bank), or, without one, the anchors themselves (in-batch: j ≠ i). With â, ĉ
l2-normalised (``normalize=True``) and ℓ_ij = ⟨â_i, ĉ_j⟩/τ:

    P(i) = {j : z_j = y_i},  N(i) = {j : z_j ≠ y_i}   (labelled j only; j ≠ i in-batch)
    s = τ/τ_b,  w_i = g_i·s/|P(i)|   (g_i: the upstream gradient of loss_i)

* ``denominator="contrastiveseg"`` (the original: every positive has its own denominator),
  with N_i = Σ_{k∈N(i)} e^{ℓ_ik}:
      loss_i = (s/|P(i)|)·Σ_{p∈P(i)} [log(e^{ℓ_ip} + N_i) − ℓ_ip]
      ∂/∂ℓ_ip = −w_i·(1 − σ_ip),   σ_ip = e^{ℓ_ip}/(e^{ℓ_ip} + N_i)
      ∂/∂ℓ_ik = w_i·e^{ℓ_ik}·B_i,  B_i = Σ_p 1/(e^{ℓ_ip} + N_i)
* ``denominator="supcon"`` (Khosla et al. 2020), with LSE_i = log Σ_{j∈P(i)∪N(i)} e^{ℓ_ij}:
      loss_i = s·[LSE_i − (1/|P(i)|)·Σ_p ℓ_ip]
      ∂/∂ℓ_ij = g_i·s·e^{ℓ_ij − LSE_i} − w_i·[j ∈ P(i)]       (j ∈ P(i) ∪ N(i))

Then dâ_i = Σ_j ∂ℓ_ij·ĉ_j/τ, dĉ_j = Σ_i ∂ℓ_ij·â_i/τ and, with ``normalize``, through
x̂ = x/max(‖x‖, 1e-12): dx = (dx̂ − x̂⟨dx̂, x̂⟩)/‖x‖. In-batch, each anchor gets both
gradients (its roles as anchor and as contrast entry). An anchor that is ignored or has
no positive has loss 0 and a zero gradient row.

The kernels return, besides loss [A], the per-anchor scalars the backward needs:
|P(i)|, log N_i (contrastiveseg) or LSE_i (supcon), and log B_i (contrastiveseg). Given
them, the backward is a function of ℓ_ij alone, so a fused backend recomputes ℓ tile by
tile and never holds anything of size A·M (docs/spec.md §10.1).

GEMM-pass floor (one pass = the A×D×M product; in-batch M = A), forward + backward:

* contrastiveseg: forward 2 (pass 1: online log N_i over column tiles; pass 2 recomputes ℓ
  for Σ_p log(1 + N_i e^{−ℓ_ip}) and log B_i, which need the final N_i). With a constant
  bank backward is 2 (recompute, dA): 4 in all. A contrast gradient (in-batch, or a bank
  that requires grad) adds dC: 3 in backward where one recomputed tile feeds both
  products, 4 where, to stay deterministic without float atomics, dC comes from a second
  sweep that recomputes ℓ. When the positives of every row tile are a few column ranges (a
  bank stored by class, anchors taken in label order), pass 2 only visits those columns:
  forward ≈ 1 + 1/C.
* supcon: forward 1 (LSE_i, Σ_p ℓ_ip and |P(i)| are all online), backward as above:
  3 in all with a constant bank, 4-5 with a contrast gradient.

What each backend realises (docs/spec.md §10.1): cpu (csrc/cpu/pixel_contrast_loss.cpp)
sorts the anchors by label and skips the column blocks without positives in pass 2, and
takes the in-batch column role from the same recomputed tiles; triton
(protoseg_kernels/triton/pixel_contrast_loss.py) and cuda (csrc/cuda/pixel_contrast_loss.cu)
visit every column in both passes and take dC from a second sweep.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._backend import get_backend, resolve_backend
from ._checks import (
    IGNORE_INDEX,
    check_bool,
    check_choice,
    check_class_ids,
    check_float_tensor,
    check_index_tensor,
    check_int,
    check_positive_finite,
    sanitize_class_ids,
)
from ._op_utils import compute_dtype, keep_ungiven_grads_none, or_empty, reduce_loss

OP = "pixel_contrast_loss"
DENOMINATORS = ("contrastiveseg", "supcon")
REDUCTIONS = ("mean", "sum", "none")


def _labels_for_kernels(
    anchor_labels: Tensor, contrast_labels: Tensor | None, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """Sanitised (anchor, contrast) labels; in-batch the contrast labels are the anchors'."""
    anchors = sanitize_class_ids(anchor_labels, ignore_index)
    return anchors, anchors if contrast_labels is None else sanitize_class_ids(contrast_labels, ignore_index)


@torch.library.custom_op("protoseg::pixel_contrast_loss", mutates_args=())
def _pixel_contrast_op(
    anchors: Tensor, anchor_labels: Tensor, contrast: Tensor | None, contrast_labels: Tensor | None,
    normalize: bool, temperature: float, base_temperature: float, supcon: bool, ignore_index: int,
    validate: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if validate:
        check_class_ids(OP, "anchor_labels", anchor_labels, ignore_index)
        if contrast_labels is not None:
            check_class_ids(OP, "contrast_labels", contrast_labels, ignore_index)
    labels, column_labels = _labels_for_kernels(anchor_labels, contrast_labels, ignore_index)
    in_batch = contrast is None
    return get_backend(backend).pixel_contrast_forward(
        anchors, labels, anchors if in_batch else contrast, column_labels, in_batch, normalize,
        temperature, base_temperature, supcon,
    )


@_pixel_contrast_op.register_fake
def _(anchors, anchor_labels, contrast, contrast_labels, normalize, temperature, base_temperature,
      supcon, ignore_index, validate, backend):
    a, dtype = anchors.shape[0], compute_dtype(anchors.dtype)
    return (
        anchors.new_empty(a, dtype=dtype),
        anchors.new_empty(a, dtype=torch.int64),
        anchors.new_empty(a, dtype=dtype),
        anchors.new_empty(0 if supcon else a, dtype=dtype),
    )


@torch.library.custom_op("protoseg::pixel_contrast_loss_backward", mutates_args=())
def _pixel_contrast_backward_op(
    grad_loss: Tensor, anchors: Tensor, anchor_labels: Tensor, contrast: Tensor | None,
    contrast_labels: Tensor | None, positives: Tensor, log_norm: Tensor, log_b: Tensor,
    normalize: bool, temperature: float, base_temperature: float, supcon: bool, ignore_index: int,
    need_contrast_grad: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    """(d anchors, d contrast or an empty tensor); in-batch d anchors sums both roles."""
    labels, column_labels = _labels_for_kernels(anchor_labels, contrast_labels, ignore_index)
    in_batch = contrast is None
    grad_a, grad_c = get_backend(backend).pixel_contrast_backward(
        grad_loss, anchors, labels, anchors if in_batch else contrast, column_labels, positives,
        log_norm, log_b, in_batch, normalize, temperature, base_temperature, supcon,
        need_contrast_grad and not in_batch,
    )
    return grad_a, or_empty(grad_c, anchors)


@_pixel_contrast_backward_op.register_fake
def _(grad_loss, anchors, anchor_labels, contrast, contrast_labels, positives, log_norm, log_b,
      normalize, temperature, base_temperature, supcon, ignore_index, need_contrast_grad, backend):
    grad_c = anchors.new_empty(0) if contrast is None or not need_contrast_grad else torch.empty_like(contrast)
    return torch.empty_like(anchors), grad_c


def _setup_context(ctx, inputs, output):
    anchors, anchor_labels, contrast, contrast_labels, normalize, temperature, base_temperature, \
        supcon, ignore_index, _, backend = inputs
    _, positives, log_norm, log_b = output
    ctx.save_for_backward(anchors, anchor_labels, contrast, contrast_labels, positives, log_norm, log_b)
    ctx.args = (normalize, temperature, base_temperature, supcon, ignore_index)
    ctx.backend = backend
    ctx.mark_non_differentiable(positives, log_norm, log_b)
    keep_ungiven_grads_none(ctx)


def _backward(ctx, grad_loss, grad_positives, grad_log_norm, grad_log_b):
    anchors, anchor_labels, contrast, contrast_labels, positives, log_norm, log_b = ctx.saved_tensors
    nones = (None,) * 8
    need_c = contrast is not None and ctx.needs_input_grad[2]
    if grad_loss is None:
        return (None, None, None, *nones)
    grad_a, grad_c = _pixel_contrast_backward_op(
        grad_loss, anchors, anchor_labels, contrast, contrast_labels, positives, log_norm, log_b,
        *ctx.args, need_c, ctx.backend,
    )
    return (grad_a, None, grad_c if need_c else None, *nones)


_pixel_contrast_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(
    anchors: object, anchor_labels: object, contrast: object, contrast_labels: object
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    anchors = check_float_tensor(OP, "anchors", anchors, 2, "[A, D]")
    if anchors.shape[1] == 0:
        raise ValueError(f"{OP}: anchors must have at least one feature column (D > 0), "
                         f"got shape {tuple(anchors.shape)}")
    anchor_labels = check_index_tensor(
        OP, "anchor_labels", anchor_labels, anchors.shape[0], anchors.device, layout="[A]", owner="anchors"
    )
    if contrast is None:
        if contrast_labels is not None:
            raise ValueError(f"{OP}: contrast_labels was given without contrast; pass both or neither")
        return anchors, anchor_labels, None, None
    contrast = check_float_tensor(OP, "contrast", contrast, 2, "[M, D]")
    if contrast.device != anchors.device:
        raise ValueError(f"{OP}: contrast must be on the same device as anchors ({anchors.device}), "
                         f"got {contrast.device}")
    if contrast.dtype != anchors.dtype:
        raise TypeError(f"{OP}: contrast must have the dtype of anchors ({anchors.dtype}), got {contrast.dtype}")
    if contrast.shape[1] != anchors.shape[1]:
        raise ValueError(f"{OP}: contrast must have the embedding size of anchors (D = {anchors.shape[1]}) "
                         f"in its last dimension, got shape {tuple(contrast.shape)}")
    if contrast_labels is None:
        raise ValueError(f"{OP}: contrast_labels must be given with contrast (shape [M] = ({contrast.shape[0]},))")
    contrast_labels = check_index_tensor(
        OP, "contrast_labels", contrast_labels, contrast.shape[0], anchors.device, layout="[M]", owner="anchors"
    )
    return anchors, anchor_labels, contrast, contrast_labels


def pixel_contrast_loss(
    anchors: Tensor,
    anchor_labels: Tensor,
    contrast: Tensor | None = None,
    contrast_labels: Tensor | None = None,
    *,
    temperature: float = 0.1,
    base_temperature: float = 0.07,
    normalize: bool = True,
    denominator: str = "contrastiveseg",
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    validate: bool = True,
) -> Tensor:
    """Supervised pixel contrastive loss of ContrastiveSeg (formulas in the module docstring).

    Args:
        anchors: [A, D] floating embeddings.
        anchor_labels: [A] integer class ids (>= 0) or ``ignore_index``.
        contrast: [M, D] contrast set of the anchors' dtype and device (e.g. a memory bank),
            or ``None`` to contrast the anchors with each other (self excluded).
        contrast_labels: [M] integer class ids or ``ignore_index`` (an empty bank slot);
            given exactly when ``contrast`` is.
        temperature: τ of the logits ℓ_ij = ⟨â_i, ĉ_j⟩/τ.
        base_temperature: τ_b; the loss is scaled by τ/τ_b.
        normalize: l2-normalise anchors and contrast inside the op (and differentiate
            through it); ``False`` uses plain dot products.
        denominator: ``"contrastiveseg"`` (each positive against the negatives) or
            ``"supcon"`` (each positive against all of P(i) ∪ N(i)).
        ignore_index: label of anchors and contrast entries that take no part.
        reduction: ``"mean"`` over anchors with at least one positive (0 with zero gradient
            when there is none), ``"sum"``, or ``"none"`` ([A], 0 for excluded anchors).
        validate: raise ``ValueError`` on a negative label other than ``ignore_index``
            (one host synchronisation); with ``False`` such labels are ignored. Labels have
            no upper bound: any id >= 0 is a class.

    Returns:
        The loss, fp32 (fp64 for fp64 inputs), differentiable in ``anchors`` and, when it
        requires grad, in ``contrast``.
    """
    anchors, anchor_labels, contrast, contrast_labels = _check_inputs(
        anchors, anchor_labels, contrast, contrast_labels
    )
    temperature = check_positive_finite(OP, "temperature", temperature, anchors.dtype)
    base_temperature = check_positive_finite(OP, "base_temperature", base_temperature, anchors.dtype)
    normalize = check_bool(OP, "normalize", normalize)
    denominator = check_choice(OP, "denominator", denominator, DENOMINATORS)
    ignore_index = check_int(OP, "ignore_index", ignore_index)
    reduction = check_choice(OP, "reduction", reduction, REDUCTIONS)
    validate = check_bool(OP, "validate", validate)
    backend = resolve_backend(OP, anchors.device, anchors.dtype, argument="anchors")
    loss, positives, _, _ = _pixel_contrast_op(
        anchors, anchor_labels, contrast, contrast_labels, normalize, temperature, base_temperature,
        denominator == "supcon", ignore_index, validate, backend,
    )
    return reduce_loss(loss, positives > 0, reduction)
