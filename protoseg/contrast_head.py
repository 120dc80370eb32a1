"""``ContrastHead``: ContrastiveSeg's segmentation head with pixel contrast (docs/spec.md §10, §12).

Forward, on features f [b, C_in, h, w]:

* segmentation logits [b, C, h, w] from a 1×1 convolution;
* in training with labels: the embedding e = l2-normalise(conv-BN-ReLU-conv(f)) [b, D, h, w],
  labels nearest-downsampled to h × w, the prediction argmax of the logits, and the pixel
  contrast loss (``HeadOutput.contrast``) of

  - ``anchors="sampled"``: ``pk.sample_anchors`` (hard and easy anchors per image and class,
    fixed size, on the device) or ``"dense"``: every labelled pixel;
  - against ``contrast_set="in_batch"`` (the anchors with each other) or ``"bank"`` (a
    :class:`~protoseg_kernels.ClassMemoryBank` of segment and pixel queues, fused loss: the
    A × M logits are never stored).

The trainer adds λ·contrast to the cross-entropy (``loss.contrast_weight``).

The batch is contrasted with the bank as it was before the batch: the fused loss rereads
the bank in backward (instead of copying it), so this batch's enqueue waits until after
backward: call :meth:`update_memory` after ``backward()`` (the trainer does; otherwise
the next training forward applies it). The original enqueues between loss and backward on
a copy; the result is the same.

During ``warmup_iters`` the contrast loss is 0 (the embedding enters the graph with weight
0, so data-parallel training sees every parameter used) and the bank still fills.
``compat="contrastiveseg"`` uses the original bank (:mod:`protoseg.contrast_compat`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

import protoseg_kernels as pk

from .contrast_compat import original_enqueue, original_fill
from .head import (
    CountsSteps,
    HeadOutput,
    ProjectsPixels,
    _check_choice,
    _check_features,
    _check_positive_float,
    _check_positive_int,
    build_projection,
)
from .labels import check_labels, downsample_labels

CONTRAST_SETS = ("in_batch", "bank")
ANCHORS = ("sampled", "dense")
COMPAT_MODES = ("contrastiveseg",)


class ContrastHead(CountsSteps, ProjectsPixels, nn.Module):
    """Linear classifier plus a projection head trained with ContrastiveSeg's pixel contrast.

    Args:
        in_channels: channels of the backbone's feature map.
        num_classes: C.
        embed_dim: D of the projection (256 in the original).
        contrast_set: ``"in_batch"`` or ``"bank"``.
        anchors: ``"sampled"`` (hard-anchor sampling) or ``"dense"`` (every labelled pixel).
        temperature, base_temperature: τ and τ_b of the loss.
        max_samples, max_views: the sampler's budget (``anchors="sampled"``).
        memory_size: L, slots per queue and class of the bank.
        pixels_per_class: pixels per image and class enqueued each step.
        compat: ``"contrastiveseg"``: the original bank and its bugs (needs the bank).
        warmup_iters: training forwards without contrast (the bank still fills).
        ignore_index: label of unlabelled pixels.
        process_group: ranks that share the bank (their contributions are gathered).
        validate_labels: check label values once per step (one host synchronisation; with
            ``process_group`` collective, one extra small all-reduce, so all ranks raise).
    """

    def __init__(
        self, in_channels: int, num_classes: int, embed_dim: int = 256, *, contrast_set: str = "in_batch",
        anchors: str = "sampled", temperature: float = 0.1, base_temperature: float = 0.07,
        max_samples: int = 1024, max_views: int = 100, memory_size: int = 5000, pixels_per_class: int = 10,
        compat: str | None = None, warmup_iters: int = 0, ignore_index: int = pk.IGNORE_INDEX,
        process_group: Any | None = None, validate_labels: bool = True,
    ) -> None:
        super().__init__()
        in_channels = _check_positive_int("in_channels", in_channels)
        self.num_classes = _check_positive_int("num_classes", num_classes)
        self.embed_dim = _check_positive_int("embed_dim", embed_dim)
        self.contrast_set = _check_choice("contrast_set", contrast_set, CONTRAST_SETS)
        self.anchors = _check_choice("anchors", anchors, ANCHORS)
        self.temperature = _check_positive_float("temperature", temperature)
        self.base_temperature = _check_positive_float("base_temperature", base_temperature)
        self.max_samples = _check_positive_int("max_samples", max_samples)
        self.max_views = _check_positive_int("max_views", max_views)
        self.pixels_per_class = _check_positive_int("pixels_per_class", pixels_per_class)
        self.compat = None if compat is None else _check_choice("compat", compat, COMPAT_MODES)
        if self.compat and self.contrast_set != "bank":
            raise ValueError("compat='contrastiveseg' reproduces the original memory bank; "
                             "it needs contrast_set='bank'")
        self.warmup_iters = _check_positive_int("warmup_iters", warmup_iters, minimum=0)
        self.ignore_index = int(ignore_index)
        self.process_group = process_group
        self.validate_labels = bool(validate_labels)
        self._init_step_counter()
        self._pending: tuple[Tensor, Tensor] | None = None  # this step's enqueue, after backward

        self.classifier = nn.Conv2d(in_channels, self.num_classes, kernel_size=1)
        self.projection = build_projection("mlp", in_channels, self.embed_dim)
        self.bank = None
        if self.contrast_set == "bank":
            size = _check_positive_int("memory_size", memory_size)
            self.bank = pk.ClassMemoryBank(self.num_classes, size, self.embed_dim, ignore_index=self.ignore_index)
            if self.compat:
                original_fill(self.bank)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embed_dim={self.embed_dim}, contrast_set={self.contrast_set!r}, "
                f"anchors={self.anchors!r}, temperature={self.temperature}, compat={self.compat!r}, "
                f"warmup_iters={self.warmup_iters}")

    def forward(
        self, features: Tensor, labels: Tensor | None = None, *, generator: torch.Generator | None = None
    ) -> HeadOutput:
        """Logits, and in training with ``labels`` [b, H, W] the contrast loss.
        ``generator`` drives the anchor sampling (on the features' device)."""
        batch, _, height, width = _check_features(features).shape
        seg = self.classifier(features)
        if not (self.training and labels is not None):
            return HeadOutput(seg)
        if self.validate_labels:
            labels = check_labels(labels, batch, self.num_classes, self.ignore_index, self.process_group)
        step = self._count_step()
        self.update_memory()
        embedding = self.embedding_map(features)
        pixel_labels = downsample_labels(labels, (height, width))
        contrast = self._contrast_loss(embedding, pixel_labels, seg.detach().argmax(dim=1), generator)
        if self.warmup_iters > 0:
            # A tensor condition, not a Python branch on the count, so the step stays one graph
            # under torch.compile; the warm-up's loss is exactly 0 with the projection in the
            # graph (data parallelism sees every parameter used).
            contrast = torch.where(step >= self.warmup_iters, contrast, embedding.sum() * 0.0)
        if self.bank is not None:
            self._pending = (embedding.detach(), pixel_labels)
        return HeadOutput(seg, contrast=contrast)

    def _contrast_loss(self, embedding: Tensor, labels: Tensor, prediction: Tensor,
                       generator: torch.Generator | None) -> Tensor:
        batch, dim = embedding.shape[:2]
        if self.anchors == "sampled":
            sample = pk.sample_anchors(
                labels.view(batch, -1), prediction.view(batch, -1), max_samples=self.max_samples,
                max_views=self.max_views, ignore_index=self.ignore_index, generator=generator, validate=False,
            )
            # The kept anchors fill the first T·V <= B·C·max_views slots (docs/spec.md §10.2): a
            # static bound, so the loss skips the padding (with max_views 1: 2·19 rows, not 1024).
            bound = min(self.max_samples, batch * self.num_classes * self.max_views)
            pixels = embedding.view(batch, dim, -1)
            index = sample.index[:bound].clamp_min(0)
            n = pixels.shape[2]
            anchors, anchor_labels = pixels[index // n, :, index % n], sample.labels[:bound]
        else:
            anchors, anchor_labels = embedding.permute(0, 2, 3, 1).reshape(-1, dim), labels.reshape(-1)
        contrast = contrast_labels = None
        if self.bank is not None:
            contrast, contrast_labels = self.bank.contrast_set()
            anchors = anchors.to(contrast.dtype)
        return pk.pixel_contrast_loss(
            anchors, anchor_labels, contrast, contrast_labels, temperature=self.temperature,
            base_temperature=self.base_temperature, normalize=False, ignore_index=self.ignore_index,
            validate=False,
        )

    @torch.no_grad()
    def update_memory(self) -> None:
        """Enqueue the last training forward's embeddings (a no-op without a bank or
        when already done). Call after ``backward()``."""
        if self._pending is None:
            return
        embedding, labels = self._pending
        self._pending = None
        if self.compat:
            original_enqueue(self.bank, embedding, labels, self.pixels_per_class)
        else:
            self.bank.enqueue(embedding, labels, pixels_per_class=self.pixels_per_class,
                              process_group=self.process_group, validate=False)
