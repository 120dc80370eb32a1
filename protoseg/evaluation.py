"""Evaluation: confusion matrix, per-class IoU, mIoU, and the result table."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .loss import upsample_logits


class ConfusionMatrix:
    """counts[t, p] = number of labelled pixels of class t predicted as p."""

    def __init__(self, num_classes: int, ignore_index: int, device: torch.device | str = "cpu") -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, prediction: Tensor, labels: Tensor) -> None:
        """Count ``prediction`` against ``labels`` (same shape; classes in [0, C) or, for
        labels, ``ignore_index``). A value outside raises ``ValueError`` naming it (one host
        synchronisation: evaluation reads its results anyway)."""
        if prediction.shape != labels.shape:
            raise ValueError(f"prediction and labels must have the same shape, got {tuple(prediction.shape)} "
                             f"and {tuple(labels.shape)}")
        labelled = labels != self.ignore_index
        for name, values in (("labels", labels[labelled]), ("prediction", prediction[labelled])):
            bad = (values < 0) | (values >= self.num_classes)
            if bool(bad.any()):
                raise ValueError(f"{name} must hold classes in [0, {self.num_classes})"
                                 f"{' or ignore_index=' + str(self.ignore_index) if name == 'labels' else ''}, "
                                 f"found {int(values[bad][0])}")
        pairs = labels[labelled].long() * self.num_classes + prediction[labelled].long()
        self.counts += torch.bincount(pairs, minlength=self.num_classes**2).view(self.num_classes, -1)

    def all_reduce(self, group: Any | None = None) -> None:
        """Sum the counts of every rank (each evaluated its own share of the images)."""
        dist.all_reduce(self.counts, group=group)

    def coarsen(self, groups: Tensor, num_groups: int) -> ConfusionMatrix:
        """The matrix of the classes grouped by ``groups`` [C] (class → group in [0, G)): the
        confusion of a coarser level of a hierarchy, when a prediction's group is the group of
        the predicted class (exact: each pixel's pair (t, p) moves to (groups[t], groups[p]))."""
        groups = groups.to(device=self.counts.device, dtype=torch.int64)
        if groups.shape != (self.num_classes,) or bool(((groups < 0) | (groups >= num_groups)).any()):
            raise ValueError(f"groups must map each of the {self.num_classes} classes to a group in "
                             f"[0, {num_groups}), got {groups.tolist()}")
        coarse = ConfusionMatrix(num_groups, self.ignore_index, self.counts.device)
        pairs = (groups[:, None] * num_groups + groups[None, :]).reshape(-1)
        coarse.counts.view(-1).index_add_(0, pairs, self.counts.reshape(-1))
        return coarse

    def iou(self) -> Tensor:
        """IoU per class (float64); NaN for a class neither present nor predicted."""
        counts = self.counts.double()
        hits = counts.diagonal()
        union = counts.sum(0) + counts.sum(1) - hits
        return torch.where(union > 0, hits / union.clamp_min(1), torch.nan)

    def mean_iou(self) -> float:
        """Mean over the classes with a defined IoU (NaN if none)."""
        iou = self.iou()
        defined = ~iou.isnan()
        return float(iou[defined].mean()) if bool(defined.any()) else math.nan

    def pixel_accuracy(self) -> float:
        total = int(self.counts.sum())
        return float(self.counts.diagonal().sum()) / total if total else math.nan

    def summary(self, class_names: Sequence[str]) -> dict:
        """JSON-ready {"miou", "pixel_accuracy", "iou": {class: value or None}}."""
        return {
            "miou": self.mean_iou(),
            "pixel_accuracy": self.pixel_accuracy(),
            "iou": {name: (None if math.isnan(v) else v) for name, v in zip(class_names, self.iou().tolist())},
        }


def level_summaries(matrix: ConfusionMatrix, hierarchy: Any) -> dict[str, dict]:
    """{"level h": summary} for each internal level h of a :class:`~protoseg_kernels.Hierarchy`,
    from the leaf matrix (a pixel's class at level h is its leaf's ancestor there)."""
    levels = {}
    for height in range(1, hierarchy.depth + 1):
        nodes = hierarchy.level(height)
        names = [hierarchy.names[n] if hierarchy.names else str(n) for n in nodes]
        coarse = matrix.coarsen(hierarchy.leaf_ancestors(height), len(nodes))
        levels[f"level {height}"] = coarse.summary(names)
    return levels


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], num_classes: int, ignore_index: int,
    device: torch.device, amp_dtype: torch.dtype | None = None,
) -> ConfusionMatrix:
    """Predict each batch (logits upsampled to the label size, bilinear with
    align_corners=True, then argmax; or the head's own ``predict(output, size)`` where it
    has one, as the HSSN head) and accumulate the confusion matrix. ``amp_dtype``: run
    the model under autocast to that dtype. Restores the model's training mode."""
    predict = getattr(getattr(model, "head", None), "predict", None)
    was_training = model.training
    model.eval()
    matrix = ConfusionMatrix(num_classes, ignore_index, device)
    try:
        for images, labels in batches:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                output = model(images)
            if predict is not None:
                prediction = predict(output, labels.shape[-2:])
            else:
                prediction = upsample_logits(output.seg.float(), labels.shape[-2:]).argmax(dim=1)
            matrix.update(prediction, labels)
    finally:
        model.train(was_training)
    return matrix


def _percent(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def format_iou_table(class_names: Sequence[str], columns: Mapping[str, Mapping[str, Any]]) -> str:
    """Per-class IoU (%) of one or more runs side by side, then mIoU and pixel accuracy.

    ``columns`` maps a column title to a :meth:`ConfusionMatrix.summary` dict.
    """
    titles = list(columns)
    name_width = max([len("pixel acc."), *map(len, class_names)])
    widths = [max(8, len(title)) for title in titles]

    def row(label: str, cells: Sequence[str]) -> str:
        return "  ".join([label.ljust(name_width), *(cell.rjust(w) for cell, w in zip(cells, widths))])

    lines = [row("class", titles), "-" * len(row("", [""] * len(titles)))]
    for name in class_names:
        lines.append(row(name, [_percent(columns[t]["iou"].get(name)) for t in titles]))
    lines.append(lines[1])
    lines.append(row("mIoU", [_percent(columns[t]["miou"]) for t in titles]))
    lines.append(row("pixel acc.", [_percent(columns[t]["pixel_accuracy"]) for t in titles]))
    return "\n".join(lines)
