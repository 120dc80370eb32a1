"""Pixel-contrast benchmark rows (docs/spec.md §7): ``pk.pixel_contrast_loss`` fwd+bwd
against the naive formula of :mod:`benchmarks.contrast_baseline`, and the bare GEMMs of
its floor.

Presets (docs/spec.md §7), all D = 256 and C = 19 classes:

* ``in_batch``: A = 1,024 sampled anchors contrasted with each other;
* ``bank``: the same anchors against a memory bank of M = 190,000 entries (19 classes ×
  5,000 × a pixel and a segment queue), the bank constant (no gradient);
* ``dense``: every labelled pixel an anchor (A = 16,384 per GPU; on a CPU A / 8) against
  that bank. The naive formula cannot hold its A×M tensors there: it is not run, and its
  estimated requirement is reported instead (:func:`naive_bytes`).

Inputs look like ContrastiveSeg's: unit embeddings near their class's centre; sampled
anchors come grouped by class (the original samples per class, then flattens), the bank
is stored by class (queue, class, slot); dense anchors are pixels in raster order with
long-tailed class frequencies and 10% ignored.

GEMM floor, counted in bare [A, D]×[D, M] products ("fwd") and [A, M]×[M, D] ones ("dx"):
ContrastiveSeg needs 2 forward passes and, with a constant bank, a recomputation and dx
in backward: 3 fwd + 1 dx. With the bank stored by class, the second forward pass needs
only the positives' columns, a C-th of them, once the anchors are taken in label order
(an O(A·D) sort, whatever order they come in): (2 + 1/C) fwd + 1 dx, the floor used here
for every preset. In-batch the column role adds one product: + 1 dx.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import protoseg_kernels as pk

from .contrast_baseline import contrastive_loss
from .measure import Case, physical_memory_bytes
from .problems import Problem

OP = "pixel_contrast_loss"
MODE = "fwd+bwd"
GEMM_FWD, GEMM_DX = "fwd", "dx"
CLASSES, DIM, BANK = 19, 256, 190_000
PRESETS = {
    "in_batch": Problem("in_batch", n=1_024, d=DIM, c=CLASSES, k=0, contrast="in_batch", m=1_024),
    "bank": Problem("bank", n=1_024, d=DIM, c=CLASSES, k=0, contrast="bank", m=BANK),
    "dense": Problem("dense", n=16_384, d=DIM, c=CLASSES, k=0, contrast="bank", m=BANK),
}
GROUPED = ("in_batch", "bank")  # presets whose anchors come grouped by label
CPU_DENSE_SCALE_DOWN = 8
# The naive formula keeps about this many A×M tensors alive at its peak (logits, the
# shifted logits, exp, the float masks, log-probabilities and their products; measured
# at the bank preset, see docs/benchmarks.md).
NAIVE_A_BY_M_TENSORS = 10
NAIVE_MEMORY_SHARE = 0.5  # run the naive formula only if it needs under half the RAM


def presets(device_type: str) -> tuple[Problem, ...]:
    """The three presets; on a CPU the dense preset's A is scaled down."""
    dense = PRESETS["dense"]
    if device_type != "cuda":
        dense = dense.with_n(dense.n // CPU_DENSE_SCALE_DOWN)
    return PRESETS["in_batch"], PRESETS["bank"], dense


def naive_bytes(p: Problem, element_size: int = 4) -> int:
    """Estimated peak extra memory of the naive formula: its A×M tensors."""
    return NAIVE_A_BY_M_TENSORS * p.n * p.m * element_size


def naive_fits(p: Problem) -> bool:
    memory = physical_memory_bytes()
    return memory is None or naive_bytes(p) < NAIVE_MEMORY_SHARE * memory


def floor_gemms(classes: int, contrast: str) -> dict[str, float]:
    """{bare GEMM: count} of the fused ContrastiveSeg step's floor (module docstring): the
    contrast sets of every preset are stored by class."""
    return {GEMM_FWD: 2 + 1 / classes, GEMM_DX: 2 if contrast == "in_batch" else 1}


def extra_memory_bound(p: Problem, element_size: int = 4) -> int:
    """(A + M)·D elements: the size of the inputs, the unit of the dense preset's
    O((A + M)·D) memory target."""
    return (p.n + p.m) * p.d * element_size


def flops(p: Problem) -> int:
    """Useful FLOPs of fwd+bwd: the logits, d anchors and, in-batch, the column role."""
    products = 3 if p.contrast == "in_batch" else 2
    return products * 2 * p.n * p.m * p.d


@dataclass
class ContrastInputs:
    anchors: Tensor  # [A, D], leaf requiring grad
    labels: Tensor  # [A]
    bank: Tensor | None  # [M, D], constant
    bank_labels: Tensor | None  # [M]

    def clear(self) -> None:
        self.anchors.grad = None


def _near(centres: Tensor, labels: Tensor, g: torch.Generator) -> Tensor:
    """Unit vectors around their class centre (cosine about 0.7)."""
    noise = torch.randn(labels.shape[0], centres.shape[1], generator=g) / math.sqrt(centres.shape[1])
    return F.normalize(centres[labels.clamp_min(0)] + noise, dim=1)


def _dense_labels(n: int, c: int, g: torch.Generator) -> Tensor:
    weights = 1.0 / (torch.randperm(c, generator=g).double() + 1.0)
    labels = torch.multinomial(weights, n, replacement=True, generator=g)
    return torch.where(torch.rand(n, generator=g) < 0.1, -1, labels)


def make_inputs(p: Problem, device: torch.device, dtype: torch.dtype, seed: int = 0) -> ContrastInputs:
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(p.c, p.d, generator=g), dim=1)
    grouped = p.name in GROUPED
    labels = torch.arange(p.n) * p.c // p.n if grouped else _dense_labels(p.n, p.c, g)
    anchors = _near(centres, labels, g).to(device=device, dtype=dtype).requires_grad_()
    if p.contrast == "in_batch":
        return ContrastInputs(anchors, labels.to(device), None, None)
    per_queue = p.m // 2
    bank_labels = (torch.arange(p.m) % per_queue) * p.c // per_queue  # [queue, class, slot]
    bank = _near(centres, bank_labels, g).to(device=device, dtype=dtype)
    return ContrastInputs(anchors, labels.to(device), bank, bank_labels.to(device))


