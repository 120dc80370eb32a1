"""Inputs of the pixel-contrast tests: clustered embeddings with the label patterns of
docs/spec.md §10.1 that matter (ignored anchors, empty bank slots, anchors without a positive)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from helpers import F64
from torch import Tensor

MODES = ("in_batch", "bank")
DENOMINATORS = ("contrastiveseg", "supcon")


@dataclass
class ContrastCase:
    anchors: Tensor
    anchor_labels: Tensor
    contrast: Tensor | None
    contrast_labels: Tensor | None

    def args(self) -> tuple:
        return self.anchors, self.anchor_labels, self.contrast, self.contrast_labels


def make_contrast_case(
    a: int, m: int, d: int, classes: int, mode: str, *, seed: int = 0, dtype: torch.dtype = F64,
) -> ContrastCase:
    """Clustered embeddings with ignored anchors, empty bank slots, a class present among the
    anchors only (bank: no positive) and a class with a single anchor (in-batch: no positive)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g, dtype=F64)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        labels = torch.randint(0, classes, (n,), generator=g)
        x = centres[labels] + 0.8 * torch.randn(n, d, generator=g, dtype=F64)
        x = x * (0.5 + torch.rand(n, 1, generator=g, dtype=F64))
        return x, labels

    anchors, anchor_labels = draw(a)
    if classes >= 3 and a > 1:
        anchor_labels[anchor_labels == classes - 1] = 0
        anchor_labels[int(torch.randint(0, a, (1,), generator=g))] = classes - 1  # one anchor
    anchor_labels[torch.rand(a, generator=g) < 0.1] = -1
    if mode == "in_batch":
        return ContrastCase(anchors.to(dtype), anchor_labels, None, None)
    contrast, contrast_labels = draw(m)
    if classes >= 3:
        contrast_labels[contrast_labels == classes - 1] = 1  # the one-anchor class: no positive
    contrast_labels[torch.rand(m, generator=g) < 0.15] = -1  # empty slots
    return ContrastCase(anchors.to(dtype), anchor_labels, contrast.to(dtype), contrast_labels)
