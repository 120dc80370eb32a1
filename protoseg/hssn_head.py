"""``HSSNHead``: the hierarchical segmentation head of HSSN (docs/spec.md §11, §12).

Forward, on features f [b, C_in, h, w], for a :class:`~protoseg_kernels.Hierarchy` of C leaves
and V nodes:

* node logits z [b, V, h, w] from a 1×1 convolution (leaves first, the original's layout);
* in evaluation (or without labels): ``seg`` = the leaf scores of ``pk.hierarchy_scores``
  (argmax = the hierarchy-aware prediction) and ``nodes`` = z; :meth:`predict` applies the
  rule to the logits upsampled to the label size, as the original does;
* in training with labels [b, H, W]: ``seg`` = the leaf logits z[:, :C] (the trainer's
  cross-entropy is HSSN's CE over the leaves) and the head's loss terms:

  - ``tree_min``: ``pk.tree_min_loss`` (×``tree_min_scale``) of z upsampled to H × W;
  - ``level_ce``: the sum over the internal levels of the cross-entropy of that level's
    node logits against the labels' ancestors at that level;
  - ``triplet``: f(t)·``pk.tree_triplet_loss`` of the l2-normalised projection embedding
    (conv-BN-ReLU-conv, as the original's) at feature resolution against the labels
    nearest-downsampled to it, with f(t) = w/2·(1 + cos(π(t − T)/T)) for t < T and w after
    (HSSN: w = 0.5, T = 80,000), t the training forwards so far.

``compat="hssn"`` reproduces the original's bug: after the tree-min loss it writes 0 into
the caller's labels at void pixels, so the cross-entropies and the triplet loss (and the
trainer's CE, computed after the head) take void for class 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

import protoseg_kernels as pk
from protoseg_kernels.hierarchy_predict import RULES
from protoseg_kernels.tree_triplet_loss import SELECTIONS

from .head import (
    CountsSteps,
    HeadOutput,
    ProjectsPixels,
    _check_choice,
    _check_features,
    _check_non_negative_float,
    _check_positive_float,
    _check_positive_int,
    build_projection,
)
from .labels import check_labels, downsample_labels
from .loss import masked_cross_entropy, upsample_logits

COMPAT_MODES = ("hssn",)


def triplet_factor(step: Tensor | int, weight: float, ramp_iters: int) -> Tensor:
    """f(t) = weight/2·(1 + cos(π(t − T)/T)) for t < T, else ``weight`` (T = ``ramp_iters``;
    T = 0: ``weight`` from the start), for the 0-dim step count t; in fp64, on t's device.
    HSSN: weight 0.5, T = 80,000."""
    t = torch.as_tensor(step, dtype=torch.float64)
    if ramp_iters == 0:
        return torch.full_like(t, weight)
    ramp = weight / 2 * (1 + torch.cos(math.pi * (t - ramp_iters) / ramp_iters))
    return torch.where(t >= ramp_iters, weight, ramp)


class HSSNHead(CountsSteps, ProjectsPixels, nn.Module):
    """Node classifier and projection head trained with HSSN's hierarchical losses.

    Args:
        in_channels: channels of the backbone's feature map.
        hierarchy: the class tree; its leaves are the dataset's classes.
        embed_dim: D of the projection (256 in the original).
        tree_min_scale: factor of the tree-min loss (5 in the original).
        focal_gamma: γ of the focal tree-min loss (the original's Cityscapes loss: 2); None: plain.
        triplet_weight: w, the triplet's weight after the ramp (0.5 in the original).
        triplet_ramp_iters: T, training forwards over which the weight rises from 0 to w.
        max_triplet, triplet_margin, triplet_selection: of ``pk.tree_triplet_loss``.
        rule: inference rule of ``pk.hierarchy_scores`` (``"softmax_sum"``: the original's).
        compat: ``"hssn"``: the original's label mutation (module docstring).
        ignore_index: label of unlabelled pixels.
        process_group: accepted for the trainer's sake; HSSN's losses are per rank, as the
            original's (data parallelism averages their gradients).
        validate_labels: check label values once per step (one host synchronisation; with
            ``process_group`` collective, so all ranks raise).
    """

    def __init__(
        self, in_channels: int, hierarchy: pk.Hierarchy, embed_dim: int = 256, *, tree_min_scale: float = 5.0,
        focal_gamma: float | None = None, triplet_weight: float = 0.5, triplet_ramp_iters: int = 80_000,
        max_triplet: int = 200, triplet_margin: float = 0.6, triplet_selection: str = "first",
        rule: str = "softmax_sum", compat: str | None = None, ignore_index: int = pk.IGNORE_INDEX,
        process_group: Any | None = None, validate_labels: bool = True,
    ) -> None:
        super().__init__()
        in_channels = _check_positive_int("in_channels", in_channels)
        if not isinstance(hierarchy, pk.Hierarchy) or hierarchy.depth < 1:
            raise ValueError(f"hierarchy must be a protoseg_kernels.Hierarchy of depth >= 1, got {hierarchy!r}")
        self.hierarchy = hierarchy
        self.num_classes = hierarchy.num_leaves
        self.embed_dim = _check_positive_int("embed_dim", embed_dim)
        self.tree_min_scale = _check_positive_float("tree_min_scale", tree_min_scale)
        self.focal_gamma = None if focal_gamma is None else _check_non_negative_float("focal_gamma", focal_gamma)
        self.triplet_weight = _check_non_negative_float("triplet_weight", triplet_weight)
        self.triplet_ramp_iters = _check_positive_int("triplet_ramp_iters", triplet_ramp_iters, minimum=0)
        self.max_triplet = _check_positive_int("max_triplet", max_triplet)
        self.triplet_margin = _check_non_negative_float("triplet_margin", triplet_margin)
        self.triplet_selection = _check_choice("triplet_selection", triplet_selection, SELECTIONS)
        self.rule = _check_choice("rule", rule, RULES)
        self.compat = None if compat is None else _check_choice("compat", compat, COMPAT_MODES)
        self.ignore_index = int(ignore_index)
        self.process_group = process_group
        self.validate_labels = bool(validate_labels)
        self._init_step_counter()
        self._level_tables: dict[torch.device, list[tuple[Tensor, Tensor]]] = {}

        self.classifier = nn.Conv2d(in_channels, hierarchy.num_nodes, kernel_size=1)
        self.projection = build_projection("mlp", in_channels, self.embed_dim)

    def extra_repr(self) -> str:
        return (f"hierarchy={self.hierarchy!r}, embed_dim={self.embed_dim}, tree_min_scale={self.tree_min_scale}, "
                f"focal_gamma={self.focal_gamma}, triplet_weight={self.triplet_weight}, "
                f"triplet_ramp_iters={self.triplet_ramp_iters}, rule={self.rule!r}, compat={self.compat!r}")

    def forward(
        self, features: Tensor, labels: Tensor | None = None, *, generator: torch.Generator | None = None
    ) -> HeadOutput:
        """Scores (evaluation) or leaf logits and the loss terms (training with ``labels``
        [b, H, W]). ``generator`` drives ``triplet_selection="random"``."""
        batch, _, height, width = _check_features(features).shape
        nodes = self.classifier(features)
        if not (self.training and labels is not None):
            return HeadOutput(pk.hierarchy_scores(nodes, self.hierarchy, rule=self.rule), nodes=nodes)
        given = labels
        if self.validate_labels:
            labels = check_labels(labels, batch, self.num_classes, self.ignore_index, self.process_group)
        step = self._count_step()
        full = upsample_logits(nodes, labels.shape[-2:])
        # compat mutates the caller's labels below, and the loss keeps its labels for backward.
        tree_min = pk.tree_min_loss(full, labels.clone() if self.compat else labels, self.hierarchy,
                                    focal_gamma=self.focal_gamma, scale=self.tree_min_scale,
                                    ignore_index=self.ignore_index, validate=False)
        if self.compat:
            given.masked_fill_(given == self.ignore_index, 0)  # the original's bug, on the caller's labels
            labels = given
        level_ce = self._level_cross_entropies(full, labels)
        factor = triplet_factor(step, self.triplet_weight, self.triplet_ramp_iters)
        # At factor 0 the embedding stays in the graph (weight 0), so data parallelism sees
        # every parameter used.
        triplet = pk.tree_triplet_loss(
            self.embedding_map(features), downsample_labels(labels, (height, width)), self.hierarchy,
            max_triplet=self.max_triplet, margin=self.triplet_margin, selection=self.triplet_selection,
            generator=generator, ignore_index=self.ignore_index, validate=False,
        )
        triplet = factor.to(triplet.dtype) * triplet
        return HeadOutput(nodes[:, : self.num_classes], nodes=nodes, tree_min=tree_min, level_ce=level_ce,
                          triplet=triplet)

    def _level_cross_entropies(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Σ over the internal levels of the CE of the level's node logits against the labels'
        ancestors at that level (void stays void)."""
        labelled = labels != self.ignore_index
        leaves = labels.long().clamp(0, self.num_classes - 1)
        total = logits.new_zeros((), dtype=torch.float32 if logits.dtype != torch.float64 else logits.dtype)
        for nodes, ancestors in self._levels(logits.device):
            level_labels = torch.where(labelled, ancestors[leaves], self.ignore_index)
            total = total + masked_cross_entropy(logits.index_select(1, nodes), level_labels, self.ignore_index)
        return total

    def _levels(self, device: torch.device) -> list[tuple[Tensor, Tensor]]:
        """Per internal level: (its node ids, each leaf's ancestor's index in the level), cached
        per device (built once, not per step)."""
        if device not in self._level_tables:
            self._level_tables[device] = [
                (torch.tensor(self.hierarchy.level(h), device=device), self.hierarchy.leaf_ancestors(h, device))
                for h in range(1, self.hierarchy.depth + 1)
            ]
        return self._level_tables[device]

    @torch.no_grad()
    def predict(self, output: HeadOutput, size: Sequence[int]) -> Tensor:
        """Leaf predictions [b, *size]: the inference rule on the node logits upsampled to
        ``size`` (bilinear, ``align_corners=True``), as the original predicts."""
        nodes = output.nodes
        if nodes is None:
            raise ValueError("HSSNHead.predict needs the output of an HSSNHead forward (its node logits)")
        return pk.hierarchy_predict(upsample_logits(nodes.float(), size), self.hierarchy, rule=self.rule)
