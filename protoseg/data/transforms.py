"""Augmentation and normalisation of (image, labels) pairs.

Training samples are drawn by key (index, epoch) and their random augmentation
comes from a generator seeded by (seed, epoch, index), so a run is reproducible
whatever the number of loader workers, and a resumed run sees exactly the
samples the uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .common import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_image(image: Tensor) -> Tensor:
    """[3, H, W] in [0, 1] → ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype)[:, None, None]
    return (image - mean) / std


def denormalize_image(image: Tensor) -> Tensor:
    """Inverse of :func:`normalize_image`, clamped to [0, 1] (for figures)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device)[:, None, None]
    return (image * std + mean).clamp(0, 1)


def resize_pair(image: Tensor, labels: Tensor | None, size: Sequence[int]) -> tuple[Tensor, Tensor | None]:
    """Bilinear for the image, nearest for the labels."""
    size = (int(size[0]), int(size[1]))
    if tuple(image.shape[-2:]) == size:
        return image, labels
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    if labels is not None:
        labels = F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, labels


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


class TrainTransform:
    """Random rescale, pad to the crop size (image 0 after normalisation = the mean
    colour, labels ignored), random crop, random horizontal flip."""

    def __init__(self, crop_size: Sequence[int], scale_range: Sequence[float], flip: bool = True) -> None:
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flip = flip

    def __call__(self, image: Tensor, labels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        image = normalize_image(image)
        scale = _uniform(generator, *self.scale_range)
        height, width = image.shape[-2:]
        image, labels = resize_pair(image, labels, (max(1, round(height * scale)), max(1, round(width * scale))))
        crop_h, crop_w = self.crop_size
        pad_h, pad_w = max(0, crop_h - image.shape[1]), max(0, crop_w - image.shape[2])
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            labels = F.pad(labels, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        top = int(torch.randint(0, image.shape[1] - crop_h + 1, (), generator=generator))
        left = int(torch.randint(0, image.shape[2] - crop_w + 1, (), generator=generator))
        image = image[:, top:top + crop_h, left:left + crop_w]
        labels = labels[top:top + crop_h, left:left + crop_w]
        if self.flip and float(torch.rand((), generator=generator)) < 0.5:
            image, labels = image.flip(-1), labels.flip(-1)
        return image.contiguous(), labels.contiguous()


class EvalTransform:
    """Normalise, and resize the image (not the labels) by ``scale``."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = float(scale)

    def __call__(self, image: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        image = normalize_image(image)
        if self.scale != 1.0:
            height, width = image.shape[-2:]
            image, _ = resize_pair(image, None, (max(1, round(height * self.scale)), max(1, round(width * self.scale))))
        return image, labels


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A distinct, platform-independent seed for each (run seed, epoch, sample)."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (1 << 63)


class TrainSet(Dataset):
    """Items keyed by (index, epoch); augmentation seeded by (seed, epoch, index)."""

    def __init__(self, base: Dataset, transform: TrainTransform, seed: int = 0) -> None:
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor]:
        index, epoch = key
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        image, labels = self.base[index]
        return self.transform(image, labels, generator)


class EvalSet(Dataset):
    def __init__(self, base: Dataset, transform: EvalTransform) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.transform(*self.base[index])


def pad_collate(batch: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Stack samples, padding images with 0 and labels with the ignore index to the
    largest height and width of the batch (datasets of mixed image sizes)."""
    height = max(image.shape[1] for image, _ in batch)
    width = max(image.shape[2] for image, _ in batch)
    label_h = max(labels.shape[0] for _, labels in batch)
    label_w = max(labels.shape[1] for _, labels in batch)
    images = torch.stack([F.pad(image, (0, width - image.shape[2], 0, height - image.shape[1])) for image, _ in batch])
    labels = torch.stack([
        F.pad(labels, (0, label_w - labels.shape[1], 0, label_h - labels.shape[0]), value=IGNORE_INDEX)
        for _, labels in batch
    ])
    return images, labels
