"""Datasets: the embedded synthetic scenes, Cityscapes and ADE20K folders,
augmentation and the resumable training sampler."""

from __future__ import annotations

from typing import NamedTuple

from torch.utils.data import Dataset

from .common import IGNORE_INDEX, DatasetError
from .folders import ADE20KFolder, CityscapesFolder
from .sampler import EpochBatchSampler
from .synthetic import SyntheticScenes
from .transforms import EvalSet, EvalTransform, TrainSet, TrainTransform, pad_collate

__all__ = [
    "IGNORE_INDEX", "ADE20KFolder", "CityscapesFolder", "DataSplits", "DatasetError", "EpochBatchSampler",
    "EvalSet", "SyntheticScenes", "TrainSet", "build_datasets", "pad_collate",
]


class DataSplits(NamedTuple):
    train: TrainSet
    val: EvalSet
    class_names: tuple[str, ...]


def _base_datasets(config) -> tuple[Dataset, Dataset]:
    if config.dataset == "synthetic":
        common = {"image_size": config.synthetic_image_size, "seed": config.synthetic_seed}
        return (SyntheticScenes("train", config.synthetic_train_images, **common),
                SyntheticScenes("val", config.synthetic_val_images, **common))
    folder = {"cityscapes": CityscapesFolder, "ade20k": ADE20KFolder}[config.dataset]
    return folder(config.root, "train"), folder(config.root, "val")


def build_datasets(config, seed: int = 0) -> DataSplits:
    """Training and validation sets of a :class:`~protoseg.config.DataConfig`."""
    train, val = _base_datasets(config)
    augment = TrainTransform(config.crop_size, config.scale_range, config.flip)
    return DataSplits(TrainSet(train, augment, seed), EvalSet(val, EvalTransform(config.eval_scale)),
                      tuple(train.class_names))
