"""ProtoSeg, ContrastiveSeg and HSSN training on top of :mod:`protoseg_kernels`: the prototype
head, the pixel-contrast head, the hierarchical head, their loss, backbones, datasets, a
training/evaluation CLI with DDP, and figures.

The names below load their module (and torch) on first use, so that the command-line entry
points answer ``--help`` and configuration errors without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {  # public name -> the module defining it
    "CheckpointError": "checkpoint", "ContrastHead": "contrast_head", "FeatureMapBackbone": "backbones",
    "HeadOutput": "head", "HSSNHead": "hssn_head", "LinearHead": "linear_head", "LossTerms": "loss",
    "PixelPrototypeCELoss": "loss", "ProtoSegHead": "head", "SegmentationModel": "model", "SmallCNN": "backbones",
    "build_model": "model", "downsample_labels": "labels", "model_from_checkpoint": "checkpoint",
    "predict_classes": "evaluation", "predict_logits": "evaluation", "torchvision_resnet": "backbones",
    "upsample_logits": "loss",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
