"""``LinearHead``: the per-class linear classifier (a 1×1 convolution) that
ProtoSeg replaces; the baseline of the demo."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .head import HeadOutput


class LinearHead(nn.Module):
    """Segmentation logits [b, C, h, w] = 1×1 conv of the features.

    Same call signature as :class:`~protoseg.head.ProtoSegHead`; ``labels`` and
    ``generator`` are accepted and unused, so models and trainers treat both alike.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1)

    def forward(
        self, features: Tensor, labels: Tensor | None = None, *, generator: torch.Generator | None = None
    ) -> HeadOutput:
        del labels, generator
        return HeadOutput(self.classifier(features))
