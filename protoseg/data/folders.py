"""Loaders for the standard Cityscapes and ADE20K folder layouts.

Cityscapes::

    root/leftImg8bit/{train,val,test}/<city>/<name>_leftImg8bit.png
    root/gtFine/{train,val,test}/<city>/<name>_gtFine_labelIds.png

labelIds are mapped to the 19 evaluation trainIds; every other id becomes ``IGNORE_INDEX`` (-1).

ADE20K (ADEChallengeData2016)::

    root/images/{training,validation}/<name>.jpg
    root/annotations/{training,validation}/<name>.png

with "reduce zero label": 0 (other) becomes ``IGNORE_INDEX`` (-1) and class v becomes v − 1 (150 classes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .common import IGNORE_INDEX, DatasetError

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
# labelId of each trainId (the Cityscapes scripts' table; every other id is ignored).
CITYSCAPES_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
ADE20K_NUM_CLASSES = len(ADE20K_CLASSES)  # 150
ADE20K_SPLITS = {"train": "training", "val": "validation"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def cityscapes_lookup() -> Tensor:
    table = torch.full((256,), IGNORE_INDEX, dtype=torch.int64)
    table[torch.tensor(CITYSCAPES_LABEL_IDS)] = torch.arange(len(CITYSCAPES_LABEL_IDS))
    return table


def reduce_zero_label_lookup() -> Tensor:
    table = torch.arange(256, dtype=torch.int64) - 1
    table[0] = IGNORE_INDEX
    table[ADE20K_NUM_CLASSES + 1:] = IGNORE_INDEX  # not a class of the benchmark
    return table


def read_image(path: Path) -> Tensor:
    """RGB image as float [3, H, W] in [0, 1]."""
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)


def read_label_map(path: Path) -> Tensor:
    """Single-channel 8-bit label image as uint8 [H, W]."""
    from PIL import Image

    with Image.open(path) as image:
        if image.mode not in ("L", "P"):
            raise DatasetError(f"{path}: label images must be single-channel 8-bit (mode L or P), "
                               f"got mode {image.mode}")
        array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy())


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{what} folder not found: {path}")
    return path


class LabelledImageFolder(Dataset):
    """(image, label) file pairs; labels mapped through a 256-entry lookup table."""

    class_names: tuple[str, ...] = ()

    def __init__(self, pairs: list[tuple[Path, Path]], lookup: Tensor, source: Path) -> None:
        if not pairs:
            raise DatasetError(f"no images found under {source}")
        self.pairs = pairs
        self.lookup = lookup

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image_path, label_path = self.pairs[index]
        image = read_image(image_path)
        labels = self.lookup[read_label_map(label_path).long()]
        if labels.shape != image.shape[1:]:
            raise DatasetError(f"{label_path}: label size {tuple(labels.shape)} differs from the image's "
                               f"{tuple(image.shape[1:])} ({image_path})")
        return image, labels


class CityscapesFolder(LabelledImageFolder):
    class_names = CITYSCAPES_CLASSES

    def __init__(self, root: str | Path, split: str = "train") -> None:
        root = _require_dir(Path(root), "Cityscapes root")
        image_dir = _require_dir(root / "leftImg8bit" / split, f"Cityscapes {split} image")
        label_dir = _require_dir(root / "gtFine" / split, f"Cityscapes {split} label")
        pairs = []
        for image_path in sorted(image_dir.glob("*/*_leftImg8bit.png")):
            stem = image_path.name[: -len("_leftImg8bit.png")]
            label_path = label_dir / image_path.parent.name / f"{stem}_gtFine_labelIds.png"
            if not label_path.is_file():
                raise DatasetError(f"label file missing for {image_path}: expected {label_path}")
            pairs.append((image_path, label_path))
        super().__init__(pairs, cityscapes_lookup(), image_dir)


class ADE20KFolder(LabelledImageFolder):
    class_names = ADE20K_CLASSES

    def __init__(self, root: str | Path, split: str = "train") -> None:
        if split not in ADE20K_SPLITS:
            raise ValueError(f"split must be one of {', '.join(map(repr, ADE20K_SPLITS))}, got {split!r}")
        root = _require_dir(Path(root), "ADE20K root")
        folder = ADE20K_SPLITS[split]
        image_dir = _require_dir(root / "images" / folder, f"ADE20K {folder} image")
        label_dir = _require_dir(root / "annotations" / folder, f"ADE20K {folder} annotation")
        pairs = []
        for image_path in sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            label_path = label_dir / f"{image_path.stem}.png"
            if not label_path.is_file():
                raise DatasetError(f"annotation missing for {image_path}: expected {label_path}")
            pairs.append((image_path, label_path))
        super().__init__(pairs, reduce_zero_label_lookup(), image_dir)
