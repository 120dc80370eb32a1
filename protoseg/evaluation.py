"""Evaluation: predictions at the input resolution (:func:`predict_logits`,
:func:`predict_classes`), confusion matrix, per-class IoU, mIoU, and the result table."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import protoseg_kernels as pk

from .head import HeadOutput
from .loss import upsample_logits

Source = nn.Module | HeadOutput | Tensor  # what the prediction helpers take: a model, or what it returned


def _size_of(target: Tensor | Sequence[int]) -> tuple[int, int]:
    """(H, W) of a size or of a tensor whose last two dims are H × W (images, labels)."""
    if isinstance(target, Tensor):
        if target.dim() < 2:
            raise ValueError(f"a tensor giving the output size needs at least 2 dims (…, H, W), got "
                             f"shape {tuple(target.shape)}")
        return int(target.shape[-2]), int(target.shape[-1])
    if isinstance(target, HeadOutput) or not isinstance(target, Sequence) or len(target) != 2:
        raise TypeError(f"the output size must be (H, W) or a tensor [..., H, W], got {type(target).__name__}")
    return int(target[0]), int(target[1])


def _run(model: nn.Module, images: object) -> object:
    """``model(images)`` in eval mode without autograd; restores the training mode."""
    if not isinstance(images, Tensor) or images.dim() != 4:
        got = f"shape {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise TypeError(f"a model is predicted on images [b, C, H, W], got {got} (to upsample what a model "
                        "returned, pass that output and the size: predict_logits(output, (H, W)))")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(images)
    finally:
        model.train(was_training)


def _output_of(source: Source, target: Tensor | Sequence[int]) -> tuple[HeadOutput | Tensor, tuple[int, int]]:
    """(a head's output or logits, the size to predict at) for a model and images, or an output
    and a size."""
    if isinstance(source, nn.Module):
        output, size = _run(source, target), _size_of(target)
    else:
        output, size = source, _size_of(target)
    if isinstance(output, HeadOutput) or (isinstance(output, Tensor) and output.dim() == 4):
        return output, size
    if isinstance(output, Tensor):
        got = f"shape {tuple(output.shape)}"
    elif isinstance(output, Mapping):
        got = f"{type(output).__name__} with keys {list(output)}"
    else:
        got = type(output).__name__
    raise TypeError(f"expected a head's HeadOutput or logits [b, C, h, w], got {got} (a torchvision "
                    "segmentation model returns a dict: put its backbone and the head in a SegmentationModel, "
                    "see docs/integration.md)")


def _hssn_head(output: HeadOutput | Tensor, head: nn.Module | None) -> nn.Module | None:
    """The HSSN head an output with node logits needs (for its hierarchy and rule), else None."""
    if not isinstance(output, HeadOutput) or output.nodes is None:
        return None
    if head is None or not hasattr(head, "hierarchy"):
        raise ValueError("an HSSN head's output (node logits) is predicted with its hierarchy: pass the head, "
                         "head=model.head")
    return head


def _default_head(source: Source, head: nn.Module | None) -> nn.Module | None:
    return head if head is not None else getattr(source, "head", None)


def predict_logits(source: Source, target: Tensor | Sequence[int], *, head: nn.Module | None = None) -> Tensor:
    """Class scores [b, C, H, W] at the input resolution, for every head.

    ``source``: a model (a :class:`~protoseg.SegmentationModel`, or any module returning a
    :class:`~protoseg.HeadOutput` or logits [b, C, h, w]) run on ``target`` = images
    [b, C_in, H, W] in eval mode without autograd (its training mode is restored); or what a
    model returned (a ``HeadOutput`` or logits) with ``target`` the size (H, W) or a tensor of
    that size (the images [b, C_in, H, W] or labels [b, H, W]).

    The logits (``seg``) are upsampled bilinearly with ``align_corners=True``, as the losses and
    the evaluation do, in fp32 at least. An HSSN output (node logits) gives the leaf scores of
    the head's rule on the upsampled node logits (``pk.hierarchy_scores``), whose argmax is
    ``HSSNHead.predict``; it needs the head: ``head`` (default: ``source.head``).
    """
    output, size = _output_of(source, target)
    hssn = _hssn_head(output, _default_head(source, head))
    if hssn is not None:
        return pk.hierarchy_scores(upsample_logits(output.nodes.float(), size), hssn.hierarchy, rule=hssn.rule)
    logits = output if isinstance(output, Tensor) else output.seg
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return upsample_logits(logits, size)


def predict_classes(source: Source, target: Tensor | Sequence[int], *, head: nn.Module | None = None) -> Tensor:
    """Class ids [b, H, W] (int64) at the input resolution: the argmax of :func:`predict_logits`
    (same arguments), or the head's own ``predict(output, size)`` where it has one (the HSSN
    head), as :func:`evaluate` predicts."""
    output, size = _output_of(source, target)
    return _classes(output, size, _default_head(source, head))


def _classes(output: HeadOutput | Tensor, size: tuple[int, int], head: nn.Module | None) -> Tensor:
    predict = getattr(head, "predict", None)
    if callable(predict) and isinstance(output, HeadOutput):
        return predict(output, size)
    return predict_logits(output, size, head=head).argmax(dim=1)


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
    head = getattr(model, "head", None)
    was_training = model.training
    model.eval()
    matrix = ConfusionMatrix(num_classes, ignore_index, device)
    try:
        for images, labels in batches:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                output = model(images)
            matrix.update(_classes(output, _size_of(labels), head), labels)
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
