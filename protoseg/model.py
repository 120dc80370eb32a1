"""``SegmentationModel``: a backbone and a head, built from a model config."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .backbones import SmallCNN, torchvision_resnet
from .config import ConfigError
from .contrast_head import ContrastHead
from .head import HeadOutput, ProtoSegHead
from .hssn_head import HSSNHead
from .linear_head import LinearHead


class SegmentationModel(nn.Module):
    """images [b, 3, H, W] → backbone feature map → head → :class:`HeadOutput`.

    The backbone is any module returning a feature map and exposing
    ``out_channels`` (see :class:`~protoseg.backbones.FeatureMapBackbone`).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(
        self, images: Tensor, labels: Tensor | None = None, *, generator: torch.Generator | None = None
    ) -> HeadOutput:
        return self.head(self.backbone(images), labels, generator=generator)


def build_backbone(config) -> nn.Module:
    if config.backbone == "small_cnn":
        return SmallCNN(width=config.width)
    depth = int(config.backbone.removeprefix("resnet"))
    return torchvision_resnet(depth, output_stride=config.output_stride, pretrained=config.pretrained)


def build_head(config, in_channels: int, num_classes: int, ignore_index: int,
               process_group: Any | None = None, hierarchy: Any | None = None) -> nn.Module:
    if config.head == "linear":
        return LinearHead(in_channels, num_classes)
    if config.head == "contrast":
        return ContrastHead(
            in_channels, num_classes, config.embed_dim or 256, contrast_set=config.contrast_set,
            anchors=config.contrast_anchors, temperature=config.contrast_temperature,
            base_temperature=config.contrast_base_temperature, max_samples=config.max_samples,
            max_views=config.max_views, memory_size=config.memory_size, pixels_per_class=config.pixels_per_class,
            compat=config.compat, warmup_iters=config.warmup_iters, ignore_index=ignore_index,
            process_group=process_group,
        )
    if config.head == "hssn":
        if hierarchy is None or hierarchy.num_leaves != num_classes:
            raise ConfigError(f"model.head='hssn' needs a hierarchy over the {num_classes} classes, got {hierarchy!r}")
        return HSSNHead(
            in_channels, hierarchy, config.embed_dim or 256, tree_min_scale=config.tree_min_scale,
            focal_gamma=config.focal_gamma, triplet_weight=config.triplet_weight,
            triplet_ramp_iters=config.triplet_ramp_iters, max_triplet=config.max_triplet,
            triplet_margin=config.triplet_margin, triplet_selection=config.triplet_selection,
            rule=config.hierarchy_rule, compat=config.compat, ignore_index=ignore_index, process_group=process_group,
        )
    if config.projection == "none" and config.embed_dim not in (None, in_channels):
        raise ConfigError(f"model.projection=none keeps the backbone's {in_channels} channels: leave "
                          f"model.embed_dim unset or set it to {in_channels}, got {config.embed_dim}")
    return ProtoSegHead(
        in_channels, num_classes, config.num_prototypes, config.embed_dim, projection=config.projection,
        momentum=config.momentum, temperature=config.temperature, sinkhorn_epsilon=config.sinkhorn_epsilon,
        sinkhorn_iterations=config.sinkhorn_iterations, assignment=config.assignment, compat=config.compat,
        warmup_iters=config.warmup_iters, ignore_index=ignore_index, process_group=process_group,
    )


def build_model(config, num_classes: int, ignore_index: int, process_group: Any | None = None,
                hierarchy: Any | None = None) -> SegmentationModel:
    """The model of a :class:`~protoseg.config.ModelConfig`. ``process_group``: the
    data-parallel ranks that share the prototypes; ``hierarchy``: the class tree of
    ``head="hssn"`` (see :func:`~protoseg.hierarchies.build_hierarchy`)."""
    backbone = build_backbone(config)
    head = build_head(config, backbone.out_channels, num_classes, ignore_index, process_group, hierarchy)
    return SegmentationModel(backbone, head)
