"""HSSN loss rows (docs/spec.md §11, targets docs/spec.md §7): ``pk.tree_min_loss`` and
``pk.tree_triplet_loss`` forward + backward against the original code
(:mod:`benchmarks.hssn_baseline`), at HSSN's Cityscapes settings (docs/spec.md §12), on the
19-leaf / 7-superclass tree (``pk.Hierarchy.cityscapes()``, V = 26).

* ``tree_min``: logits [B = 2, V = 26, 512, 1024] fp32 requiring grad (26-channel logits at
  full resolution, two 512×1024 crops), labels [2, 512, 1024]; focal γ = 2 (the original's
  ``losses_hiera_focal``), scale 5, ε = 1e-8. The logits look like a network's: standard
  normal, with a labelled pixel's leaf and superclass raised by ``LOGIT_MARGIN``. On a CPU
  the pixel count is divided by ``problems.CPU_PRESET_SCALE_DOWN`` (4: logits [2, 26, 256,
  512]), as for the head-step presets where the targets are checked, so that the row takes
  seconds on 2 cores. Every term of both implementations scales with the pixels (the
  naive loops launch 26 kernels over whole channels, the fused op's only extra memory is the
  per-pixel loss and the logits' gradient), so the memory ratio is the same as at full size,
  and at 2×256×512 the baseline holds hundreds of MiB, far above any fixed buffer.
* ``tree_triplet``: the stride-8 embedding [2, 256, 64, 128] (unit vectors over channels,
  near their class's centre, requiring grad) with labels [2, 64, 128] at its resolution,
  max_triplet 200, margin 0.6; the same size on a CPU and a GPU (a step takes well under a
  second on 2 cores).

Labels have long-tailed class frequencies and 10% ignored (``ignore_index`` −1), pixels in
raster order (``problems._long_tailed_labels``); every implementation sees the same tensors
(same seed).

* **naive** (the baseline): ``hssn_baseline.tree_min_loss`` (``prepare_targets`` and
  ``losses_hiera_focal``) or ``hssn_baseline.TreeTripletLoss``, then backward.
* **fused**: the public op with ``validate=False``, then backward, on each protoseg backend
  that implements it (those that do not are listed as not run, with the reason); an op
  without backend kernels (portable torch code, not in the op table) runs once, as backend
  ``auto``.

The speed and memory targets (best fused backend against the naive code, peak extra memory
from the allocator) are checked at the presets; zero host synchronisations for every fused
row.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import protoseg_kernels as pk
from protoseg_kernels._backend import AUTO, op_reason
from protoseg_kernels._op_table import OPS_BY_NAME

from . import hssn_baseline
from .implementations import backend_of
from .measure import Case
from .problems import CPU_PRESET_SCALE_DOWN, IGNORE_INDEX, Problem, _long_tailed_labels

TREE_MIN, TREE_TRIPLET = "tree_min_loss", "tree_triplet_loss"  # the ops, pk.<op>
MODE = "fwd+bwd"
HIERARCHY = pk.Hierarchy.cityscapes()
LEAVES = HIERARCHY.num_leaves
# How far a labelled pixel's leaf and superclass logits are raised above the others (noise std 1).
LOGIT_MARGIN = 2.0
# docs/spec.md §7 (Hierarchy): minimum speed-up and maximum peak extra memory against the original.
TARGETS = {TREE_MIN: (3.0, 1 / 5), TREE_TRIPLET: (5.0, 1 / 10)}


@dataclass(frozen=True)
class LossSettings:
    """One HSSN loss row: sizes and hyper-parameters (docs/spec.md §12)."""

    name: str
    op: str  # TREE_MIN or TREE_TRIPLET
    height: int
    width: int
    channels: int  # V node logits (tree-min) or D embedding dimensions (tree-triplet)
    batch: int = 2
    focal_gamma: float = 2.0  # tree-min
    scale: float = 5.0  # tree-min (the original's literal 5)
    max_triplet: int = 200  # tree-triplet
    margin: float = 0.6  # tree-triplet
    targets: bool = True  # the docs/spec.md §7 speed and memory targets apply (the presets)

    @property
    def problem(self) -> Problem:
        """The result rows' problem: N = B·H·W pixels, D = channels, C = 19 leaves."""
        return Problem(self.name, n=self.batch * self.height * self.width, d=self.channels, c=LEAVES, k=0)

    @property
    def label(self) -> str:
        loss = "tree_min" if self.op == TREE_MIN else "tree_triplet"
        return f"{loss} {self.batch}x{self.channels}x{self.height}x{self.width}"

    def scaled_down(self, pixels: int) -> LossSettings:
        """The pixel count divided by ``pixels`` (a square: each side by its root)."""
        side = math.isqrt(pixels)
        if side * side != pixels:
            raise ValueError(f"scale-down {pixels} is not a square")
        return dataclasses.replace(self, height=self.height // side, width=self.width // side)


SETTINGS = {s.name: s for s in (
    LossSettings("tree_min", TREE_MIN, height=512, width=1024, channels=HIERARCHY.num_nodes),
    LossSettings("tree_triplet", TREE_TRIPLET, height=64, width=128, channels=256),
    # The smoke suite's: 2 images of 16×24 (tree-min) and 12×16 with D = 16 (tree-triplet).
    LossSettings("tiny_tree_min", TREE_MIN, height=16, width=24, channels=HIERARCHY.num_nodes, targets=False),
    LossSettings("tiny_tree_triplet", TREE_TRIPLET, height=12, width=16, channels=16, max_triplet=20,
                 targets=False),
)}
PRESETS = ("tree_min", "tree_triplet")
TINY = ("tiny_tree_min", "tiny_tree_triplet")
CPU_TREE_MIN_SCALE_DOWN = CPU_PRESET_SCALE_DOWN  # of the tree-min preset's pixel count, on a CPU


def _on_device(s: LossSettings, device_type: str) -> LossSettings:
    if s.op == TREE_MIN and s.targets and device_type != "cuda":
        return s.scaled_down(CPU_TREE_MIN_SCALE_DOWN)
    return s


def problems(device_type: str = "cuda", names: tuple[str, ...] = PRESETS) -> tuple[Problem, ...]:
    """The rows' problems on ``device_type`` (the tree-min preset scaled down on a CPU)."""
    return tuple(_on_device(SETTINGS[name], device_type).problem for name in names)


def settings_of(p: Problem) -> LossSettings:
    s = SETTINGS[p.name]
    for candidate in (s, _on_device(s, "cpu")):
        if candidate.problem == p:
            return candidate
    raise ValueError(f"{p} is not the HSSN loss row {s.name!r} ({s.problem})")


def label_of(p: Problem) -> str:
    return settings_of(p).label if p.name in SETTINGS else p.label


def fused_impls(p: Problem, backends: list[str]) -> list[str]:
    """The protoseg implementations of the row: each backend that implements the op, or
    ``auto`` once for an op without backend kernels."""
    op = settings_of(p).op
    if op not in OPS_BY_NAME:
        return [AUTO]
    return [b for b in backends if op_reason(backend_of(b), op) is None]


def skipped_backends(p: Problem, backends: list[str]) -> list[tuple[str, str]]:
    """(backend, why) of the usable backends that do not implement the row's op."""
    op = settings_of(p).op
    if op not in OPS_BY_NAME:
        return []
    return [(b, reason) for b in backends if (reason := op_reason(backend_of(b), op)) is not None]


# ---- inputs ------------------------------------------------------------------
@dataclass
class LossInputs:
    x: Tensor  # tree-min: logits [B, V, H, W]; tree-triplet: embedding [B, D, H, W]; leaf requiring grad
    labels: Tensor  # [B, H, W] int64, IGNORE_INDEX where ignored

    def clear(self) -> None:
        self.x.grad = None


def _logits(s: LossSettings, labels: Tensor, g: torch.Generator) -> Tensor:
    """[B, V, P] standard normal, a labelled pixel's leaf and superclass raised by LOGIT_MARGIN."""
    z = torch.randn(s.batch, s.channels, labels.shape[1], generator=g)
    parents = torch.tensor(HIERARCHY.parents[:LEAVES])
    bump = (LOGIT_MARGIN * (labels >= 0)).unsqueeze(1).float()
    leaf = labels.clamp_min(0)
    z.scatter_add_(1, leaf.unsqueeze(1), bump)
    z.scatter_add_(1, parents[leaf].unsqueeze(1), bump)
    return z


def _embedding(s: LossSettings, labels: Tensor, g: torch.Generator) -> Tensor:
    """[B, D, P] unit vectors near their class's centre (cosine about 0.7), each leaf's
    centre near its superclass's; ignored pixels near a random class's."""
    d = s.channels
    groups = torch.tensor(HIERARCHY.parents[:LEAVES]) - LEAVES
    superclass = F.normalize(torch.randn(HIERARCHY.num_nodes - LEAVES, d, generator=g), dim=1)
    centres = F.normalize(superclass[groups] + 0.7 * F.normalize(torch.randn(LEAVES, d, generator=g), dim=1), dim=1)
    flat = labels.reshape(-1)
    centre = torch.where(flat >= 0, flat, torch.randint(0, LEAVES, flat.shape, generator=g))
    pixels = F.normalize(centres[centre] + torch.randn(flat.numel(), d, generator=g) / math.sqrt(d), dim=1)
    return pixels.view(s.batch, -1, d).permute(0, 2, 1).contiguous()


def make_inputs(s: LossSettings, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LossInputs:
    g = torch.Generator().manual_seed(seed)
    pixels = s.height * s.width
    labels = _long_tailed_labels(s.batch * pixels, LEAVES, g).view(s.batch, pixels)
    x = _logits(s, labels, g) if s.op == TREE_MIN else _embedding(s, labels, g)
    x = x.view(s.batch, s.channels, s.height, s.width)
    return LossInputs(x=x.to(device=device, dtype=dtype).requires_grad_(),
                      labels=labels.view(s.batch, s.height, s.width).to(device))


# ---- the losses ------------------------------------------------------------------
def fused_loss(o: LossInputs, s: LossSettings) -> Tensor:
    """The public op (on the backend in force), ``validate=False``."""
    if s.op == TREE_MIN:
        return pk.tree_min_loss(o.x, o.labels, HIERARCHY, focal_gamma=s.focal_gamma, scale=s.scale,
                                ignore_index=IGNORE_INDEX, validate=False)
    return pk.tree_triplet_loss(o.x, o.labels, HIERARCHY, max_triplet=s.max_triplet, margin=s.margin,
                                ignore_index=IGNORE_INDEX, validate=False)


def naive_loss(o: LossInputs, s: LossSettings) -> Tensor:
    """The original code (benchmarks/hssn_baseline.py)."""
    if s.op == TREE_MIN:
        if s.scale != 5.0:
            raise ValueError("the original tree-min loss has the scale 5 written in")
        return hssn_baseline.tree_min_loss(o.x, o.labels, gamma=s.focal_gamma, ignore_index=IGNORE_INDEX)
    criterion = hssn_baseline.TreeTripletLoss(ignore_index=IGNORE_INDEX, margin=s.margin)
    return hssn_baseline.triplet_loss_or_zero(criterion, o.x, o.labels, max_triplet=s.max_triplet)


# ---- cases -----------------------------------------------------------------------
def loss_case(o: LossInputs, s: LossSettings, backend: str | None) -> Case:
    """fwd+bwd of the fused op on ``backend``, or of the original code (None)."""

    def run(_: None) -> None:
        if backend is None:
            loss = naive_loss(o, s)
        else:
            with pk.use_backend(backend):
                loss = fused_loss(o, s)
        loss.backward()

    return Case(prepare=o.clear, run=run)


def cases(backend: str | None, p: Problem, device: torch.device, dtype: torch.dtype,
          seed: int) -> list[tuple[str, str, Case]]:
    """(op, mode, case) of one job's row."""
    s = settings_of(p)
    return [(s.op, MODE, loss_case(make_inputs(s, device, dtype, seed), s, backend))]
