"""Reference kernels of ``pixel_contrast_loss`` (docs/spec.md §10.1): per-anchor losses and the
per-anchor statistics backward needs; the reduction is done by the op.

It builds the A×M logits and masks (it is the oracle, not the fast path) and stays in the
log domain throughout: every exponential it takes is of a non-positive number or bounded
by log |P(i)|, so small temperatures cannot overflow.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import compute_dtype, normalize_rows, normalize_rows_backward


def _prepared(anchors: Tensor, contrast: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    """(â [A, D], ĉ [M, D]) in the compute dtype."""
    dtype = compute_dtype(anchors)
    a, c = anchors.to(dtype), contrast.to(dtype)
    if normalize:
        a, c = normalize_rows(a), normalize_rows(c)
    return a, c


def _positive_and_negative_masks(
    anchor_labels: Tensor, contrast_labels: Tensor, in_batch: bool
) -> tuple[Tensor, Tensor]:
    """[A, M] masks of P(i) and N(i): both ends labelled (not -1), self excluded in-batch."""
    takes_part = (anchor_labels >= 0).unsqueeze(1) & (contrast_labels >= 0).unsqueeze(0)
    if in_batch:
        eye = torch.eye(anchor_labels.shape[0], dtype=torch.bool, device=anchor_labels.device)
        takes_part &= ~eye
    same = anchor_labels.unsqueeze(1) == contrast_labels.unsqueeze(0)
    return takes_part & same, takes_part & ~same


def _logits_and_masks(
    anchors: Tensor, anchor_labels: Tensor, contrast: Tensor, contrast_labels: Tensor,
    in_batch: bool, normalize: bool, temperature: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(ℓ [A, M], P mask, N mask, â, ĉ)."""
    a, c = _prepared(anchors, contrast, normalize)
    positive, negative = _positive_and_negative_masks(anchor_labels, contrast_labels, in_batch)
    return a @ c.T / temperature, positive, negative, a, c


def _masked_logsumexp(values: Tensor, mask: Tensor) -> Tensor:
    """Row-wise log Σ_{mask} e^values; -inf for a row with an empty mask."""
    return torch.logsumexp(values.masked_fill(~mask, float("-inf")), dim=1)


def pixel_contrast_forward(
    anchors: Tensor, anchor_labels: Tensor, contrast: Tensor, contrast_labels: Tensor,
    in_batch: bool, normalize: bool, temperature: float, base_temperature: float, supcon: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    logits, positive, negative, _, _ = _logits_and_masks(
        anchors, anchor_labels, contrast, contrast_labels, in_batch, normalize, temperature
    )
    positives = positive.sum(1)
    scale = temperature / base_temperature
    if supcon:
        log_norm = _masked_logsumexp(logits, positive | negative)
        mean_positive = torch.where(positive, logits, 0).sum(1) / positives.clamp_min(1)
        loss = torch.where(positives > 0, scale * (log_norm - mean_positive), 0)
        return loss, positives, log_norm, logits.new_empty(0)
    log_norm = _masked_logsumexp(logits, negative)  # log N_i
    # log(e^{ℓ_ip} + N_i) for every entry; only the positives' are used.
    log_denominator = torch.logaddexp(logits, log_norm.unsqueeze(1))
    # log(e^ℓ + N) − ℓ written as softplus(log N − ℓ) = log(1 + e^{log N − ℓ}), the form the
    # fused kernels use: equal for finite ℓ, and its limit 0 (not inf − inf = NaN) for ℓ = +inf.
    softplus = torch.logaddexp(torch.zeros_like(logits), log_norm.unsqueeze(1) - logits)
    terms = torch.where(positive, softplus, 0)
    loss = scale * terms.sum(1) / positives.clamp_min(1)
    log_b = _masked_logsumexp(-log_denominator, positive)  # log Σ_p 1/(e^{ℓ_ip} + N_i)
    return loss, positives, log_norm, log_b


def _logit_gradient(
    grad_loss: Tensor, logits: Tensor, positive: Tensor, negative: Tensor, positives: Tensor,
    log_norm: Tensor, log_b: Tensor, scale: float, supcon: bool,
) -> Tensor:
    """∂(Σ_i g_i·loss_i)/∂ℓ [A, M]; rows of anchors without a positive are 0."""
    has_positive = positives > 0
    coefficient = torch.where(has_positive, grad_loss.to(logits.dtype) * scale, 0)  # g_i·τ/τ_b
    w = (coefficient / positives.clamp_min(1)).unsqueeze(1)  # w_i = g_i·(τ/τ_b)/|P(i)|
    if supcon:
        softmax = torch.exp(logits - log_norm.unsqueeze(1))
        on_all = torch.where(positive | negative, coefficient.unsqueeze(1) * softmax, 0)
        return on_all - torch.where(positive, w, 0)
    one_minus_sigma = torch.sigmoid(log_norm.unsqueeze(1) - logits)  # N_i/(e^{ℓ_ip} + N_i)
    on_positives = torch.where(positive, -w * one_minus_sigma, 0)
    on_negatives = torch.where(negative, w * torch.exp(logits + log_b.unsqueeze(1)), 0)
    return on_positives + on_negatives


def pixel_contrast_backward(
    grad_loss: Tensor, anchors: Tensor, anchor_labels: Tensor, contrast: Tensor,
    contrast_labels: Tensor, positives: Tensor, log_norm: Tensor, log_b: Tensor, in_batch: bool,
    normalize: bool, temperature: float, base_temperature: float, supcon: bool,
    need_contrast_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    logits, positive, negative, a, c = _logits_and_masks(
        anchors, anchor_labels, contrast, contrast_labels, in_batch, normalize, temperature
    )
    grad_logits = _logit_gradient(
        grad_loss, logits, positive, negative, positives, log_norm, log_b,
        temperature / base_temperature, supcon,
    )
    grad_dot = grad_logits / temperature
    grad_a = grad_dot @ c
    if in_batch:  # the anchors are the contrast set too: add that role before the normalisation
        grad_a = grad_a + grad_dot.T @ a
    if normalize:
        grad_a = normalize_rows_backward(anchors.to(a.dtype), grad_a)
    grad_c = None
    if need_contrast_grad and not in_batch:
        grad_c = grad_dot.T @ a
        if normalize:
            grad_c = normalize_rows_backward(contrast.to(c.dtype), grad_c)
        grad_c = grad_c.to(contrast.dtype)
    return grad_a.to(anchors.dtype), grad_c
