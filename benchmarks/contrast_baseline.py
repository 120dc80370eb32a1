"""The naive ContrastiveSeg pixel-contrast loss (docs/spec.md §12): the baseline of the
pixel-contrast benchmark rows.

Written the way the original ``_contrastive`` is, on purpose: the dense A×M logits, a
float mask of equal labels, the negative mask, the self-exclusion mask built by
``scatter_``, ``exp`` of the whole logit matrix, the negatives' sum, ``log`` of
``exp + negatives``, and a masked mean over the positives. Every one of those is an A×M
tensor that autograd keeps for backward. Do not optimise this file: it is what users run.

Deviations from the original, each needed to compute the loss docs/spec.md §10.1 defines:
anchors come flat ([A, D], not [classes, views, D]); entries labelled ``ignore_index``
(empty bank slots) are masked out of the contrast set; the self-exclusion applies only
in-batch (the original also drops column i of the bank for anchor i); an anchor without a
positive is left out of the mean (the original divides 0 by 0 and returns NaN).
``denominator="supcon"`` swaps the per-positive denominator for SupCon's (all columns).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DENOMINATORS = ("contrastiveseg", "supcon")


def contrastive_loss(
    anchors: Tensor,
    anchor_labels: Tensor,
    contrast: Tensor | None = None,
    contrast_labels: Tensor | None = None,
    *,
    temperature: float = 0.1,
    base_temperature: float = 0.07,
    normalize: bool = True,
    denominator: str = "contrastiveseg",
    ignore_index: int = -1,
) -> Tensor:
    """Mean pixel-contrast loss over the anchors with a positive (0 when none has)."""
    if denominator not in DENOMINATORS:
        raise ValueError(f"denominator must be one of {DENOMINATORS}, got {denominator!r}")
    if normalize:  # the original's projection head normalises before the loss
        anchors = F.normalize(anchors, p=2, dim=1)
        contrast = None if contrast is None else F.normalize(contrast, p=2, dim=1)
    in_batch = contrast is None
    anchor_feature = anchors
    contrast_feature, y_contrast = (anchors, anchor_labels) if in_batch else (contrast, contrast_labels)
    anchor_num = anchor_feature.shape[0]

    y_anchor = anchor_labels.contiguous().view(-1, 1)
    y_contrast = y_contrast.contiguous().view(-1, 1)
    kept = (y_contrast != ignore_index).float().T  # [1, M]: empty slots take no part
    mask = torch.eq(y_anchor, y_contrast.T).float() * kept

    anchor_dot_contrast = torch.div(torch.matmul(anchor_feature, contrast_feature.T), temperature)
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()

    neg_mask = (1 - torch.eq(y_anchor, y_contrast.T).float()) * kept
    logits_mask = torch.ones_like(mask)
    if in_batch:
        self_index = torch.arange(anchor_num, device=mask.device).view(-1, 1)
        logits_mask = logits_mask.scatter_(1, self_index, 0)
    mask = mask * logits_mask

    exp_logits = torch.exp(logits)
    if denominator == "contrastiveseg":
        neg_logits = exp_logits * neg_mask
        neg_logits = neg_logits.sum(1, keepdim=True)
        log_prob = logits - torch.log(exp_logits + neg_logits)
    else:
        all_logits = (exp_logits * (mask + neg_mask)).sum(1, keepdim=True)
        log_prob = logits - torch.log(all_logits)

    positives = mask.sum(1)
    mean_log_prob_pos = (mask * log_prob).sum(1) / positives.clamp_min(1)
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    has_positive = (positives > 0).to(loss.dtype)
    return (loss * has_positive).sum() / has_positive.sum().clamp_min(1)
