"""The original HSSN losses (docs/spec.md §12): the baselines of the hierarchy benchmark rows.

Written the way the original code writes them, on purpose; do not optimise this file, it is
what users run.

* :func:`prepare_targets` and :func:`losses_hiera_focal`, the tree-min loss: the sigmoid of
  all V logits (a copy), void labels overwritten with 0, ``F.one_hot(...).permute(0, 3, 1, 2)``
  int64 targets for the leaves and for the superclasses (superclass label = the leaf label's
  parent, built by one masked write per leaf), MCMB (the superclasses' max over themselves and
  their leaves) filled group by group in a Python loop, MCLA (each leaf's min with its
  superclass) filled in a double loop over groups and leaves, then the focal loss of each level
  as full [B, C, H, W] / [B, 7, H, W] temporaries, each level divided by its valid pixels and
  its number of nodes, the sum times 5.
* :class:`TreeTripletLoss`: labels and features flattened (a permuted copy of the features),
  ``torch.unique`` of the labels, then per present class: boolean anchor, positive and
  negative masks over all pixels, ``min_size`` from their sums (host synchronisations),
  ``feats[mask][:min_size]`` gathers (copies of every masked row before the slice), the two
  distances written into a zero [min_size, 2] tensor, relu, mean; the sum over classes
  divided by their count.

Deviations from the original, each needed for the baseline to compute what
``pk.tree_min_loss`` / ``pk.tree_triplet_loss`` compute (so that the rows compare like with
like):

* Both work on clones of the labels: the original writes 0 into the caller's labels at void
  pixels (``targets[void] = 0``), which would change the benchmark's inputs after the first
  run (and makes the original's cross-entropy terms treat void as class 0, docs/spec.md §12).
* Void is ``ignore_index`` (default −1, the ops' default) instead of the literal 255, and the
  superclass labels of void pixels start at ``ignore_index`` instead of 255.
* Tensors are created on the inputs' device instead of with ``.cuda()``, and the number of
  superclasses is ``len(indices_high)`` (the original's literal 7 for Cityscapes).
* ``losses_hiera_focal`` takes γ as an argument (the original's default 2 is kept); γ = 0
  gives the original's non-focal ``losses_hiera``.
* The triplet's negatives exclude ignored pixels (``exclude_ignored_negatives=True``): the
  original's ``(labels < lo) | (labels >= hi)`` counts them as negatives (255 ≥ hi; −1 < lo
  likewise), docs/spec.md §11.2 does not. ``exclude_ignored_negatives=False`` keeps the
  original's rule.
* The triplet's labels come at the embedding's resolution, so its ``F.interpolate`` of the
  full-resolution labels is left out (the same work for every implementation); with no
  class having a triplet the original returns ``None`` (:func:`triplet_loss_or_zero` makes
  that a zero loss connected to the graph, for backward).
* The margin is an argument (the original's 0.6 is the default).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The original's Cityscapes hierarchy: superclass ii covers the leaves
# indices_high[ii][0] <= leaf < indices_high[ii][1]; hiera_map[leaf] is its superclass.
CITYSCAPES_HIERA = {
    "hiera_high": {
        "flat": [0, 2],
        "construction": [2, 5],
        "object": [5, 8],
        "nature": [8, 10],
        "sky": [10, 11],
        "human": [11, 13],
        "vehicle": [13, 19],
    }
}
CITYSCAPES_HIERA_INDEX = [[0, 2], [2, 5], [5, 8], [8, 10], [10, 11], [11, 13], [13, 19]]
CITYSCAPES_HIERA_MAP = [0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 5, 6, 6, 6, 6, 6, 6]
CITYSCAPES_NUM_CLASSES = 19


def prepare_targets(targets: Tensor, hiera: dict = CITYSCAPES_HIERA, ignore_index: int = -1
                    ) -> tuple[Tensor, Tensor, list[list[int]]]:
    """The original ``prepare_targets``: (leaf labels, superclass labels, superclass index
    ranges); superclass labels by one masked write per leaf."""
    b, h, w = targets.shape
    targets_high = torch.ones((b, h, w), dtype=targets.dtype, device=targets.device) * ignore_index
    indices_high = []
    for index, high in enumerate(hiera["hiera_high"].keys()):
        indices = hiera["hiera_high"][high]
        for ii in range(indices[0], indices[1]):
            targets_high[targets == ii] = index
        indices_high.append(indices)
    return targets, targets_high, indices_high


def losses_hiera_focal(predictions: Tensor, targets: Tensor, targets_top: Tensor, num_classes: int,
                       indices_high: list[list[int]], eps: float = 1e-8, gamma: float = 2,
                       ignore_index: int = -1) -> Tensor:
    """The original ``losses_hiera_focal`` (tree-min loss with focal weighting) on logits
    [B, num_classes + 7, H, W]; labels are cloned, not overwritten (module docstring)."""
    targets, targets_top = targets.clone(), targets_top.clone()
    num_high = len(indices_high)
    b, _, h, w = predictions.shape
    predictions = torch.sigmoid(predictions.float())
    void_indices = (targets == ignore_index)
    targets[void_indices] = 0
    targets = F.one_hot(targets, num_classes=num_classes).permute(0, 3, 1, 2)
    void_indices2 = (targets_top == ignore_index)
    targets_top[void_indices2] = 0
    targets_top = F.one_hot(targets_top, num_classes=num_high).permute(0, 3, 1, 2)

    MCMA = predictions[:, :num_classes, :, :]
    MCMB = torch.zeros((b, num_high, h, w), device=predictions.device)

    for ii in range(num_high):
        MCMB[:, ii:ii + 1, :, :] = torch.max(
            torch.cat([predictions[:, indices_high[ii][0]:indices_high[ii][1], :, :],
                       predictions[:, num_classes + ii:num_classes + ii + 1, :, :]], dim=1), 1, True)[0]

    MCLB = predictions[:, num_classes:num_classes + num_high, :, :]
    MCLA = predictions[:, :num_classes, :, :].clone()
    for ii in range(num_high):
        for jj in range(indices_high[ii][0], indices_high[ii][1]):
            MCLA[:, jj:jj + 1, :, :] = torch.min(
                torch.cat([predictions[:, jj:jj + 1, :, :], MCLB[:, ii:ii + 1, :, :]], dim=1), 1, True)[0]

    valid_indices = (~void_indices).unsqueeze(1)
    num_valid = valid_indices.sum()
    valid_indices2 = (~void_indices2).unsqueeze(1)
    num_valid2 = valid_indices2.sum()
    # channel_min
    loss = ((-targets[:, :num_classes, :, :] * torch.pow((1.0 - MCLA), gamma) * torch.log(MCLA + eps)
             - (1.0 - targets[:, :num_classes, :, :]) * torch.pow(MCMA, gamma) * torch.log(1.0 - MCMA + eps))
            * valid_indices).sum() / num_valid / num_classes
    loss += ((-targets_top[:, :, :, :] * torch.pow((1.0 - MCLB), gamma) * torch.log(MCLB + eps)
              - (1.0 - targets_top[:, :, :, :]) * torch.pow(MCMB, gamma) * torch.log(1.0 - MCMB + eps))
             * valid_indices2).sum() / num_valid2 / num_high

    return 5 * loss


def tree_min_loss(logits: Tensor, labels: Tensor, gamma: float = 2, eps: float = 1e-8,
                  ignore_index: int = -1) -> Tensor:
    """The original's tree-min term of the Cityscapes HSSN loss: ``prepare_targets`` then
    ``losses_hiera_focal`` (logits [B, 26, H, W], labels [B, H, W])."""
    targets, targets_top, indices_top = prepare_targets(labels, ignore_index=ignore_index)
    return losses_hiera_focal(logits, targets, targets_top, CITYSCAPES_NUM_CLASSES, indices_top,
                              eps=eps, gamma=gamma, ignore_index=ignore_index)


class TreeTripletLoss(nn.Module):
    """The original ``TreeTripletLoss``; ``forward`` returns (loss or None, class count)."""

    def __init__(self, num_classes: int = CITYSCAPES_NUM_CLASSES, hiera_map: list[int] = CITYSCAPES_HIERA_MAP,
                 hiera_index: list[list[int]] = CITYSCAPES_HIERA_INDEX, ignore_index: int = -1,
                 margin: float = 0.6, exclude_ignored_negatives: bool = True) -> None:
        super().__init__()

        self.ignore_label = ignore_index
        self.num_classes = num_classes
        self.hiera_map = hiera_map
        self.hiera_index = hiera_index
        self.margin = margin
        self.exclude_ignored_negatives = exclude_ignored_negatives

    def forward(self, feats: Tensor, labels: Tensor, max_triplet: int = 200) -> tuple[Tensor | None, Tensor]:
        # The original's labels.unsqueeze(1).float().clone() and F.interpolate to the features'
        # size: the labels come at that size already (module docstring).
        labels = labels.clone()
        assert labels.shape[-1] == feats.shape[-1], f'{labels.shape} {feats.shape}'

        labels = labels.view(-1)
        feats = feats.permute(0, 2, 3, 1)
        feats = feats.contiguous().view(-1, feats.shape[-1])

        triplet_loss = 0
        exist_classes = torch.unique(labels)
        exist_classes = [x for x in exist_classes if x != self.ignore_label]
        class_count = 0

        for ii in exist_classes:
            index_range = self.hiera_index[self.hiera_map[ii]]
            index_anchor = labels == ii
            index_pos = (labels >= index_range[0]) & (labels < index_range[-1]) & (~index_anchor)
            index_neg = (labels < index_range[0]) | (labels >= index_range[-1])
            if self.exclude_ignored_negatives:
                index_neg = index_neg & (labels != self.ignore_label)

            min_size = min(torch.sum(index_anchor), torch.sum(index_pos), torch.sum(index_neg), max_triplet)

            feats_anchor = feats[index_anchor][:min_size]
            feats_pos = feats[index_pos][:min_size]
            feats_neg = feats[index_neg][:min_size]

            distance = torch.zeros(min_size, 2, device=feats.device)
            distance[:, 0:1] = 1 - (feats_anchor * feats_pos).sum(1, True)
            distance[:, 1:2] = 1 - (feats_anchor * feats_neg).sum(1, True)

            # margin always 0.1 + (4-2)/4 since the hierarchy is three level
            margin = self.margin * torch.ones(min_size, device=feats.device)

            tl = distance[:, 0] - distance[:, 1] + margin
            tl = F.relu(tl)

            if tl.size(0) > 0:
                triplet_loss += tl.mean()
                class_count += 1
        if class_count == 0:
            return None, torch.tensor([0], device=feats.device)
        triplet_loss /= class_count
        return triplet_loss, torch.tensor([class_count], device=feats.device)


def triplet_loss_or_zero(criterion: TreeTripletLoss, feats: Tensor, labels: Tensor, max_triplet: int = 200
                         ) -> Tensor:
    """The triplet loss, or a zero connected to ``feats`` when no class has a triplet."""
    loss, _ = criterion(feats, labels, max_triplet=max_triplet)
    return feats.sum() * 0 if loss is None else loss
