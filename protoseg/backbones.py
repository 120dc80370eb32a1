"""Backbones: a small built-in CNN that trains on a CPU in minutes, and an adapter
for any module returning a feature map (a torchvision ResNet as the example)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RESNET_CHANNELS = {18: 512, 34: 512, 50: 2048, 101: 2048, 152: 2048}
# replace_stride_with_dilation of layer2..4 for each output stride.
RESNET_DILATION = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Three stages (strides 2, 4, 8; the last dilated for context) whose stride-8
    features are upsampled and concatenated with the stride-4 ones, as HRNet fuses
    its branches. Output: [b, 6·width, H/4, W/4]."""

    def __init__(self, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.stem = nn.Sequential(conv_bn_relu(in_channels, width, stride=2), conv_bn_relu(width, width))
        self.stage4 = nn.Sequential(conv_bn_relu(width, 2 * width, stride=2), conv_bn_relu(2 * width, 2 * width))
        self.stage8 = nn.Sequential(
            conv_bn_relu(2 * width, 4 * width, stride=2),
            conv_bn_relu(4 * width, 4 * width),
            conv_bn_relu(4 * width, 4 * width, dilation=2),
        )
        self.out_channels = 6 * width

    def forward(self, images: Tensor) -> Tensor:
        stride4 = self.stage4(self.stem(images))
        stride8 = self.stage8(stride4)
        upsampled = F.interpolate(stride8, size=stride4.shape[-2:], mode="bilinear", align_corners=True)
        return torch.cat([stride4, upsampled], dim=1)


class FeatureMapBackbone(nn.Module):
    """Wraps a module whose output is a feature map [b, C, h, w], or a dict, list or
    tuple holding one (``output_key`` selects it; default: the last entry).

    ``out_channels`` is inferred with one forward pass on a small input (in eval
    mode, so no statistics change) when not given.
    """

    def __init__(
        self, module: nn.Module, out_channels: int | None = None, *, output_key: str | int | None = None,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.body = module
        self.output_key = output_key
        self.out_channels = out_channels if out_channels is not None else self._infer_channels(in_channels)

    def _select(self, output: object) -> Tensor:
        if isinstance(output, Mapping):
            output = output[self.output_key] if self.output_key is not None else list(output.values())[-1]
        elif isinstance(output, (list, tuple)):
            output = output[self.output_key if self.output_key is not None else -1]
        if not isinstance(output, Tensor) or output.dim() != 4:
            got = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(f"the backbone must return a [b, C, h, w] feature map, got {got}")
        return output

    @torch.no_grad()
    def _infer_channels(self, in_channels: int) -> int:
        was_training = self.body.training
        self.body.eval()
        try:
            parameter = next(self.body.parameters(), None)
            device = parameter.device if parameter is not None else None
            probe = torch.zeros(1, in_channels, 64, 64, device=device)
            return self._select(self.body(probe)).shape[1]
        finally:
            self.body.train(was_training)

    def forward(self, images: Tensor) -> Tensor:
        return self._select(self.body(images))


def torchvision_resnet(depth: int = 50, output_stride: int = 8, pretrained: bool = False) -> FeatureMapBackbone:
    """A torchvision ResNet without its pooling and classifier, as a backbone.

    ``output_stride`` 8 or 16 dilates the last stages (ResNet-50 and deeper only;
    torchvision's basic blocks do not dilate). ``pretrained`` loads torchvision's
    ImageNet weights (a download); the default starts from random weights.
    """
    try:
        from torchvision import models
    except ImportError as exc:
        raise ImportError("the ResNet backbones need torchvision: pip install torchvision") from exc
    if depth not in RESNET_CHANNELS:
        raise ValueError(f"ResNet depth must be one of {sorted(RESNET_CHANNELS)}, got {depth}")
    if output_stride not in RESNET_DILATION:
        raise ValueError(f"output_stride must be one of {sorted(RESNET_DILATION)}, got {output_stride}")
    if depth < 50 and output_stride != 32:
        raise ValueError(f"ResNet-{depth} supports only output_stride=32 (basic blocks cannot be dilated)")
    net = getattr(models, f"resnet{depth}")(
        weights="DEFAULT" if pretrained else None, replace_stride_with_dilation=RESNET_DILATION[output_stride]
    )
    body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
    return FeatureMapBackbone(body, RESNET_CHANNELS[depth])
