"""ProtoSeg, ContrastiveSeg and HSSN training on top of :mod:`protoseg_kernels`: the prototype
head, the pixel-contrast head, the hierarchical head, their loss, backbones, datasets, a
training/evaluation CLI with DDP, and figures."""

from .backbones import FeatureMapBackbone, SmallCNN, torchvision_resnet
from .contrast_head import ContrastHead
from .head import HeadOutput, ProtoSegHead
from .hssn_head import HSSNHead
from .labels import downsample_labels
from .linear_head import LinearHead
from .loss import LossTerms, PixelPrototypeCELoss
from .model import SegmentationModel, build_model

__all__ = [
    "ContrastHead", "FeatureMapBackbone", "HeadOutput", "HSSNHead", "LinearHead", "LossTerms", "PixelPrototypeCELoss",
    "ProtoSegHead", "SegmentationModel", "SmallCNN", "build_model", "downsample_labels", "torchvision_resnet",
]