def step_case(o: ContrastInputs, backend: str | None) -> Case:
    """fwd+bwd of the fused op on ``backend``, or of the naive formula (None)."""

    def run(_: None) -> None:
        if backend is None:
            loss = contrastive_loss(o.anchors, o.labels, o.bank, o.bank_labels)
        else:
            with pk.use_backend(backend):
                loss = pk.pixel_contrast_loss(o.anchors, o.labels, o.bank, o.bank_labels, validate=False)
        loss.backward()

    return Case(prepare=o.clear, run=run)


def gemm_cases(o: ContrastInputs) -> dict[str, Case]:
    """The bare GEMMs of the floor, writing into preallocated outputs."""
    a = o.anchors.detach()
    c = a if o.bank is None else o.bank
    s = a.new_empty(a.shape[0], c.shape[0])
    grad_s = torch.randn_like(s)
    grad_a = torch.empty_like(a)
    return {
        GEMM_FWD: Case(prepare=lambda: None, run=lambda _: torch.mm(a, c.t(), out=s)),
        GEMM_DX: Case(prepare=lambda: None, run=lambda _: torch.mm(grad_s, c, out=grad_a)),
    }


def cases(floor: bool, backend: str | None, p: Problem, device: torch.device, dtype: torch.dtype,
          seed: int) -> list[tuple[str, str, Case]]:
    """(op, mode, case) of one job's rows: the floor's GEMMs, or fwd+bwd on ``backend``
    (None: the naive formula)."""
    o = make_inputs(p, device, dtype, seed)
    if floor:
        return [("gemm", name, case) for name, case in gemm_cases(o).items()]
    return [(OP, MODE, step_case(o, backend))]
