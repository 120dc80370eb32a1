"""``SyntheticScenes``: the embedded dataset (no download), generated deterministically.

Each image has a background (two looks) and 3–6 overlapping objects of random
shape (ellipse, rotated rectangle, triangle). An object's class is not its shape:
each of the four object classes comes in four *modes*, a (texture, colour) pair
from a Latin square, so every texture and every colour occurs in every class and
only their combination tells the class::

    class \\ mode      0                1                2               3
    A            h-stripes red    v-stripes green  checker blue    dots yellow
    B            h-stripes green  v-stripes blue   checker yellow  dots red
    C            h-stripes blue   v-stripes yellow checker red     dots green
    D            h-stripes yellow v-stripes red    checker green   dots blue

A class is thus a union of separate clusters in appearance space, the case where
several prototypes per class help. About a third of the images contain a "void"
patch of noise labelled ``ignore_index``. Texture periods, colours and brightness
vary per object, and pixel noise is added.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .common import IGNORE_INDEX

CLASS_NAMES = ("background", "class-A", "class-B", "class-C", "class-D")
NUM_MODES = 4
COLOURS = torch.tensor([[0.85, 0.20, 0.20], [0.20, 0.72, 0.28], [0.22, 0.38, 0.92], [0.92, 0.80, 0.20]])
BACKGROUND_TINTS = torch.tensor([[0.55, 0.55, 0.55], [0.62, 0.52, 0.40]])
SPLIT_SEEDS = {"train": 0, "val": 1}


def mode_appearance(cls: int, mode: int) -> tuple[int, int]:
    """(texture, colour) of an object class (1..4) in ``mode`` (0..3): a Latin square."""
    return mode, (cls - 1 + mode) % NUM_MODES


class _Random:
    """Scalar draws from a seeded ``torch.Generator``."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=self.generator))

    def integer(self, low: int, high: int) -> int:
        """Uniform in [low, high)."""
        return int(torch.randint(low, high, (), generator=self.generator))

    def noise(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self.generator)


def _texture(kind: int, ys: Tensor, xs: Tensor, period: float, phase: float) -> Tensor:
    """Bool pattern: horizontal stripes, vertical stripes, checkerboard or dots."""
    half = period / 2
    if kind == 0:
        return torch.floor((ys + phase) / half) % 2 == 0
    if kind == 1:
        return torch.floor((xs + phase) / half) % 2 == 0
    if kind == 2:
        return (torch.floor((ys + phase) / half) + torch.floor((xs + phase) / half)) % 2 == 0
    cy = torch.remainder(ys + phase, period) - half
    cx = torch.remainder(xs + phase, period) - half
    return cy * cy + cx * cx < (0.3 * period) ** 2


def _shape_mask(kind: int, ys: Tensor, xs: Tensor, cy: float, cx: float, radius: float, angle: float,
                aspect: float) -> Tensor:
    """Ellipse, rotated rectangle or triangle centred at (cy, cx)."""
    cos, sin = math.cos(angle), math.sin(angle)
    u = ((xs - cx) * cos + (ys - cy) * sin) / radius
    v = (-(xs - cx) * sin + (ys - cy) * cos) / (radius * aspect)
    if kind == 0:
        return u * u + v * v <= 1
    if kind == 1:
        return (u.abs() <= 0.9) & (v.abs() <= 0.9)
    return (v >= -0.6) & (v <= 1.2 - 1.6 * u.abs())


def _background(rng: _Random, size: int, ys: Tensor, xs: Tensor) -> Tensor:
    tint = BACKGROUND_TINTS[rng.integer(0, len(BACKGROUND_TINTS))]
    gradient = 0.8 + 0.4 * (ys * math.cos(rng.uniform(0, math.pi)) + xs * math.sin(rng.uniform(0, math.pi))) / size
    coarse = torch.nn.functional.interpolate(rng.noise(1, 1, 4, 4), size=(size, size), mode="bilinear",
                                             align_corners=False)[0, 0]
    return tint[:, None, None] * (gradient + 0.15 * coarse)[None]


def render_scene(seed: int, size: int = 64) -> tuple[Tensor, Tensor]:
    """One scene: image [3, size, size] in [0, 1] and labels [size, size] int64."""
    rng = _Random(seed)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    image = _background(rng, size, ys, xs)
    labels = torch.zeros(size, size, dtype=torch.int64)
    scale = size / 64
    for _ in range(rng.integer(3, 7)):
        cls, mode = rng.integer(1, len(CLASS_NAMES)), rng.integer(0, NUM_MODES)
        texture, colour = mode_appearance(cls, mode)
        radius = rng.uniform(8, 18) * scale
        mask = _shape_mask(rng.integer(0, 3), ys, xs, rng.uniform(0, size), rng.uniform(0, size), radius,
                           rng.uniform(0, math.pi), rng.uniform(0.6, 1.0))
        pattern = _texture(texture, ys, xs, rng.uniform(5, 9) * scale, rng.uniform(0, 9))
        base = COLOURS[colour] * rng.uniform(0.8, 1.15)
        fill = torch.where(pattern[None], base[:, None, None], 0.35 * base[:, None, None])
        image = torch.where(mask[None], fill, image)
        labels[mask] = cls
    if rng.uniform(0, 1) < 1 / 3:
        h, w = rng.integer(5, 13) * scale, rng.integer(5, 13) * scale
        top, left = rng.uniform(0, size - h), rng.uniform(0, size - w)
        void = (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w)
        image = torch.where(void[None], torch.rand(3, size, size, generator=rng.generator), image)
        labels[void] = IGNORE_INDEX
    image = image + 0.04 * rng.noise(3, size, size)
    return image.clamp(0, 1), labels


class SyntheticScenes(Dataset):
    """``count`` scenes of split ``"train"`` or ``"val"`` (disjoint seeds), rendered
    once at construction; item i is (image [3, S, S] in [0, 1], labels [S, S])."""

    class_names = CLASS_NAMES

    def __init__(self, split: str = "train", count: int = 1000, image_size: int = 64, seed: int = 0) -> None:
        if split not in SPLIT_SEEDS:
            raise ValueError(f"split must be one of {', '.join(map(repr, SPLIT_SEEDS))}, got {split!r}")
        if count < 1 or image_size < 16:
            raise ValueError(f"need count >= 1 and image_size >= 16, got count={count}, image_size={image_size}")
        base = (seed * len(SPLIT_SEEDS) + SPLIT_SEEDS[split]) * 1_000_003
        scenes = [render_scene(base + index, image_size) for index in range(count)]
        self.images = torch.stack([image for image, _ in scenes])
        self.labels = torch.stack([labels for _, labels in scenes])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]
