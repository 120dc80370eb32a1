"""Literal float64 pixel contrast (docs/spec.md §10.1), written straight from the text: a loop over
anchors, the positive and negative sets as Python lists, one log-sum-exp per positive.
Slow on purpose and differentiable (its autograd gradients check the reference's
hand-written backward)."""

from __future__ import annotations

import torch
from literal import F64, unit
from torch import Tensor


def _rows(t: Tensor, normalize: bool) -> Tensor:
    t = t.to(F64)
    if normalize and t.shape[0]:
        t = torch.stack([unit(v) for v in t])
    return t


def pixel_contrast(
    anchors: Tensor, anchor_labels: Tensor, contrast: Tensor | None = None,
    contrast_labels: Tensor | None = None, *, temperature: float, base_temperature: float,
    normalize: bool = True, denominator: str = "contrastiveseg", ignore_index: int = -1,
    rows: list[int] | None = None,
) -> tuple[Tensor, list[int]]:
    """(loss_i for each anchor i of ``rows`` (default: all), |P(i)| of each)."""
    in_batch = contrast is None
    if in_batch:
        contrast, contrast_labels = anchors, anchor_labels
    a, c = _rows(anchors, normalize), _rows(contrast, normalize)
    y, z = anchor_labels.tolist(), contrast_labels.tolist()
    scale = temperature / base_temperature
    losses, counts = [], []
    for i in range(len(y)) if rows is None else rows:
        positives, negatives = [], []
        if y[i] != ignore_index and y[i] >= 0:
            for j, label in enumerate(z):
                if label == ignore_index or label < 0 or (in_batch and j == i):
                    continue
                (positives if label == y[i] else negatives).append(j)
        counts.append(len(positives))
        if not positives:
            losses.append(a.new_zeros(()))
            continue
        logits = (c @ a[i]) / temperature
        negative_logits = logits[negatives]
        all_logits = logits[positives + negatives]
        terms = []
        for p in positives:
            if denominator == "contrastiveseg":
                log_denominator = torch.logsumexp(torch.cat([logits[p:p + 1], negative_logits]), 0)
            else:
                log_denominator = torch.logsumexp(all_logits, 0)
            terms.append(logits[p] - log_denominator)
        losses.append(-scale * torch.stack(terms).mean())
    return (torch.stack(losses) if losses else a.new_zeros(0)), counts
