"""``PixelPrototypeCELoss``: segmentation cross-entropy + weighted PPC + PPD (docs/spec.md §8.7),
for a contrast head + λ·pixel contrast, for the HSSN head + its hierarchy terms (docs/spec.md §12)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import protoseg_kernels as pk

from .head import HeadOutput, _check_non_negative_float
from .labels import check_labels


class LossTerms(NamedTuple):
    """``loss`` = ``ce`` + ppc_weight·``ppc`` + ppd_weight·``ppd`` + contrast_weight·``contrast``
    + ``tree_min`` + ``level_ce`` + ``triplet`` (the first four unweighted; the hierarchy terms
    as the HSSN head weights them; a term is zero when the head did not compute it in that step)."""

    loss: Tensor
    ce: Tensor
    ppc: Tensor
    ppd: Tensor
    contrast: Tensor
    tree_min: Tensor
    level_ce: Tensor
    triplet: Tensor


HEAD_TERMS = ("ppc", "ppd", "contrast", "tree_min", "level_ce", "triplet")  # loss terms a head computes


def upsample_logits(seg: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear upsampling with ``align_corners=True``, as the original code does."""
    if tuple(seg.shape[-2:]) == tuple(size):
        return seg
    return F.interpolate(seg, size=tuple(size), mode="bilinear", align_corners=True)


class PixelPrototypeCELoss(nn.Module):
    """CE on the logits upsampled to the label size, plus the head's PPC, PPD and pixel
    contrast losses.

    Args:
        ppc_weight, ppd_weight: weights of the PPC and PPD terms (0.01 and 0.001 in
            the original code).
        contrast_weight: λ of the pixel contrast (ContrastiveSeg: 0.1 in-batch, 1 with
            the memory bank).
        ignore_index: label of unlabelled pixels (-1, ``pk.IGNORE_INDEX``, by default).
        class_weights: optional per-class CE weights (the mean is then weighted, as
            ``F.cross_entropy`` does).
        validate_labels: check that ``labels`` are [b, H, W] classes in [0, C) or
            ``ignore_index`` (one host synchronisation per call, inside a compiled graph
            too); a head that checks the same labels (``validate_labels=True``) makes this
            redundant, and the trainer then turns it off.
        process_group: with ``validate_labels``, makes the check collective (every rank
            raises the same error; see ``protoseg.labels.check_labels``).

    The CE is 0 with zero gradient on a batch without labelled pixels
    (``F.cross_entropy`` gives NaN there).
    """

    def __init__(
        self,
        ppc_weight: float = 0.01,
        ppd_weight: float = 0.001,
        ignore_index: int = pk.IGNORE_INDEX,
        class_weights: Sequence[float] | Tensor | None = None,
        contrast_weight: float = 0.1,
        validate_labels: bool = True,
        process_group: Any | None = None,
    ) -> None:
        super().__init__()
        self.validate_labels = bool(validate_labels)
        self.process_group = process_group
        self.ppc_weight = _check_non_negative_float("ppc_weight", ppc_weight)
        self.ppd_weight = _check_non_negative_float("ppd_weight", ppd_weight)
        self.contrast_weight = _check_non_negative_float("contrast_weight", contrast_weight)
        self.ignore_index = int(ignore_index)
        weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        if weights is not None and (weights.dim() != 1 or not bool((weights >= 0).all())):
            raise ValueError(f"class_weights must be a 1-D sequence of non-negative numbers, got {class_weights!r}")
        self.register_buffer("class_weights", weights, persistent=False)

    def forward(self, output: HeadOutput | Tensor, labels: Tensor) -> LossTerms:
        """``output``: a head's :class:`HeadOutput` or plain logits [b, C, h, w];
        ``labels``: [b, H, W]."""
        seg = output if isinstance(output, Tensor) else output.seg
        if self.validate_labels:
            labels = check_labels(labels, seg.shape[0], seg.shape[1], self.ignore_index, self.process_group)
        ce = self.cross_entropy(seg, labels)
        zero = ce.new_zeros(())
        head = None if isinstance(output, Tensor) else output
        ppc, ppd, contrast, tree_min, level_ce, triplet = (
            zero if head is None or getattr(head, name) is None else getattr(head, name) for name in HEAD_TERMS
        )
        loss = (ce + self.ppc_weight * ppc + self.ppd_weight * ppd + self.contrast_weight * contrast
                + tree_min + level_ce + triplet)
        return LossTerms(loss, ce, ppc, ppd, contrast, tree_min, level_ce, triplet)

    def cross_entropy(self, seg: Tensor, labels: Tensor) -> Tensor:
        num_classes = seg.shape[1]
        if self.class_weights is not None and self.class_weights.numel() != num_classes:
            raise ValueError(f"class_weights has {self.class_weights.numel()} entries for {num_classes} classes")
        return masked_cross_entropy(upsample_logits(seg, labels.shape[-2:]), labels, self.ignore_index,
                                    self.class_weights)


def masked_cross_entropy(
    logits: Tensor, labels: Tensor, ignore_index: int, class_weights: Tensor | None = None
) -> Tensor:
    """Mean cross-entropy of logits [b, C, H, W] against labels [b, H, W] over the labelled pixels
    (weighted by ``class_weights`` [C] as ``F.cross_entropy`` does); computed in fp32 at least;
    0 with zero gradient when no pixel is labelled (``F.cross_entropy`` gives NaN there)."""
    num_classes = logits.shape[1]
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # the loss in fp32 under mixed precision
    labels = labels.long()
    weights = None if class_weights is None else class_weights.to(logits.dtype)
    total = F.cross_entropy(logits, labels, weight=weights, ignore_index=ignore_index, reduction="sum")
    labelled = labels != ignore_index
    if weights is None:
        denominator = labelled.sum().to(total.dtype)
    else:
        denominator = weights[labels.clamp(0, num_classes - 1)][labelled].sum()
    # The sum is exactly 0 when nothing is labelled, so the clamp only avoids 0/0.
    return total / denominator.clamp_min(torch.finfo(total.dtype).tiny)
