"""Problem sizes (docs/spec.md §7 presets) and the random inputs of a head step.

Inputs are drawn to look like a ProtoSeg batch rather than white noise: each
pixel embedding lies near one prototype of its class (cosine about 0.7), class
frequencies follow a long-tailed (Zipf) law and 10% of the pixels are ignored.
Every implementation of a problem sees the same tensors (same seed).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -1
IGNORED_FRACTION = 0.1
# Cosine between a pixel and the prototype it was drawn around: signal norm 1,
# noise norm ~1, so about 1/sqrt(2).
NOISE_SCALE = 1.0


@dataclass(frozen=True)
class Problem:
    """One head-step size: N pixels, D dims, C classes, K prototypes per class; or, with
    ``contrast`` set ("in_batch" or "bank"), a pixel-contrast size: N = A anchors, D dims,
    C classes and an M-entry contrast set (M = A in-batch; benchmarks/contrast_cases.py)."""

    name: str
    n: int
    d: int
    c: int
    k: int
    contrast: str = ""
    m: int = 0

    @property
    def label(self) -> str:
        if self.contrast:
            return f"{self.name} A={self.n} M={self.m}"
        return f"{self.name} N={self.n}"

    @property
    def key(self) -> tuple:
        """What tells two problems apart in the result rows."""
        return (self.name, self.n, self.d, self.c, self.k, self.m)

    def with_n(self, n: int) -> Problem:
        return dataclasses.replace(self, n=n)


@dataclass(frozen=True)
class Preset:
    """A dataset preset of docs/spec.md §7 with its per-GPU pixel count."""

    name: str
    c: int
    k: int
    d: int
    n_gpu: int

    def problem(self, n: int) -> Problem:
        return Problem(self.name, n, self.d, self.c, self.k)


PRESETS = {
    "cityscapes": Preset("cityscapes", c=19, k=10, d=720, n_gpu=65_536),
    "ade20k": Preset("ade20k", c=150, k=10, d=720, n_gpu=32_768),
    "coco_stuff": Preset("coco_stuff", c=171, k=10, d=720, n_gpu=32_768),
}

# On a CPU the sizes are scaled down (docs/spec.md §7) to fit the suite in minutes. The
# head-step presets, where the speed and memory targets are checked, use the
# per-GPU N / 4: the naive step's per-class Python loop costs the same at any N,
# so at small N it inflates the speed-up; at N/4 (ADE20K, COCO-Stuff: 8,192
# pixels) it is a small share of the naive time and the ratio is the conservative
# one, close to the per-GPU N's. The N sweep and the per-op rows use N / 8.
CPU_PRESET_SCALE_DOWN = 4
CPU_SCALE_DOWN = 8


@dataclass
class HeadInputs:
    """The tensors a head step reads. ``x`` is the embedding after ``feat_norm``
    (before l2 normalisation) and requires grad, as do the affine parameters of
    ``mask_norm``; ``prototypes`` are unit vectors and a buffer (no grad)."""

    x: Tensor
    labels: Tensor
    prototypes: Tensor
    mask_norm_weight: Tensor
    mask_norm_bias: Tensor

    def tensors(self) -> list[Tensor]:
        return [self.x, self.labels, self.prototypes, self.mask_norm_weight, self.mask_norm_bias]

    def zero_grad(self) -> None:
        for t in (self.x, self.mask_norm_weight, self.mask_norm_bias):
            t.grad = None


def _long_tailed_labels(n: int, c: int, generator: torch.Generator) -> Tensor:
    """Class of each pixel, frequencies ∝ 1/rank in a random class order, 10% ignored."""
    rank = torch.randperm(c, generator=generator).double()
    weights = 1.0 / (rank + 1.0)
    labels = torch.multinomial(weights, n, replacement=True, generator=generator)
    ignored = torch.rand(n, generator=generator) < IGNORED_FRACTION
    return torch.where(ignored, IGNORE_INDEX, labels)


def make_head_inputs(
    problem: Problem, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> HeadInputs:
    """Reproducible inputs of ``problem`` on ``device`` (drawn on the CPU, then moved)."""
    g = torch.Generator().manual_seed(seed)
    n, d, c, k = problem.n, problem.d, problem.c, problem.k
    prototypes = F.normalize(torch.randn(c, k, d, generator=g), dim=-1)
    labels = _long_tailed_labels(n, c, g)
    # Ignored pixels are drawn around a prototype too, of a random class.
    centre_class = torch.where(labels >= 0, labels, torch.randint(0, c, (n,), generator=g))
    centre = prototypes[centre_class, torch.randint(0, k, (n,), generator=g)]
    noise = torch.randn(n, d, generator=g) * (NOISE_SCALE / math.sqrt(d))
    x = (centre + noise) * math.sqrt(d)  # LayerNorm-like scale: per-dim std about 1
    weight = 1.0 + 0.1 * torch.randn(c, generator=g)
    bias = 0.1 * torch.randn(c, generator=g)

    def leaf(t: Tensor, grad: bool) -> Tensor:
        return t.to(device=device, dtype=dtype).requires_grad_(grad)

    return HeadInputs(
        x=leaf(x, True),
        labels=labels.to(device),
        prototypes=leaf(prototypes, False),
        mask_norm_weight=leaf(weight, True),
        mask_norm_bias=leaf(bias, True),
    )
